"""Does a stacked member's result depend on its group's size? The figures behind docs/trust.md ("5.8e-5 in groups
of 2 to 6, bit for bit in 8 or 12" under AVX2; none under AVX-512).

An ArrowHead-like task (36 noisy series of 3 shapes, a 1D CNN with BatchNorm, batches of 4, 30 epochs, as in
tests/test_rerun.py) trains 12 trials of different learning rates stacked in one group; trial 0 is then trained
again beside K - 1 copies of itself. Prints, per K, the largest relative difference of its validation curve from
the group of 12, once with torch's AVX2 kernels pinned (as the sweeplab command pins them) and once with this
machine's own; then the same for two members of the digits CNN (no BatchNorm) in groups of 2, 3, 6 and 8.
Usage: python benchmarks/measure_group_size.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_rerun import SERIES
Path({folder!r}, "series.py").write_text(SERIES)
from sweeplab.config import build_experiment
from sweeplab.train.engines import Job, Routes, VectorizedEngine
raw = {{"name": "arrow", "task": "multiclass", "seed": 0,
        "data": {{"source": "python", "class_path": "series.arrowhead"}}, "model": {{"class_path": "series.BNConv"}},
        "train": {{"optimizer": "Adam", "lr": 0.01, "epochs": 30, "batch_size": 4}}}}
base = build_experiment(raw, "measure", Path({folder!r}))
def config(lr):
    c = base.model_copy(update={{"train": base.train.model_copy(update={{"lr": lr}})}})
    c._code_dir = base.code_dir
    return c
def group(configs):
    jobs = [Job(None, c) for c in configs]
    VectorizedEngine(Routes()).train(jobs, None)
    return [j.result.history.val_loss for j in jobs]
rates = [0.001 * 1.4**i for i in range(12)]
twelve = group([config(r) for r in rates])[0]
for k in (2, 3, 4, 6, 8, 12):
    alone = group([config(rates[0])] * k)[0]
    worst = max(abs(a - b) / abs(b) for a, b in zip(alone, twelve))
    print(f"  {{torch.backends.cpu.get_cpu_capability():6s}} K={{k:2d}} copies vs the group of 12: {{worst:.2g}}")
"""


# The digits CNN (no BatchNorm; experiments/digits_nets.py, 8 channels, 6 epochs): members 0 and 1 of groups of 2,
# 3, 6 and 8 members of other rates, against the group of 2 (why a user model's group is not compacted)
CNN = """
import sys
sys.path.insert(0, {experiments!r})
from sweeplab.config import load_experiment
from sweeplab.train.stacked.epochs import prepare_member
from sweeplab.train.stacked.func import train_func_group
rates = [0.003, 0.05, 0.001, 0.02, 0.002, 0.03, 0.004, 0.01]
curves = {{}}
for k in (2, 3, 6, 8):
    configs = [load_experiment({experiment!r}, {{"optimizer": ["Adam", "SGD"][i % 2], "lr": rates[i],
               "model.init_args.channels": 8, "epochs": 6}}) for i in range(k)]
    members = [prepare_member(i, c) for i, c in enumerate(configs)]
    train_func_group(members)
    curves[k] = [m.history.val_loss for m in members[:2]]
for k in (3, 6, 8):
    worst = max(abs(a - b) / b for i in range(2) for a, b in zip(curves[2][i], curves[k][i]))
    print(f"  digits CNN, members 0-1 in a group of {{k}} against a group of 2: {{worst:.2g}}")
"""


def main() -> None:
    pinned = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
    for name, extra in (("AVX2 pinned (the sweeplab command)", pinned), ("this machine's own kernels", {})):
        print(name)
        env = {k: v for k, v in os.environ.items() if k not in pinned} | extra
        with tempfile.TemporaryDirectory() as folder:
            code = CHILD.format(tests=str(ROOT / "tests"), folder=folder)
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
        cnn = CNN.format(experiments=str(ROOT / "experiments"), experiment=str(ROOT / "experiments/digits_cnn.yaml"))
        subprocess.run([sys.executable, "-c", cnn], env=env, check=True)


if __name__ == "__main__":
    main()
