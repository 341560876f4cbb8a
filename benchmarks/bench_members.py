"""The vectorized engine without MLflow or Optuna: member set-up (ms per member) and training (trials/s) at K
members, each member drawing its own data, weights and shuffles (as before issue #14) against members that share
their draws (`prepare_member(..., shared)`, what the engine does now), side by side in one run.

The members are the default sweep's trials (seed 42; optimizer, lr, hidden and noise drawn at random), 80 epochs.
Runs on CPU here; on a GPU machine pass the device: `python benchmarks/bench_members.py cuda 256 1024 16384`.
Before timing, one member of each K is checked against the reference loop on the same device (tolerance as in
tests/test_vectorized.py).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sweeplab.config import load_experiment  # noqa: E402
from sweeplab.experiment import run_experiment  # noqa: E402
from sweeplab.vectorized import group_members, prepare_member, train_group  # noqa: E402

LAB = ROOT / "experiments" / "training_loop_lab.yaml"
LR = {"Adam": (1e-4, 0.3), "AdamW": (1e-4, 0.3), "SGD": (1e-3, 0.3), "RMSprop": (1e-4, 0.1)}


def configs(k: int, device: str, epochs: int = 80) -> list:
    rng = random.Random(0)
    out = []
    for _ in range(k):
        optimizer = rng.choice(list(LR))
        low, high = LR[optimizer]
        out.append(load_experiment(LAB, {"optimizer": optimizer, "lr": 10 ** rng.uniform(*map(__import__("math").log10, (low, high))),
                                         "hidden": rng.choice([4, 8, 16, 32, 64]), "noise": rng.choice([0.3, 1.0]),
                                         "epochs": epochs, "device": device}))
    return out


def measure(k: int, device: str, share: bool) -> tuple[float, float]:
    """(set-up ms per member, training trials/s)."""
    batch = configs(k, device)
    shared: dict | None = {} if share else None
    started = time.perf_counter()
    members = [prepare_member(i, config, shared) for i, config in enumerate(batch)]
    setup = time.perf_counter() - started
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for group in group_members(members):
        train_group(group)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return setup / k * 1000, k / (time.perf_counter() - started)


def check(device: str) -> float:
    """Worst relative best_val_loss deviation of 16 shared-draw members from the reference loop, over the learning
    rates the tests use (lr <= 0.05, SGD <= 0.1). Past those, at the edge of stability (SGD at lr 0.25, say), float
    rounding differences between a batched and a single matmul are amplified epoch after epoch and the two can
    end far apart (0.42 against 0.24), with or without shared draws."""
    rng = random.Random(1)
    batch = [load_experiment(LAB, {"optimizer": optimizer, "lr": 10 ** rng.uniform(-2.5, -1) if optimizer == "SGD"
                                   else 10 ** rng.uniform(-3, -1.3), "hidden": rng.choice([4, 16, 64]),
                                   "noise": rng.choice([0.3, 1.0]), "epochs": 40, "device": device})
             for optimizer in ["Adam", "AdamW", "SGD", "RMSprop"] * 4]
    shared: dict = {}
    members = [prepare_member(i, config, shared) for i, config in enumerate(batch)]
    for group in group_members(members):
        train_group(group)
    worst = 0.0
    for member, config in zip(members, batch):
        reference = run_experiment(config).history
        if member.history.status == reference.status == "completed":
            worst = max(worst, abs(member.history.best_val_loss - reference.best_val_loss) / reference.best_val_loss)
    return worst


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    sizes = [int(arg) for arg in sys.argv[2:]] or [64, 256]
    torch.set_num_threads(1) if device == "cpu" else None
    print(f"device {device}; shared-draw members vs the reference loop: worst best_val_loss deviation "
          f"{check(device):.1e} (tolerance 5e-3)")
    print("| K | set-up, own draws | set-up, shared draws | ratio | training, own draws | training, shared draws | ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in sizes:
        own_setup, own_rate = measure(k, device, share=False)
        shared_setup, shared_rate = measure(k, device, share=True)
        print(f"| {k} | {own_setup:.2f} ms/member | {shared_setup:.3f} ms/member | {own_setup / shared_setup:.0f}x "
              f"| {own_rate:.0f} trials/s | {shared_rate:.0f} trials/s | {shared_rate / own_rate:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
