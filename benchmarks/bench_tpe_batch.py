"""TPE in batches: the best a sweep finds when TPE asks B trials a round after its start-up (constant liar), against
one trial at a time, over seeds. The quality figure behind `sweep.batching.TPE_BATCH`; no published number exists
for batches this large.

For each sweep (the default sweep, the digits CNN, the breast cancer sweep, as shipped but for `sampler.seed` and
`sampler.batch`), each seed and each B, the sweep runs stacked (`engine=vectorized`) in a fresh folder; its best
objective per condition is read from the trial runs in MLflow. Prints, per sweep and condition, the median best over
the seeds for each B, its relative difference from B = 1 (a loss: higher is worse; a score: lower is worse), and
the search's wall time, and writes them to benchmarks/results/tpe_batch.csv. Usage:
python benchmarks/bench_tpe_batch.py [--seeds 10] [--batches 1,4,8] [--sweeps default,digits,breast_cancer]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {
    "default": (ROOT / "sweeps" / "optimizer_hidden_noise.yaml", "optimizer_hidden_noise"),
    "digits": (ROOT / "sweeps" / "digits_cnn.yaml", "digits_cnn"),
    "breast_cancer": (ROOT / "sweeps" / "breast_cancer.yaml", "breast_cancer"),
}


def best_per_condition(sweep: Path, study: str, seed: int, batch: int) -> tuple[dict[str, float], str, float]:
    """({condition: best objective}, the objective's direction, seconds) of one sweep."""
    with tempfile.TemporaryDirectory(prefix="bench-tpe-") as folder:
        uri = f"sqlite:///{Path(folder) / 'runs.db'}"
        settings = [f"sampler.seed={seed}", f"sampler.batch={batch}", "engine=vectorized"]
        command = [sys.executable, "-m", "sweeplab", "sweep", str(sweep), *settings, "--quiet", "--no-report"]
        started = time.perf_counter()
        subprocess.run([*command, "--tracking-uri", uri], cwd=folder, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        client = MlflowClient(uri)
        runs = client.search_runs(
            [client.get_experiment_by_name(study).experiment_id], "tags.`sweeplab.role` = 'trial'", max_results=5000
        )
        metric, direction = runs[0].data.tags["sweeplab.objective"].split()
        column = "best_val_loss" if metric == "val_loss" else f"best_{metric}"
        best: dict[str, float] = {}
        pick = min if direction == "minimize" else max
        for run in runs:
            if column not in run.data.metrics:
                continue
            condition = run.data.tags.get("sweeplab.condition", "") or ",".join(
                f"{k}={v}" for k, v in sorted(run.data.params.items()) if k in ("data.noise", "data.train_fraction")
            )
            value = run.data.metrics[column]
            best[condition] = pick(best.get(condition, value), value)
        return best, direction, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.sweeps.split(","):
        sweep, study = SWEEPS[name]
        found: dict[int, list] = {b: [] for b in batches}
        seconds: dict[int, list] = {b: [] for b in batches}
        direction = "minimize"
        for seed in range(args.seeds):
            for b in batches:
                best, direction, spent = best_per_condition(sweep, study, seed, b)
                found[b].append(best)
                seconds[b].append(spent)
                print(f"{name} seed {seed} batch {b}: {best} ({spent:.1f} s)", file=sys.stderr, flush=True)
        for condition in sorted(found[batches[0]][0]):
            one = statistics.median(r[condition] for r in found[batches[0]])
            for b in batches:
                median = statistics.median(r[condition] for r in found[b])
                worse = (median - one) / abs(one) if direction == "minimize" else (one - median) / abs(one)
                rows.append(
                    {
                        "sweep": name,
                        "condition": condition,
                        "batch": b,
                        "seeds": args.seeds,
                        "median_best": f"{median:.6g}",
                        "worse_than_batch_1": f"{worse:+.2%}",
                        "median_seconds": f"{statistics.median(seconds[b]):.1f}",
                    }
                )
    out = ROOT / "benchmarks" / "results" / "tpe_batch.csv"
    out.parent.mkdir(exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
