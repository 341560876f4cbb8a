"""Members that end leave the stack (#40): a group whose members stop at different epochs (early stopping of
several patiences, divergence, a hook's pruning, with every optimizer, schedules, clipping, class weights and
parameter groups) is trained twice, compacted and with every row kept to the end (`mlp.COMPACT = False`, the engine
before compaction). Each member's curves, best epoch, stop reason and best state must be identical, bit for bit:
a kept row computes what it computed in the whole stack."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sweeplab.config import load_experiment
from sweeplab.train.stacked import mlp, optim
from sweeplab.train.stacked.epochs import group_members, prepare_member

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "experiments" / "training_loop_lab.yaml"


def ending_configs(task: str, n: int = 12, seed: int = 0):
    """Members that end at different epochs: patience 1..4, one learning rate that diverges, the rest to the end."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        optimizer = ["Adam", "AdamW", "SGD", "RMSprop"][i % 4]
        lr = 10 ** rng.uniform(-2.5, -1.3)
        overrides = {
            "task": task,
            "optimizer": optimizer,
            "lr": 1e6 if i == 5 else lr,  # diverges in its first epochs
            "hidden": [4, 16, 32][i % 3],
            "epochs": 25,
            "seed": 42 + i % 2,
            "n_classes": 3,
        }
        if i % 6 < 4:
            overrides["train.early_stopping"] = {"patience": 1 + i % 4, "min_delta": 0.002 * (i % 3)}
        if i == 3:
            overrides["train.clip_grad_norm"] = 0.5
        if i in (7, 10):
            overrides["train.scheduler"] = {"class_path": "StepLR", "init_args": {"step_size": 3, "gamma": 0.5}}
        if i == 9:
            overrides["train.scheduler"] = {
                "class_path": "CosineAnnealingLR",
                "init_args": {"T_max": 40},
                "interval": "step",
            }
        configs.append(load_experiment(LAB, overrides))
    return configs


def trained(configs, compact: bool, monkeypatch, hook=None, sizes: list | None = None):
    monkeypatch.setattr(mlp, "COMPACT", compact)
    if sizes is not None:  # the stack's rows at each compaction
        take = optim.StackedOptimizer.take
        monkeypatch.setattr(
            optim.StackedOptimizer, "take", lambda self, rows, flat: (sizes.append(len(rows)), take(self, rows, flat))
        )
    members = [prepare_member(i, c) for i, c in enumerate(configs)]
    groups = group_members(members)
    assert len(groups) == 1, [len(g) for g in groups]  # one stack: what is compared is compaction only
    mlp.train_group(members, on_epoch=hook)
    return [m.history for m in members]


def same(a: list[float], b: list[float]) -> bool:
    """Equal bit for bit, NaN (a diverged epoch) equal to NaN."""
    return np.array_equal(np.array(a, dtype=np.float64), np.array(b, dtype=np.float64), equal_nan=True)


def prune_some(member, record):
    """A pruner's decision, of the hook: members 0 and 11 at epoch 4 (a stop that is neither patience nor NaN)."""
    return "pruned at epoch 4" if member.key in (0, 11) and record.epoch == 4 else None


@pytest.mark.parametrize("task", ["regression", "binary", "multiclass"])
def test_a_compacted_group_trains_every_member_bit_for_bit_as_the_whole_stack(task, monkeypatch):
    configs = ending_configs(task)
    whole = trained(configs, False, monkeypatch, prune_some)
    sizes = []
    compacted = trained(configs, True, monkeypatch, prune_some, sizes)
    assert sizes and sizes == sorted(sizes, reverse=True) and len(sizes) >= 3 and sizes[-1] <= 8, (
        sizes
    )  # the stack really shrank
    ends = sorted(h.epochs_run for h in whole)
    assert ends[0] < 10 and ends[-1] == 25 and len(set(ends)) >= 4  # members really end apart
    assert {h.status for h in whole} >= {"diverged", "stopped", "completed"}
    for a, b in zip(whole, compacted):
        assert same(a.train_loss, b.train_loss) and same(a.val_loss, b.val_loss)
        assert a.metrics.keys() == b.metrics.keys() and all(same(a.metrics[n], b.metrics[n]) for n in a.metrics)
        assert same(a.lr or [], b.lr or [])
        assert (a.best_epoch, a.status, a.stop_reason) == (b.best_epoch, b.status, b.stop_reason)
        if a.best_state is not None:
            assert all(torch.equal(a.best_state[n], b.best_state[n]) for n in a.best_state)


def test_a_last_survivor_keeps_a_companion_row_and_its_numbers(monkeypatch):
    """All but member 0 stop early: the stack keeps two rows (a batched matmul of one member takes another kernel,
    measured 6.4e-7 apart: docs/trust.md), and member 0 trains on bit for bit to its last epoch."""
    configs = []
    for i, optimizer in enumerate(["Adam", "SGD", "AdamW", "RMSprop", "Adam", "SGD"]):
        overrides = {"optimizer": optimizer, "lr": 0.01 * (1 + i), "hidden": [4, 16][i % 2], "epochs": 25}
        if i:
            overrides["train.early_stopping"] = {"patience": 1, "min_delta": 1.0}
        configs.append(load_experiment(LAB, overrides))
    whole = trained(configs, False, monkeypatch)
    sizes = []
    compacted = trained(configs, True, monkeypatch, sizes=sizes)
    assert whole[0].epochs_run == 25 and max(h.epochs_run for h in whole[1:]) < 25
    assert sizes[-1] == 2, sizes
    for a, b in zip(whole, compacted):
        assert same(a.train_loss, b.train_loss) and same(a.val_loss, b.val_loss)
        assert a.best_epoch == b.best_epoch


def test_a_compacted_group_with_dropout_draws_each_survivors_masks_as_before(monkeypatch):
    """With dropout, each member's masks come from its own generator: members that leave stop drawing, and the
    survivors' masks (hence curves) are the whole stack's, bit for bit."""
    configs = [
        load_experiment(
            LAB,
            {
                "optimizer": optimizer,
                "lr": 0.01,
                "hidden": [8, 16][i % 2],
                "dropout": [0.1, 0.3][i % 2],
                "seed": 42 + i % 3,
                "epochs": 20,
                **({"train.early_stopping": {"patience": 1 + i, "min_delta": 0.05}} if i < 4 else {}),
            },
        )
        for i, optimizer in enumerate(["Adam", "SGD", "AdamW", "RMSprop", "Adam", "SGD"])
    ]
    whole = trained(configs, False, monkeypatch)
    sizes = []
    compacted = trained(configs, True, monkeypatch, sizes=sizes)
    assert sizes, "no member left the stack"
    for a, b in zip(whole, compacted):
        assert same(a.train_loss, b.train_loss) and same(a.val_loss, b.val_loss)
        assert a.best_epoch == b.best_epoch
