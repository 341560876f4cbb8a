"""Successive halving inside stacked groups (#40): a random sweep of the default space (sweeps/
optimizer_hidden_noise.yaml: optimizer, lr by optimizer, hidden; noise 0.3 and 1.0 as conditions; 80 epochs)
with `pruner: {type: successive_halving, min_resource: MIN_RESOURCE}` (rungs at MIN_RESOURCE x 3^i epochs: 5, 15
and 45 by default; a third kept at each) against the same sweep
with no pruner, whole process (`sweeplab sweep ... --quiet --no-report`), each in a fresh folder, alternating,
ROUNDS times each. Prints the median seconds and their ratio, the member-epochs each trained (the sum of the
trials' epochs), and each condition's best validation loss and its trial, for both.

Usage: python benchmarks/bench_halving.py [N_TRIALS] [ROUNDS] [MIN_RESOURCE]   (goal: >= 1.5x at 1,000 trials, the
same best; MIN_RESOURCE, the first rung, defaults to 5)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.storages.journal import JournalFileBackend

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "optimizer_hidden_noise.yaml"


def one(n_trials: int, pruner: str, min_resource: int) -> tuple[float, int, dict[str, tuple[float, int]]]:
    with tempfile.TemporaryDirectory(prefix="sweeplab-halving-") as folder:
        spec = yaml.safe_load(SWEEP.read_text())
        spec["experiment"] = str((SWEEP.parent / spec["experiment"]).resolve())
        spec["pruner"] = {"type": pruner, "min_resource": min_resource}
        (Path(folder) / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sweeplab",
                "sweep",
                "sweep.yaml",
                f"n_trials={n_trials}",
                "sampler=random",
                "--quiet",
                "--no-report",
            ],
            cwd=folder,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(Path(folder) / "optuna.journal")))
        epochs, best = 0, {}
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials = study.get_trials(deepcopy=False)
            epochs += sum(len(t.intermediate_values) for t in trials)  # its curve: one value per epoch trained
            done = [t for t in trials if t.value is not None]
            top = min(done, key=lambda t: t.value)
            best[summary.study_name] = (top.value, top.number)
        return seconds, epochs, best


def main() -> None:
    n_trials = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    min_resource = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    times: dict[str, list[float]] = {"none": [], "successive_halving": []}
    found: dict[str, tuple] = {}
    for round_ in range(rounds):
        for pruner in ("none", "successive_halving") if round_ % 2 == 0 else ("successive_halving", "none"):
            seconds, epochs, best = one(n_trials, pruner, min_resource)
            times[pruner].append(seconds)
            found[pruner] = (epochs, best)
    for pruner, values in times.items():
        epochs, best = found[pruner]
        shown = "; ".join(f"{name}: {value:.4f} (#{number})" for name, (value, number) in sorted(best.items()))
        print(
            f"{pruner:18s} median {statistics.median(values):6.1f} s (runs {[round(v, 1) for v in values]}), "
            f"{epochs} member-epochs; best {shown}"
        )
    ratio = statistics.median(times["none"]) / statistics.median(times["successive_halving"])
    print(f"{n_trials} trials: no pruner / successive_halving = {ratio:.2f}x (goal >= 1.5x, the same best)")


if __name__ == "__main__":
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("SWEEPLAB_STORAGE", None)
    main()
