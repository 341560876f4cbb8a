"""What the loop's options cost, stacked against the reference loop, whole process (issue #29).

One sweep of the MLP on scikit-learn's digits (16 trials, random sampler, 30 epochs, lr and hidden searched), run
four ways: plain (the seed's loop) or with options (a cosine schedule, clip_grad_norm, label smoothing, early
stopping), each with `engine=vectorized` and `engine=reference`; each `python -m sweeplab sweep ... --no-report`
in a fresh folder, the four alternating, ROUNDS times. It prints the median seconds of each and the two ratios
reference / vectorized: the goal is that the options keep the ratio the plain sweep gets.

Usage: python benchmarks/bench_options.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPERIMENT = """
name: digits_mlp
task: multiclass
data: {source: sklearn, name: digits, val_size: 0.2}
model: {hidden: 32}
train: {optimizer: Adam, lr: 0.003, epochs: 30, batch_size: 32}
objective: {metric: val_accuracy}
"""
OPTIONS = """
  train:
    scheduler: {class_path: CosineAnnealingLR, init_args: {T_max: 30}}
    clip_grad_norm: 1.0
    loss: {class_path: CrossEntropyLoss, init_args: {label_smoothing: 0.1}}
    early_stopping: {patience: 5}
"""
SWEEP = """
study: options_bench
experiment: experiment.yaml
space:
  lr: {low: 3.0e-4, high: 3.0e-2, log: true}
  hidden: {choices: [16, 64]}
sampler: {type: random, seed: 0}
n_trials: 16
base:
  objective: {metric: val_accuracy}
"""


def one(options: bool, engine: str) -> float:
    with tempfile.TemporaryDirectory(prefix="sweeplab-options-") as folder:
        Path(folder, "experiment.yaml").write_text(EXPERIMENT)
        Path(folder, "s.yaml").write_text(SWEEP + (OPTIONS if options else ""))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sweeplab", "sweep", "s.yaml", f"engine={engine}", "--quiet", "--no-report"],
            cwd=folder,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    cases = [(options, engine) for options in (False, True) for engine in ("vectorized", "reference")]
    times: dict = {case: [] for case in cases}
    for round_ in range(rounds):
        for case in cases if round_ % 2 == 0 else cases[::-1]:
            times[case].append(one(*case))
    median = {case: statistics.median(values) for case, values in times.items()}
    for (options, engine), seconds in median.items():
        print(
            f"{'options' if options else 'plain  '} {engine:10s} {seconds:6.2f} s  (runs: {times[(options, engine)]})"
        )
    for options in (False, True):
        ratio = median[(options, "reference")] / median[(options, "vectorized")]
        print(f"{'options' if options else 'plain'}: reference / vectorized = {ratio:.2f}x")


if __name__ == "__main__":
    main()
