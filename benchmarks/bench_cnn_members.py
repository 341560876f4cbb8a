"""The vectorized engine on a user's own model without MLflow or Optuna: the digits CNN of
experiments/digits_nets.py (channels 16, dropout 0, 15 epochs, batch 64) stacked K members at a time by torch.func
(stacked.train_func_group), trials/s, against the same members trained one by one by the reference loop on the same
device, side by side in one run; and the relative best_val_loss deviation of 8 stacked members from their
reference twins (median and worst). At the sweep's high SGD rates (lr 0.06, no momentum, training that oscillates)
the two engines' rounding (a grouped convolution sums in another order) starts at ~4e-7 and is amplified to ~2e-3
by epoch 15; tests/test_stacked.py holds the bar of 1e-4 at the rates it tests.

Optimizer and lr are drawn as the digits sweep draws them (Adam 3e-4..3e-2, SGD 3e-3..3e-1, log-uniform). The data
are scikit-learn's digits where scikit-learn is installed, else images of the same shape (benchmarks/digits_like.py).
Usage: python benchmarks/bench_cnn_members.py [DEVICE] [K ...]   (default: cpu 16 64; the GPU check:
cuda 256 4096)
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))  # digits_nets

from sweeplab.config import build_experiment  # noqa: E402
from sweeplab.train.experiment import run_experiment  # noqa: E402
from sweeplab.train.stacked.epochs import group_members, prepare_member  # noqa: E402
from sweeplab.train.stacked.func import train_func_group  # noqa: E402

LR = {"Adam": (3e-4, 3e-2), "SGD": (3e-3, 3e-1)}
REFERENCE_MEMBERS = 8


def configs(k: int, device: str, seed: int = 0) -> list:
    if importlib.util.find_spec("sklearn") is not None:
        data = {"source": "sklearn", "name": "digits", "val_size": 0.2}
    else:
        data = {"source": "python", "class_path": "digits_like.digits_like", "val_size": 0.2}
    rng = random.Random(seed)
    out = []
    base = None
    for _ in range(k):
        optimizer = rng.choice(list(LR))
        low, high = LR[optimizer]
        lr = 10 ** rng.uniform(math.log10(low), math.log10(high))
        if base is None:
            base = build_experiment(
                {
                    "name": "digits_cnn",
                    "task": "multiclass",
                    "seed": 0,
                    "device": device,
                    "data": data,
                    "model": {"class_path": "digits_nets.SmallCNN", "init_args": {"channels": 16, "dropout": 0.0}},
                    "train": {"optimizer": "Adam", "lr": 0.003, "epochs": 15, "batch_size": 64},
                },
                "bench_cnn_members",
                base_dir=ROOT / "benchmarks",
            )
        out.append(base.model_copy(update={"train": base.train.model_copy(update={"optimizer": optimizer, "lr": lr})}))
    return out


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stacked(batch: list, device: str) -> tuple[float, list]:
    """Trials/s of the batch stacked (set-up included), and its members."""
    synchronize(device)
    started = time.perf_counter()
    shared: dict = {}
    members = [prepare_member(i, config, shared) for i, config in enumerate(batch)]
    for group in group_members(members):
        train_func_group(group)
    synchronize(device)
    return len(batch) / (time.perf_counter() - started), members


def one_by_one(batch: list, device: str) -> tuple[float, list]:
    synchronize(device)
    started = time.perf_counter()
    histories = [run_experiment(config).history for config in batch]
    synchronize(device)
    return len(batch) / (time.perf_counter() - started), histories


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    sizes = [int(arg) for arg in sys.argv[2:]] or [16, 64]
    one_by_one(configs(1, device), device)  # warm-up: imports, first kernels
    stacked(configs(2, device), device)
    batch = configs(REFERENCE_MEMBERS, device, seed=1)
    reference_rate, histories = one_by_one(batch, device)
    _, members = stacked(batch, device)
    deviations = sorted(
        abs(m.history.best_val_loss - h.best_val_loss) / h.best_val_loss for m, h in zip(members, histories)
    )
    same_epochs = sum(m.history.best_epoch == h.best_epoch for m, h in zip(members, histories))
    print(
        f"device {device} ({torch.get_num_threads()} threads); {REFERENCE_MEMBERS} stacked members vs the reference "
        f"loop: best_val_loss deviation median {deviations[len(deviations) // 2]:.1e}, worst {deviations[-1]:.1e}, best_epoch equal {same_epochs} of "
        f"{REFERENCE_MEMBERS}; the reference loop: {reference_rate:.2f} trials/s"
    )
    print("| K members | stacked | vs the reference loop, one by one |")
    print("|---|---|---|")
    for k in sizes:
        rate, _ = stacked(configs(k, device), device)
        print(f"| {k} | {rate:.1f} trials/s | {rate / reference_rate:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
