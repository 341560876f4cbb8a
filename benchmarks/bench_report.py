"""`sweeplab report` over sweeps of 125, 250 and 500 logged trials (80 epochs each): whole-process wall time.

The runs are written the way a sweep writes them (the same params, tags and metric names, through sweeplab's
Tracker), with synthetic learning curves, so the benchmark measures reading and reporting, not training.
Usage: python benchmarks/bench_report.py [N ...]
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric

from sweeplab.config import load_experiment
from sweeplab.track.recorder import begin_run
from sweeplab.track.tracker import TAG_ROLE, TAG_STATE, TAG_STUDY, TAG_TRIAL, Tracker, run_name_for

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 80


def fill(tracker: Tracker, study: str, n: int, rng: random.Random) -> None:
    experiment = tracker.experiment_id(study)
    parent = tracker.start_run(experiment, "sweep", {TAG_ROLE: "sweep", TAG_STUDY: study})
    base = load_experiment(ROOT / "experiments" / "training_loop_lab.yaml")
    for trial in range(n):
        optimizer = rng.choice(["Adam", "AdamW", "SGD", "RMSprop"])
        overrides = {
            "optimizer": optimizer,
            "lr": 10 ** rng.uniform(-4, -0.5),
            "hidden": rng.choice([4, 8, 16, 32, 64]),
            "noise": rng.choice([0.3, 1.0]),
        }
        config = load_experiment(ROOT / "experiments" / "training_loop_lab.yaml", overrides)
        run = begin_run(
            tracker,
            experiment,
            run_name_for(config, trial),
            config,
            {TAG_ROLE: "trial", TAG_STUDY: study, TAG_TRIAL: str(trial)},
            parent,
            live=False,
        )
        floor, rate = overrides["noise"] ** 2 * rng.uniform(0.8, 1.5), rng.uniform(0.02, 0.3)
        val = [floor + 30 * math.exp(-rate * e) * rng.uniform(0.9, 1.1) for e in range(1, EPOCHS + 1)]
        train = [v * rng.uniform(0.9, 1.1) for v in val]
        metrics = [Metric("train_loss", v, 0, e) for e, v in enumerate(train, 1)]
        metrics += [Metric("val_loss", v, 0, e) for e, v in enumerate(val, 1)]
        best = min(val)
        metrics += [
            Metric("best_val_loss", best, 0, val.index(best) + 1),
            Metric("best_epoch", float(val.index(best) + 1), 0, val.index(best) + 1),
        ]
        run.end("completed", tags={TAG_STATE: "COMPLETE"}, metrics=metrics)
    tracker.end_run(parent, "completed")
    del base


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [125, 250, 500]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        tracker = Tracker(uri)
        results = []
        for n in sizes:
            fill(tracker, f"bench{n}", n, rng)
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sweeplab",
                    "report",
                    f"bench{n}",
                    "--tracking-uri",
                    uri,
                    "--out",
                    f"{folder}/report{n}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            results.append((n, time.perf_counter() - start))
    for n, seconds in results:
        print(f"report over {n:4d} trials x {EPOCHS} epochs: {seconds:6.2f} s  (goal: 500 trials < 15 s)")
    (n0, t0), (n1, t1) = results[0], results[-1]
    slope = (t1 - t0) / (n1 - n0) if n1 != n0 else float("nan")
    print(f"linear fit: {t0 - slope * n0:.2f} s fixed (imports, store, figures) + {slope * 1000:.1f} ms per trial")


if __name__ == "__main__":
    main()
