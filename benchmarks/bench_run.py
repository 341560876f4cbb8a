"""`sweeplab run` of the lab against the seed's own script: whole-process wall time, side by side, as a ratio.

Runs the two alternately (so machine noise hits both alike), REPEATS times each, and prints the medians and the
ratio. Also checks that both print the seed's numbers. Usage: python benchmarks/bench_run.py [REPEATS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "benchmarks" / "seed_training_loop.py"
LAB = ROOT / "experiments" / "training_loop_lab.yaml"
SWEEPLAB = [sys.executable, "-m", "sweeplab", "run", str(LAB), "--no-track"]


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return time.perf_counter() - start, out


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    seed_times, ours = [], []
    timed(SWEEPLAB), timed([sys.executable, str(SEED)])  # warm the file cache for both
    for _ in range(repeats):
        t, seed_out = timed([sys.executable, str(SEED)])
        seed_times.append(t)
        t, our_out = timed(SWEEPLAB)
        ours.append(t)
    seed_lines = seed_out.splitlines()
    assert our_out.splitlines()[: len(seed_lines)] == seed_lines, "sweeplab's output differs from the seed's"
    seed_median, our_median = statistics.median(seed_times), statistics.median(ours)
    print(f"seed script            {seed_median:6.2f} s  (median of {repeats}, whole process)")
    print(f"sweeplab run --no-track {our_median:5.2f} s  (same output, line for line)")
    print(f"ratio sweeplab/seed    {our_median / seed_median:6.2f}x  (goal: <= 0.60x)")


if __name__ == "__main__":
    main()
