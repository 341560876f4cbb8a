"""The vectorized engine on a user's own model: the digits CNN sweep (sweeps/digits_cnn.yaml, 32 trials), with
`engine=vectorized` (members stacked by torch.func) against `engine=reference` (one trial at a time), whole
process, report off, each in a fresh folder, alternately, side by side in one run. Twice: with the shipped TPE
sampler (its 8 random start-up trials stack; after them TPE asks rounds of sweep.batching.TPE_BATCH, 8 here per
condition) and with the random sampler (each condition's 16 trials at once).

Also the training alone, in this process: 12 members of one architecture (channels 8), trained stacked and one by
one. Usage: python benchmarks/bench_stacked.py [REPEATS]  (default 2)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "digits_cnn.yaml"


def sweep_seconds(engine: str, sampler: str) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-stacked-") as tmp:
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sweeplab",
                "sweep",
                str(SWEEP),
                f"engine={engine}",
                f"sampler={sampler}",
                "--no-report",
                "--quiet",
                "--tracking-uri",
                f"sqlite:///{tmp}/r.db",
                "--storage",
                f"journal:{tmp}/optuna.journal",
            ],
            cwd=tmp,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def training_alone() -> tuple[float, float]:
    from sweeplab.sweep.spec import load_sweep
    from sweeplab.train.engines import Job, engine_named

    sweep = load_sweep(SWEEP)
    configs = [
        sweep.config_for({"optimizer": "Adam", "lr": 0.003 * (1 + i / 10), "channels": 8, "dropout": 0.0})
        for i in range(12)
    ]
    engine_named("reference").train([Job(None, configs[0])], None)  # warm-up
    jobs = [Job(None, c) for c in configs]
    start = time.perf_counter()
    engine_named("reference").train(jobs, None)
    reference = time.perf_counter() - start
    jobs = [Job(None, c) for c in configs]
    start = time.perf_counter()
    engine_named("vectorized").train(jobs, None)
    return reference, time.perf_counter() - start


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for sampler in ("tpe", "random"):
        times = {"reference": [], "vectorized": []}
        for _ in range(repeats):
            for engine in times:
                times[engine].append(sweep_seconds(engine, sampler))
        ref, vec = statistics.median(times["reference"]), statistics.median(times["vectorized"])
        print(
            f"digits CNN sweep, 32 trials, {sampler:6s}: reference {ref:6.1f} s, vectorized {vec:6.1f} s, "
            f"{ref / vec:.2f}x (whole process, median of {repeats}; goal >= 2x, issue #40)"
        )
    reference, stacked = training_alone()
    print(
        f"training alone, 12 members of one shape, 15 epochs: one by one {reference:.2f} s, stacked {stacked:.2f} s, "
        f"{reference / stacked:.2f}x"
    )


if __name__ == "__main__":
    main()
