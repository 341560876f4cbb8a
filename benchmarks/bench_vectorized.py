"""The vectorized engine against the reference engine: trials per second, every trial logged to MLflow.

A 1,000-trial sweep of the lab's model (80 epochs, the default sweep's space, random sampler, no pruner) with
`engine=vectorized`, whole process; the reference engine on the same sweep file for REF_TRIALS trials (its cost
per trial is flat, so trials/s carries over). Usage: python benchmarks/bench_vectorized.py [N] [REF_TRIALS]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """\
study: bench
experiment: {lab}
space:
  optimizer: {{choices: [Adam, AdamW, SGD, RMSprop]}}
  lr:
    by: optimizer
    cases:
      Adam: {{low: 1.0e-4, high: 0.3, log: true}}
      AdamW: {{low: 1.0e-4, high: 0.3, log: true}}
      SGD: {{low: 1.0e-3, high: 0.3, log: true}}
      RMSprop: {{low: 1.0e-4, high: 0.1, log: true}}
  hidden: {{choices: [4, 8, 16, 32, 64]}}
  noise: {{choices: [0.3, 1.0]}}
sampler: {{type: random, seed: 0}}
n_trials: {n}
"""


def sweep(n: int, engine: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.yaml"
        path.write_text(SWEEP.format(lab=ROOT / "experiments" / "training_loop_lab.yaml", n=n))
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sweeplab", "sweep", str(path), f"engine={engine}", "--quiet", "--no-report"],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    n_ref = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    vectorized = sweep(n, "vectorized")
    reference = sweep(n_ref, "reference")
    print(
        f"vectorized engine: {n} trials in {vectorized:6.2f} s = {n / vectorized:6.1f} trials/s "
        f"(whole process, every trial logged; goal: 1,000 in < 60 s)"
    )
    print(
        f"reference engine:  {n_ref} trials in {reference:6.2f} s = {n_ref / reference:6.1f} trials/s (whole process)"
    )
    print(f"ratio: {(n / vectorized) / (n_ref / reference):5.1f}x the reference engine's trials/s")


if __name__ == "__main__":
    main()
