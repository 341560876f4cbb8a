"""The vectorized engine without MLflow or Optuna: member set-up (ms per member) and training (trials/s) at K
members, each member drawing its own data, weights and shuffles (as before issue #14) against members that share
their draws (`prepare_member(..., shared)`, what the engine does now), side by side in one run.

The members are the default sweep's trials (seed 42; optimizer, lr, hidden and noise drawn at random), 80 epochs.
Runs on CPU here; on a GPU machine pass the device: `python benchmarks/bench_members.py cuda 256 1024 16384`.
Own draws (the slow baseline) are timed up to K = 1,024 only. Before timing, 16 mixed members are checked against
the reference loop on the same device, and after each K, 8 of its members (within the learning rates the tests
use) are: worst relative best_val_loss deviation, tolerance as in tests/test_vectorized.py.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sweeplab.config import load_experiment  # noqa: E402
from sweeplab.train.experiment import run_experiment  # noqa: E402
from sweeplab.train.stacked.epochs import group_members, prepare_member  # noqa: E402
from sweeplab.train.stacked.mlp import train_group  # noqa: E402

LAB = ROOT / "experiments" / "training_loop_lab.yaml"
LR = {"Adam": (1e-4, 0.3), "AdamW": (1e-4, 0.3), "SGD": (1e-3, 0.3), "RMSprop": (1e-4, 0.1)}


def configs(k: int, device: str, epochs: int = 80) -> list:
    """k configs; each distinct (optimizer, hidden, noise) is loaded and validated once, its learning rates set on
    copies (16,384 loads would take ~16 s)."""
    rng = random.Random(0)
    loaded: dict = {}
    out = []
    for _ in range(k):
        optimizer = rng.choice(list(LR))
        low, high = LR[optimizer]
        lr = 10 ** rng.uniform(math.log10(low), math.log10(high))
        key = (optimizer, rng.choice([4, 8, 16, 32, 64]), rng.choice([0.3, 1.0]))
        if key not in loaded:
            loaded[key] = load_experiment(
                LAB, {"optimizer": key[0], "hidden": key[1], "noise": key[2], "epochs": epochs, "device": device}
            )
        base = loaded[key]
        out.append(base.model_copy(update={"train": base.train.model_copy(update={"lr": lr})}))
    return out


OWN_DRAWS_UP_TO = 1024


def measure(k: int, device: str, share: bool) -> tuple[float, float, list, list]:
    """(set-up ms per member, training trials/s, the trained members, their configs)."""
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
    return setup / k * 1000, k / (time.perf_counter() - started), members, batch


def deviation(member, config) -> float | None:
    reference = run_experiment(config).history
    if member.history.status == reference.status == "completed":
        return abs(member.history.best_val_loss - reference.best_val_loss) / reference.best_val_loss
    return None


def spot_check(members: list, batch: list, n: int = 8) -> float:
    """Worst deviation of n members of a large group from the reference loop, among those within the tested rates."""
    tested = [i for i, c in enumerate(batch) if c.train.lr <= (0.1 if c.train.optimizer == "SGD" else 0.05)]
    picked = random.Random(2).sample(tested, min(n, len(tested)))
    return max((d for d in (deviation(members[i], batch[i]) for i in picked) if d is not None), default=0.0)


def check(device: str) -> float:
    """Worst relative best_val_loss deviation of 16 shared-draw members from the reference loop, over the learning
    rates the tests use (lr <= 0.05, SGD <= 0.1). Past those, at the edge of stability (SGD at lr 0.25, say), float
    rounding differences between a batched and a single matmul are amplified epoch after epoch and the two can
    end far apart (0.42 against 0.24), with or without shared draws."""
    rng = random.Random(1)
    batch = [
        load_experiment(
            LAB,
            {
                "optimizer": optimizer,
                "lr": 10 ** rng.uniform(-2.5, -1) if optimizer == "SGD" else 10 ** rng.uniform(-3, -1.3),
                "hidden": rng.choice([4, 16, 64]),
                "noise": rng.choice([0.3, 1.0]),
                "epochs": 40,
                "device": device,
            },
        )
        for optimizer in ["Adam", "AdamW", "SGD", "RMSprop"] * 4
    ]
    shared: dict = {}
    members = [prepare_member(i, config, shared) for i, config in enumerate(batch)]
    for group in group_members(members):
        train_group(group)
    return max(d for d in map(deviation, members, batch) if d is not None)


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    sizes = [int(arg) for arg in sys.argv[2:]] or [64, 256]
    torch.set_num_threads(1) if device == "cpu" else None
    print(
        f"device {device}; shared-draw members vs the reference loop: worst best_val_loss deviation "
        f"{check(device):.1e} (tolerance 5e-3)"
    )
    print(
        "| K | set-up, own draws | set-up, shared draws | ratio | training, own draws | training, shared draws | ratio "
        "| 8 members vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k in sizes:
        shared_setup, shared_rate, members, batch = measure(k, device, share=True)
        worst = spot_check(members, batch)
        del members
        if k <= OWN_DRAWS_UP_TO:
            own_setup, own_rate, _, _ = measure(k, device, share=False)
            own = (
                f"{own_setup:.2f} ms/member | {shared_setup:.3f} ms/member | {own_setup / shared_setup:.0f}x "
                f"| {own_rate:.0f} trials/s | {shared_rate:.0f} trials/s | {shared_rate / own_rate:.2f}x"
            )
        else:
            own = f"- | {shared_setup:.3f} ms/member | - | - | {shared_rate:.0f} trials/s | -"
        print(f"| {k} | {own} | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()
