"""The stacked engine's per-member optimizer and schedules: torch.optim's update formulas (Adam, AdamW, SGD,
RMSprop) on one [K, P] tensor with each member's own kind, lr, weight decay, momentum, clipping, parameter groups
and frozen blocks (`StackedOptimizer`), and each member's own learning-rate schedule (`Schedules`: torch's own
schedulers over shadow optimizers, or `Formula`, torch's recursive formulas as one float64 tensor operation for
all members). Each member's numbers are its torch.optim twin's (tests/test_vectorized.py holds them step by step).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from sweeplab.config import ExperimentConfig

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8


class StackedOptimizer:
    """torch.optim's single-tensor update formulas (Adam, AdamW, SGD, RMSprop with their defaults) on one
    [K, P] tensor holding every member's parameters, with each member's own kind, lr, weight decay and momentum.
    Each kind present is computed for all rows and selected by mask: a handful of ops per step for any K."""

    def __init__(
        self,
        flat: torch.Tensor,
        configs: list[ExperimentConfig],
        layout: Callable[[int], list[tuple[str, int]]] | None = None,
    ):
        self.flat = flat
        device = flat.device

        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

        kinds = [c.train.optimizer for c in configs]
        self.masks = {kind: column([k == kind for k in kinds], torch.bool) for kind in sorted(set(kinds))}
        self.lr = column([c.train.lr for c in configs])
        self.decay = column(
            [
                (0.01 if c.train.optimizer == "AdamW" else 0.0)
                if c.train.weight_decay is None
                else c.train.weight_decay
                for c in configs
            ]
        )
        self.momentum = column([c.train.momentum for c in configs])
        # clipping as torch.nn.utils does it, each member its own (inf: none): by value, then by the row's norm
        norms, values = [c.train.clip_grad_norm for c in configs], [c.train.clip_grad_value for c in configs]
        self.clip_norm = column([v or math.inf for v in norms]) if any(norms) else None
        self.clip_value = column([v or math.inf for v in values]) if any(values) else None
        self.coupled_decay = bool(
            ((self.decay != 0) & ~self.masks.get("AdamW", torch.zeros_like(self.lr, dtype=torch.bool))).any()
        )
        zeros = lambda: torch.zeros_like(flat)  # noqa: E731
        self.adam = (zeros(), zeros()) if {"Adam", "AdamW"} & self.masks.keys() else None
        self.square_avg = zeros() if "RMSprop" in self.masks else None
        self.rms_buf = zeros() if "RMSprop" in self.masks else None
        self.sgd_buf: torch.Tensor | None = None
        self.steps = 0
        self._fine_tuning(configs, layout)

    def _fine_tuning(self, configs: list[ExperimentConfig], layout) -> None:
        """`train.param_groups` and `train.freeze` as per-column blocks of the [K, P] tensor (`layout(row)`:
        each parameter's name and its number of columns in that member, whose MLP head is named after its own
        dropout), by the rules the reference loop applies (options.group_of,
        options.frozen_until): each block's lr scale and weight decay, and the epoch it trains from. A frozen
        block takes no update, no weight decay and no optimizer state, and its Adam steps count from when it
        trains, as torch's per-parameter state does."""
        from sweeplab.train.options import frozen_until, group_of

        self.scale = self.frozen = None
        self.epoch = 1
        if not any(c.train.param_groups or c.train.freeze for c in configs):
            return
        device, k, p = self.flat.device, *self.flat.shape
        scale, decay = torch.ones(k, p, device=device), self.decay.expand(k, p).clone()
        frozen = torch.zeros(k, p, device=device)
        for row, config in enumerate(configs):
            start = 0
            for name, size in layout(row) if layout else ():
                group = group_of(config, name)
                if group is not None:
                    scale[row, start : start + size] = group.lr_scale
                    if group.weight_decay is not None:
                        decay[row, start : start + size] = group.weight_decay
                frozen[row, start : start + size] = frozen_until(config, name)
                start += size
        self.scale = scale if bool((scale != 1).any()) else None
        self.decay = decay
        self.coupled_decay = bool(
            ((decay != 0) & ~self.masks.get("AdamW", torch.zeros(k, 1, dtype=torch.bool, device=device))).any()
        )
        if bool(frozen.any()):
            self.frozen = frozen
            self.block_steps = torch.zeros(k, p, dtype=torch.float64, device=device)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def take(self, rows: torch.Tensor, flat: torch.Tensor) -> None:
        """Keep only these members' rows of every per-member setting and state, stepping `flat` (their rows) from
        now on: each kept row then computes exactly what it computed in the whole stack (every update is per
        element, every norm per row). The flags stay as they were, so the same operations run."""
        self.flat = flat
        rows = rows.to(flat.device)
        self.masks = {kind: mask[rows] for kind, mask in self.masks.items()}
        for name in (
            "lr",
            "decay",
            "momentum",
            "clip_norm",
            "clip_value",
            "square_avg",
            "rms_buf",
            "sgd_buf",
            "scale",
            "frozen",
            "block_steps",
        ):
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[rows])
        if self.adam is not None:
            self.adam = tuple(state[rows] for state in self.adam)

    @torch.no_grad()
    def step(self) -> None:
        """One step of every member: torch's formulas, each block of columns frozen this epoch (`train.freeze`)
        keeping its value and its state, as a parameter without a gradient does in torch."""
        active = None if self.frozen is None else self.frozen < self.epoch
        param, lr = self.flat, self._rates()
        grad = self.flat.grad if active is None else torch.where(active, self.flat.grad, 0.0)  # none in the norm
        grad = self._clipped(grad)
        if active is None:
            self.steps += 1
            steps = self.steps
        else:  # each block's Adam steps count from when it trains
            self.block_steps += active
            steps = self.block_steps

        def kept(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return new if active is None else torch.where(active, new, old)

        if "AdamW" in self.masks:  # decoupled decay, before the Adam update
            param.mul_(kept(torch.where(self.masks["AdamW"], 1 - lr * self.decay, 1.0), 1.0))
        if self.coupled_decay:
            grad = grad + torch.where(self.masks.get("AdamW", False), 0.0, self.decay) * param
        delta = torch.zeros_like(param)
        if self.adam is not None:
            beta1, beta2 = ADAM_BETAS
            exp_avg, exp_avg_sq = self.adam
            exp_avg.copy_(kept(exp_avg.lerp(grad, 1 - beta1), exp_avg))
            exp_avg_sq.copy_(kept(exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2), exp_avg_sq))
            if active is None:
                correction1, correction2 = 1 - beta1**steps, (1 - beta2**steps) ** 0.5
            else:  # per column, in double as torch takes its step count, then float32 as a scalar would be
                correction1, correction2 = (1 - beta1**steps).float(), ((1 - beta2**steps) ** 0.5).float()
            denom = (exp_avg_sq.sqrt() / correction2).add_(ADAM_EPS)
            adam_mask = self.masks.get("Adam", False) | self.masks.get("AdamW", False)
            delta = torch.where(adam_mask, lr / correction1 * exp_avg / denom, delta)
        if self.square_avg is not None:
            square = self.square_avg.mul(RMSPROP_ALPHA).addcmul_(grad, grad, value=1 - RMSPROP_ALPHA)
            self.square_avg.copy_(kept(square, self.square_avg))
            avg = self.square_avg.sqrt().add_(RMSPROP_EPS)
            # momentum 0: the buffer is this step's grad/avg
            self.rms_buf.copy_(kept(self.rms_buf.mul(self.momentum).add_(grad / avg), self.rms_buf))
            delta = torch.where(self.masks["RMSprop"], lr * self.rms_buf, delta)
        if "SGD" in self.masks:
            if self.sgd_buf is None:
                self.sgd_buf = torch.zeros_like(param)
            first = steps == 1  # torch's momentum buffer starts as the parameter's first gradient
            moved = self.sgd_buf.mul(self.momentum).add_(grad)  # momentum 0: the buffer is this step's grad
            buf = (grad if first else moved) if active is None else torch.where(first, grad, moved)
            self.sgd_buf.copy_(kept(buf, self.sgd_buf))
            delta = torch.where(self.masks["SGD"], lr * self.sgd_buf, delta)
        param.sub_(kept(delta, 0.0))

    def _rates(self) -> torch.Tensor:
        """Each member's rate [K, 1], or with parameter groups each column's [K, P]."""
        return self.lr if self.scale is None else self.lr * self.scale

    def _clipped(self, grad: torch.Tensor) -> torch.Tensor:
        """clip_grad_value_, then clip_grad_norm_ (max_norm / (total_norm + 1e-6), at most 1), per member row."""
        if self.clip_value is not None:
            grad.clamp_(-self.clip_value, self.clip_value)
        if self.clip_norm is not None:
            total = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
            grad.mul_((self.clip_norm / (total + 1e-6)).clamp(max=1.0))
        return grad


class Schedules:
    """Each member's own torch scheduler, driven over a shadow optimizer of the member's own class and settings
    (one scalar parameter): torch's own learning rates, copied into the stacked optimizer's [K, 1] lr column after
    every step that changes them, and the rate each member's last step used (History.lr). Members whose per-step
    schedule is one torch computes by a recursive formula (CosineAnnealingLR, StepLR, ExponentialLR) share one
    `Formula` per setting, stepped as one tensor operation for all of them, in torch's double precision: no Python
    per member per batch."""

    def __init__(self, members: list, optimizer, steps_per_epoch: int):
        from sweeplab.train.options import build_optimizer, build_scheduler, monitor_of

        self.optimizer = optimizer
        self.rows = []  # (row, shadow, scheduler, interval, monitor or None): stepped live
        formulas: dict[tuple, list] = {}  # (kind, settings) -> [(row, its first rate)]
        for row, member in enumerate(members):
            config = member.config
            if config.train.scheduler is None:
                continue
            shadow = build_optimizer(config, [torch.zeros(1, requires_grad=True)])
            scheduler = build_scheduler(config, shadow, steps_per_epoch)
            interval = config.train.scheduler.interval
            settings = Formula.settings(scheduler)
            if interval == "step" and settings is not None:
                formulas.setdefault(settings, []).append((row, shadow.param_groups[0]["lr"]))
                continue
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            self.rows.append((row, shadow, scheduler, interval, monitor_of(config) if plateau else None))
        self.formulas = [Formula(settings, rows) for settings, rows in formulas.items()]
        scheduled = [row for row, *_ in self.rows] + [r for f in self.formulas for r in f.rows.tolist()]
        self.scheduled = torch.tensor(sorted(scheduled), dtype=torch.long)
        self.current = optimizer.lr.flatten().double().cpu()  # each member's rate now, as torch holds it (double)
        for formula in self.formulas:
            self.current[formula.rows] = formula.lr
        self.used = self.current.clone()
        self.live: torch.Tensor | None = None  # the stack's rows once compacted (fit_stacked): all members' before
        self.sync()

    def sync(self) -> None:
        for row, shadow, *_ in self.rows:
            self.current[row] = shadow.param_groups[0]["lr"]
        current = self.current if self.live is None else self.current[self.live]
        self.optimizer.lr.copy_(current.unsqueeze(1))

    def leave(self, live: torch.Tensor) -> None:
        """Only these rows are in the stack now (fit_stacked's compaction): the others' schedulers stop."""
        self.live = live
        kept = set(live.tolist())
        self.rows = [row for row in self.rows if row[0] in kept]
        self.sync()

    def after_step(self) -> None:
        self.used = self.current.clone()
        stepped = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the shadow optimizer never steps
            for _, _, scheduler, interval, _ in self.rows:
                if interval == "step":
                    scheduler.step()
                    stepped = True
        for formula in self.formulas:
            self.current[formula.rows] = formula.step()
            stepped = True
        if stepped:
            self.sync()

    def after_epoch(self, val_loss: torch.Tensor, metrics: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for row, _, scheduler, interval, monitor in self.rows:
                if interval != "epoch" or not active[row]:
                    continue
                if monitor is None:
                    scheduler.step()
                else:
                    scheduler.step(float(val_loss[row] if monitor == "val_loss" else metrics[monitor][row]))
        self.sync()


class Formula:
    """torch's recursive learning-rate formula for one scheduler setting, over the rows sharing it: the arithmetic
    torch's `get_lr` does in Python doubles per member, as float64 tensor operations in the same order, so every
    rate is torch's own (tests/test_options.py holds them equal over hundreds of steps)."""

    def __init__(self, settings: tuple, rows: list[tuple[int, float]]):
        self.kind, *self.args = settings
        self.rows = torch.tensor([row for row, _ in rows], dtype=torch.long)
        self.base = torch.tensor([rate for _, rate in rows], dtype=torch.float64)
        self.lr = self.base.clone()
        self.t = 0

    @staticmethod
    def settings(scheduler) -> tuple | None:
        """(kind, its settings) for a scheduler `Formula` steps; None for any other (stepped live)."""
        lr_scheduler = torch.optim.lr_scheduler
        kind = type(scheduler)
        if kind is lr_scheduler.CosineAnnealingLR:
            return ("cosine", scheduler.T_max, scheduler.eta_min)
        if kind is lr_scheduler.StepLR:
            return ("step", scheduler.step_size, scheduler.gamma)
        if kind is lr_scheduler.ExponentialLR:
            return ("exponential", scheduler.gamma)
        return None

    def step(self) -> torch.Tensor:
        self.t += 1
        t = self.t
        if self.kind == "cosine":  # CosineAnnealingLR.get_lr, its two recursive branches
            t_max, eta_min = self.args
            if (t - 1 - t_max) % (2 * t_max) == 0:
                self.lr = self.lr + (self.base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
            else:
                factor = (1 + math.cos(math.pi * t / t_max)) / (1 + math.cos(math.pi * (t - 1) / t_max))
                self.lr = factor * (self.lr - eta_min) + eta_min
        elif self.kind == "step":
            step_size, gamma = self.args
            if t % step_size == 0:
                self.lr = self.lr * gamma
        else:
            self.lr = self.lr * self.args[0]
        return self.lr
