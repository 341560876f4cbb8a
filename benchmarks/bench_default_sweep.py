"""`make sweep` as a user runs it, against the textbook sweep, side by side in one run (issue #14's goals).

Textbook: bench_sweep.py's loop (DataLoader, `log_metric` per value, `log_model` per trial) on 4 fixed trials, run
before and after the sweeps; its mean time per trial times 40 is the textbook time for the default sweep. sweeplab: `sweeplab sweep
sweeps/optimizer_hidden_noise.yaml` exactly as `make sweep` runs it (40 trials, TPE, `engine: auto`, report and two
champions), whole process, each run in a fresh folder (the empty MLflow store cached in ~/.cache/sweeplab, as on
any machine after its first sweep); then the same with n_trials=1000.

Usage: python benchmarks/bench_default_sweep.py [RUNS] [BIG_TRIALS]   (goals: 40 trials in <= 1/30 of the textbook
time; 1,000 in <= 45 s)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_sweep import TEXTBOOK, TRIALS  # noqa: E402

SWEEP = ROOT / "sweeps" / "optimizer_hidden_noise.yaml"


def textbook_per_trial(n: int = 4) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-c", TEXTBOOK, repr(TRIALS[:n])], cwd=folder, check=True, capture_output=True, text=True
        ).stdout
    return float(out.strip().splitlines()[-1]) / n


def make_sweep(*overrides: str) -> float:
    with tempfile.TemporaryDirectory(prefix="sweeplab-bench-") as folder:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sweeplab", "sweep", str(SWEEP), *overrides],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        assert (Path(folder) / "reports" / "optimizer_hidden_noise" / "report.html").exists()
    return seconds


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    big = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    make_sweep()  # the first sweep on a machine migrates and caches the empty store; not counted
    before = textbook_per_trial()  # before and after the sweeps: this machine's speed drifts by ~10%
    times = [make_sweep() for _ in range(runs)]
    after = textbook_per_trial()
    median = statistics.median(times)
    per_trial = (before + after) / 2
    textbook = 40 * per_trial
    print(
        f"textbook: {before:.2f} s per trial before the sweeps, {after:.2f} s after -> 40 trials {textbook:.1f} s; "
        f"1/30 of it: {textbook / 30:.2f} s"
    )
    print(
        f"make sweep (40 trials, report on), whole process, {runs} runs: "
        + ", ".join(f"{t:.2f}" for t in times)
        + f" s; median {median:.2f} s = 1/{textbook / median:.1f} of the "
        f"textbook time (goal: 1/30)"
    )
    seconds = make_sweep(f"n_trials={big}")
    print(f"{big} trials (TPE, report on), whole process: {seconds:.1f} s (goal: 45 s for 1,000)")


if __name__ == "__main__":
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("SWEEPLAB_STORAGE", None)
    main()
