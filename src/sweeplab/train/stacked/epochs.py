"""The vectorized engine: train a whole batch of trials at once.

For the small models sweeplab sweeps, a trial's time goes to Python and dispatch overhead, not arithmetic. So
trials that share a shape (hidden size, optimizer kind, batch size, split sizes, epochs, task) are stacked: the
K members' weights live in [K, ...] tensors, one batched matmul (`baddbmm`) runs all K forwards, one backward
computes every member's own gradients (the members are independent, so d(sum of losses)/d(member k) is member
k's gradient), and the optimizer update is the torch.optim formula applied to the stacked state with per-member
hyperparameters. Mixed hidden sizes are zero-padded (proof at the padding) and mixed optimizers masked.

Each member is set up exactly as the reference loop would set it up (same seed, data, split, initial weights,
shuffling generator consumed as a DataLoader consumes it), and keeps what the reference keeps: per-epoch
train/val loss and task metrics, best_epoch, best state (CPU), divergence, pruning. Summation order inside the
batched matmul differs, so curves agree to float rounding, not bit for bit (see tests/test_vectorized.py).

Supported here: one hidden layer MLPs, dropout too (the lab's family), Adam/AdamW/SGD/RMSprop, all three tasks;
parameter groups and frozen parameters as per-column blocks. The MLP's forward is mlp.py; a user's own model is
stacked by func.py, both through the same epoch loop (`fit_stacked`). Why ~700 lines: what a member is, what
groups, the per-member loss, the per-member optimizer and schedules, and the epoch loop over them are one
contract (each member exactly its reference twin), and each part is written for [K] members only here.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parameter import is_lazy

from sweeplab.config import LOSSES, ConfigError, ExperimentConfig, logged_metrics, loss_class_name, own_metrics
from sweeplab.train import batch
from sweeplab.train.data import Dataset, make_dataset
from sweeplab.train.epoch import (
    RANKING,
    Curves,
    History,
    draw_order,
    sample_average,
    stacked_classification_metrics,
    stacked_regression_metrics,
)
from sweeplab.train.experiment import model_spec_for
from sweeplab.train.init import start_from
from sweeplab.train.loop import ShapeError
from sweeplab.train.model import ModelSpec, architecture, build_model

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8


def check_supported(config: ExperimentConfig) -> None:
    """What the engine can stack, said of the config alone: a setting it cannot apply exactly sends the trial to the
    reference loop (engine: auto) or is refused (engine: vectorized), never ignored. A user's model (`class_path`)
    is stacked by torch.func (func.py); whether vmap can run it exactly is found by func.stack_problem. A sweep
    judges each config once (engines.Routes, carried on its plan); a schedule is stepped to judge it."""
    _check_supported(config)


def _check_supported(config: ExperimentConfig) -> None:
    train = config.train
    if config.data.collate_fn is not None:
        raise ConfigError(
            "engine: vectorized stacks in-memory batches of one shape; not data.collate_fn (its batches' shapes are "
            "the function's)"
        )
    if not isinstance(train.optimizer, str):
        raise ConfigError("engine: vectorized stacks Adam, AdamW, SGD and RMSprop; not train.optimizer.class_path")
    problem = loss_problem(config)
    if problem:
        raise ConfigError(f"engine: vectorized {problem}")
    if train.accumulate_grad_batches != 1:
        raise ConfigError("engine: vectorized does not support train.accumulate_grad_batches")
    if train.param_groups and train.scheduler is not None:  # a schedule over groups: torch's own, per group
        raise ConfigError(
            "engine: vectorized schedules one learning rate per member; not train.param_groups with a scheduler"
        )
    if own_metrics(config):
        raise ConfigError("engine: vectorized computes the built-in metrics; not metrics.class_path (yours)")
    if train.precision != "32":
        raise ConfigError("engine: vectorized trains in float32; not train.precision " + train.precision)
    if train.scheduler is not None:
        changes = schedule_changes_more_than_lr(config)
        if changes:
            raise ConfigError(f"engine: vectorized applies a schedule's learning rates; {changes}")
    if config.model.class_path is not None:
        return
    if len(config.model.hidden_sizes) != 1:
        raise ConfigError("engine: vectorized trains one-hidden-layer MLPs; model.hidden must be one size")


def data_problem(dataset: Dataset) -> str | None:
    """Why a member's data cannot be stacked (a few words), or None: the stacked engine keeps every member's data
    on the device as tensors, so a Dataset read lazily through a DataLoader trains on the reference loop."""
    if dataset.lazy:
        return f"{dataset.description.split(' (')[0]} is a Dataset read lazily through a DataLoader"
    return None


def schedule_changes_more_than_lr(config: ExperimentConfig, steps: int = 40) -> str | None:
    """Whether the config's scheduler changes more than the learning rate (OneCycleLR and CyclicLR cycle momentum
    or Adam's beta1 by default), found by stepping it over a shadow optimizer: the stacked optimizers take each
    member's rate from its own scheduler, and nothing else."""
    from sweeplab.train.options import build_optimizer, build_scheduler  # the options import torch.optim's classes

    shadow = build_optimizer(config, [torch.zeros(1, requires_grad=True)])
    scheduler = build_scheduler(config, shadow, steps)
    before = {key: value for key, value in shadow.param_groups[0].items() if key not in ("lr", "params")}
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": the shadow never steps
        for _ in range(min(steps, config.train.epochs)):
            scheduler.step(1.0) if plateau else scheduler.step()
            group = shadow.param_groups[0]
            changed = sorted(key for key, value in before.items() if group.get(key) != value)
            if changed:
                name = config.train.scheduler.class_path
                return f"{name} also changes {', '.join(changed)} (give cycle_momentum: false to stack it)"
    return None


class _Schedules:
    """Each member's own torch scheduler, driven over a shadow optimizer of the member's own class and settings
    (one scalar parameter): torch's own learning rates, copied into the stacked optimizer's [K, 1] lr column after
    every step that changes them, and the rate each member's last step used (History.lr). Members whose per-step
    schedule is one torch computes by a recursive formula (CosineAnnealingLR, StepLR, ExponentialLR) share one
    `_Formula` per setting, stepped as one tensor operation for all of them, in torch's double precision: no Python
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
            settings = _Formula.settings(scheduler)
            if interval == "step" and settings is not None:
                formulas.setdefault(settings, []).append((row, shadow.param_groups[0]["lr"]))
                continue
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            self.rows.append((row, shadow, scheduler, interval, monitor_of(config) if plateau else None))
        self.formulas = [_Formula(settings, rows) for settings, rows in formulas.items()]
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


class _Formula:
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
        """(kind, its settings) for a scheduler `_Formula` steps; None for any other (stepped live)."""
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


@dataclass
class Member:
    """One trial inside a stacked group: its config, data and random generators, and what it has produced."""

    key: object  # the caller's handle (an engine's Job)
    config: ExperimentConfig
    dataset: Dataset
    spec: ModelSpec
    init_state: dict[str, torch.Tensor]
    shuffle_gen: torch.Generator | None
    global_gen: torch.Generator  # the global RNG as the reference loop would see it after building the model
    history: History = field(default_factory=History)  # train_group's, once trained
    started: float = field(default_factory=time.time)


def prepare_member(key: object, config: ExperimentConfig, shared: dict | None = None) -> Member:
    """Seed, data, split and initial weights exactly as `run_experiment` draws them.

    Members that would draw the same things share them (`shared`, one dict per batch): the same seed and data
    settings give the same data set and leave the global RNG in the same state; with the same model shape that
    state gives the same initial weights; and generators in the same state consume alike. So each distinct data
    set, initial weight set and pair of generators is made once, and `train_group` draws each distinct shuffle
    order once per epoch. In the default sweep (one seed) that is two data sets and five weight sets for any
    number of members. The config is one the engine supports (engines.Routes judged it)."""
    shared = {} if shared is None else shared
    data_key = (config.seed, config.task, config.data.model_dump_json())
    if data_key not in shared:
        torch.manual_seed(config.seed)
        dataset = make_dataset(config)
        shared[data_key] = (dataset, torch.get_rng_state())
    dataset, rng_after_data = shared[data_key]
    spec = model_spec_for(config, dataset)
    train = config.train
    # everything that decides what the generators draw, and how often: the batches' shape, not the optimizer
    draws_key = (
        data_key,
        repr(spec),
        config.model.model_dump_json(include={"init_from"}),  # other first weights
        config.device,
        config.objective.model_dump_json(),  # in group_key: members of two groups must not share generators
        logged_metrics(config),
        train.model_dump_json(
            exclude={
                "optimizer",
                "lr",
                "weight_decay",
                "momentum",
                "clip_grad_norm",
                "clip_grad_value",
                "early_stopping",
            }
        ),
    )
    if draws_key not in shared:
        torch.set_rng_state(rng_after_data)
        model = build_model(spec, config.code_dir)
        start_from(config, model)  # model.init_from: every member starts from the loaded weights
        global_gen = torch.Generator()
        global_gen.set_state(torch.get_rng_state())
        shuffle_gen = torch.Generator().manual_seed(train.shuffle_seed) if train.shuffle_seed is not None else None
        # a lazy module's parameters have no values before its first batch: stacked.stack_problem refuses it
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not is_lazy(v)}
        shared[draws_key] = (state, shuffle_gen, global_gen)
    init_state, shuffle_gen, global_gen = shared[draws_key]
    return Member(key, config, dataset, spec, init_state, shuffle_gen, global_gen)


def model_key(member: Member) -> tuple | str:
    """What decides whether members can share one model. The MLP: its activation (hidden sizes are padded). A
    user's model: its class, every init arg (a dropout rate, an activation's name and a flag change what the one
    shared module computes, not only the shapes they give) and its parameters' and buffers' names, shapes and
    dtypes (model.architecture)."""
    spec = member.spec
    if spec.class_path is None:  # with dropout the head is net.3, not net.2; the rate is each member's own
        return member.config.model.activation, spec.dropout > 0
    return (spec.class_path, json.dumps(spec.init_args, sort_keys=True, default=repr), architecture(member.init_state))


def group_key(member: Member) -> tuple:
    """Members that can share one stacked model (`model_key`). Hidden sizes and optimizers may differ (padding
    and masks, below); everything that shapes the batches may not."""
    c, d = member.config, member.dataset
    return (
        model_key(member),
        c.train.batch_size,
        c.train.val_batch_size or d.n_val,
        c.train.epochs,
        c.train.shuffle,
        c.task,
        _loss_kind(c),  # the loss's class; its init args are per member (StackedLoss)
        d.n_train,
        d.n_val,
        batch.structure(d.x_train),  # one tensor's or several inputs' dtypes and shapes
        d.n_outputs,
        c.device,
        c.objective.metric,
        c.objective.direction,
        logged_metrics(c),
    )


# torch.nn losses the stacked engine reduces per member exactly as torch reduces them for one, with the init args
# it applies; any other loss (or init arg) sends the trial to the reference loop
STACKED_LOSSES = {
    "MSELoss": set(),
    "L1Loss": set(),
    "HuberLoss": {"delta"},
    "SmoothL1Loss": {"beta"},
    "CrossEntropyLoss": {"weight", "label_smoothing"},
    "BCEWithLogitsLoss": {"pos_weight"},
}


def _loss_kind(config: ExperimentConfig) -> str:
    """The torch loss class a config trains with (`mse` in a classifier is its task's own)."""
    loss = config.train.loss
    if not isinstance(loss, str):
        return loss.class_path
    return loss_class_name(loss, config.task)


def loss_problem(config: ExperimentConfig) -> str | None:
    loss = config.train.loss
    if isinstance(loss, str):
        return None
    if loss.class_path not in STACKED_LOSSES:
        return f"stacks {', '.join(STACKED_LOSSES)} by short name; not train.loss {loss.class_path}"
    extra = sorted(set(loss.init_args) - STACKED_LOSSES[loss.class_path])
    if extra:
        return f"stacks {loss.class_path} without {', '.join(extra)}"
    return None


class StackedLoss:
    """The members' loss, [K] per-member means, each reduced as torch reduces it for one member: built per member
    (options.build_loss, so `balanced` weights are each member's own) and applied to all at once. A group's members
    share the loss and its plain init args (group_key); class weights may differ per member ([K, C])."""

    def __init__(self, members: list):
        from sweeplab.train.options import build_loss

        modules = [build_loss(m.config, m.dataset.y_train, m.dataset.n_classes) for m in members]
        k = len(modules)
        first = modules[0]
        self.kind = type(first).__name__

        def column(name: str, default: float) -> float | torch.Tensor:
            """One value for all members (torch's fused loss takes it), or a [K, 1, 1] column when they differ."""
            values = [float(getattr(m, name, default)) for m in modules]
            return values[0] if len(set(values)) == 1 else torch.tensor(values).view(k, 1, 1)

        # each member's own: a searched delta, beta or label smoothing need not split the group
        self.delta, self.beta, self.smoothing = (
            column("delta", 1.0),
            column("beta", 1.0),
            column("label_smoothing", 0.0),
        )
        self.weight = self._rows([getattr(m, "weight", None) for m in modules], members[0].dataset.n_classes)
        self.pos_weight = self._rows([getattr(m, "pos_weight", None) for m in modules], members[0].dataset.n_outputs)

    @staticmethod
    def _rows(values: list, width: int) -> torch.Tensor | None:
        """Per-member class weights as [K, 1, width] (ones for a member without), or None when none has any."""
        if all(value is None for value in values):
            return None
        rows = [torch.ones(width) if value is None else value.reshape(-1).float().expand(width) for value in values]
        return torch.stack(rows).unsqueeze(1)

    def take(self, rows: torch.Tensor) -> None:
        """Keep only these members' rows (a compacted stack: fit_stacked)."""
        for name in ("weight", "pos_weight", "delta", "beta", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[rows.to(value.device)])

    def to(self, device: torch.device) -> "StackedLoss":
        for name in ("weight", "pos_weight", "delta", "beta", "smoothing"):
            value = getattr(self, name)
            setattr(self, name, value.to(device) if isinstance(value, torch.Tensor) else value)
        return self

    def __call__(self, out: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
        return _member_loss(out, target, task, self)


def _member_loss(out: torch.Tensor, target: torch.Tensor, task: str, loss) -> torch.Tensor:
    """Per-member mean loss, [K]: the reference's loss, reduced over each member's batch only. Outputs that do not
    fit the labels (a model whose output shape changes between batches) fail as loop.check_batch fails them.
    `loss`: a StackedLoss, or a name (a probe's)."""
    fits = out.shape[:2] == target.shape if task == "multiclass" else out.shape == target.shape
    if not fits:
        raise ShapeError(
            f"the model's output {list(out.shape[1:])} does not fit the labels {list(target.shape[1:])} of this batch"
        )
    kind = loss.kind if isinstance(loss, StackedLoss) else LOSSES.get(loss, (None, loss))[1]
    if task == "multiclass":
        k, b, c = out.shape
        smoothing = loss.smoothing if isinstance(loss, StackedLoss) else 0.0
        weight = loss.weight if isinstance(loss, StackedLoss) else None
        if weight is None and not isinstance(smoothing, torch.Tensor):  # torch's fused loss, one smoothing for all
            flat = F.cross_entropy(
                out.reshape(k * b, c), target.reshape(k * b), reduction="none", label_smoothing=smoothing
            )
            return flat.view(k, b).mean(1)
        # torch's formula: (1 - eps) w[y] (-log p_y) + eps/C sum_c w_c (-log p_c); its mean divides by sum of w[y]
        logp = F.log_softmax(out, dim=2)
        labels = target.long().unsqueeze(2)
        weight = torch.ones(1, 1, c, device=out.device, dtype=out.dtype) if weight is None else weight
        picked = weight.expand(k, b, c).gather(2, labels).squeeze(2)  # [K, B]: w[y_i]
        nll = -logp.gather(2, labels).squeeze(2) * picked
        if isinstance(smoothing, torch.Tensor) or smoothing:
            eps = smoothing.view(k, 1) if isinstance(smoothing, torch.Tensor) else smoothing
            nll = (1 - eps) * nll + eps * (-(logp * weight).sum(dim=2) / c)
        return nll.sum(1) / picked.sum(1)
    if task == "binary":
        pos_weight = loss.pos_weight if isinstance(loss, StackedLoss) else None
        return F.binary_cross_entropy_with_logits(out, target, reduction="none", pos_weight=pos_weight).mean(dim=(1, 2))
    if kind == "L1Loss":
        return (out - target).abs().mean(dim=(1, 2))
    if kind == "HuberLoss":
        delta = loss.delta if isinstance(loss, StackedLoss) else 1.0
        if not isinstance(delta, torch.Tensor):
            return F.huber_loss(out, target, reduction="none", delta=delta).mean(dim=(1, 2))
        error = (out - target).abs()  # torch's: 0.5 e^2 below delta, delta (|e| - delta / 2) above
        return torch.where(error < delta, 0.5 * error * error, delta * (error - 0.5 * delta)).mean(dim=(1, 2))
    if kind in ("SmoothL1Loss", "smooth_l1"):
        beta = loss.beta if isinstance(loss, StackedLoss) else 1.0
        if not isinstance(beta, torch.Tensor):
            return F.smooth_l1_loss(out, target, reduction="none", beta=beta).mean(dim=(1, 2))
        error = (out - target).abs()  # torch's: 0.5 e^2 / beta below beta, |e| - beta / 2 above
        return torch.where(error < beta, 0.5 * error * error / beta, error - 0.5 * beta).mean(dim=(1, 2))
    return (out - target).pow(2).mean(dim=(1, 2))


class _StackedOptimizer:
    """torch.optim's single-tensor update formulas (Adam, AdamW, SGD, RMSprop with their defaults) on one
    [K, P] tensor holding every member's parameters, with each member's own kind, lr, weight decay and momentum.
    Each kind present is computed for all rows and selected by mask: a handful of ops per step for any K."""

    def __init__(self, flat: torch.Tensor, configs: list[ExperimentConfig], layout: list[tuple[str, int]] = ()):
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
        """`train.param_groups` and `train.freeze` as per-column blocks of the [K, P] tensor (`layout`: each
        parameter's name and its number of columns), by the rules the reference loop applies (options.group_of,
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
            for name, size in layout:
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


def _distinct(members: list[Member], key) -> tuple[list[Member], torch.Tensor]:
    """One member for each distinct `key(member)`, and each member's row in that list."""
    first: dict = {}
    rows = [first.setdefault(key(m), (len(first), m))[0] for m in members]
    return [m for _, m in first.values()], torch.tensor(rows)


def stack_data(members: list[Member], device: torch.device, flatten: bool = False):
    """Each distinct data set once on the device, and each member's row of it: (x_train, y_train, x_val, y_val,
    which), the training sets [S, N, ...] gathered per member by `which` every epoch, the validation sets [K, ...]."""
    owners, which = _distinct(members, lambda m: id(m.dataset))
    which, sets = which.to(device), [m.dataset for m in owners]
    shape = (lambda x: x.flatten(1)) if flatten else (lambda x: x)  # the MLP takes an image's pixels as features
    x_train = batch.to(batch.stack([shape(d.x_train) for d in sets]), device)  # several inputs: each stacked
    y_train = torch.stack([d.y_train for d in sets]).to(device)
    x_val = batch.take(batch.to(batch.stack([shape(d.x_val) for d in sets]), device), which)
    y_val = torch.stack([d.y_val for d in sets]).to(device)[which]
    return x_train, y_train, x_val, y_val, which


def train_step(forward, flat: torch.Tensor, optimizer: _StackedOptimizer, xb, yb, task: str, loss):
    """The seed's six lines for K members at once: forward, loss, zero_grad, backward, step; the [K] losses."""
    losses = _member_loss(forward(flat, xb, True), yb, task, loss)
    flat.grad = None
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def fit_stacked(
    members: list[Member],
    data,
    flat: torch.Tensor,
    forward,
    buffers: dict[str, torch.Tensor],
    on_epoch=None,
    each_epoch=None,
    layout: list[tuple[str, int]] = (),
    compact: bool = False,
    dropout=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The epoch loop both stacked paths share (fit's, for K members): each member's batch order as the reference
    draws it, `forward(flat, x [K, B, ...], training)` -> outputs [K, B, C], one backward, each member's
    optimizer, validation, the curves and decisions (epoch.Curves, as the reference loop takes them at K = 1), the
    hook. `flat` [K, P] holds every member's parameters; `buffers` ({name: [K, ...]}, BatchNorm's statistics) are
    updated by the forward in training. Leaves each member's History on it and returns the best parameters and
    buffers (each member's row at its best epoch).

    `compact`: members that end (early stopping, divergence, a pruner) leave the stack at the end of their epoch:
    the survivors' rows of the parameters, optimizer state, settings, loss weights, validation data and schedules
    are gathered into a smaller stack, and only their generators draw. Each survivor computes what it computed in
    the whole stack, bit for bit, where the forward's kernels do not depend on how many members they batch (the
    MLP's batched matmuls for two members or more: at least two rows are kept; tests/test_compact.py).

    `dropout(draw_from, draw_row, batch size)`: each row's dropout noise for a training batch, drawn from the
    members' own generators where the reference loop's forward draws it (the MLP's; mlp.py), given to the
    forward as `noise`."""
    first = members[0]
    config, dataset = first.config, first.dataset
    train, task = config.train, config.task
    device = flat.device
    k = len(members)
    x_train, y_train, x_val, y_val, which = data
    optimizer = _StackedOptimizer(flat, [m.config for m in members], layout)
    loss = StackedLoss(members).to(device)
    wanted = set(logged_metrics(config))  # the group's (group_key): the same for every member
    n_train, n_val = dataset.n_train, dataset.n_val
    scheduled = any(m.config.train.scheduler is not None for m in members)
    schedules = _Schedules(members, optimizer, math.ceil(n_train / train.batch_size)) if scheduled else None
    val_batch = train.val_batch_size or n_val
    best = flat.detach().clone()
    best_buffers = {name: value.clone() for name, value in buffers.items()}
    stopping = [m.config.train.early_stopping for m in members]
    curves = Curves(
        k,
        train.epochs,
        (config.objective.metric, config.objective.direction),
        [(s.patience, s.min_delta) if s else None for s in stopping],
    )
    live = torch.arange(k)  # each row of the stack: its member (fewer rows once compacted)
    started = time.perf_counter()
    # members that share their generators share their draws: one batch order per distinct pair per epoch, sent to
    # the device once and gathered there for every member
    draw_from, draw_row = _distinct(members, lambda m: (id(m.shuffle_gen), id(m.global_gen)))
    draw_row = draw_row.to(device)
    for epoch in range(1, train.epochs + 1):
        if each_epoch is not None:
            each_epoch()
        optimizer.begin_epoch(epoch)
        drawn = [draw_order(n_train, train.shuffle, m.shuffle_gen, m.global_gen) for m in draw_from]
        if train.shuffle:
            index = torch.stack(drawn).to(device)[draw_row]
            rows = which.unsqueeze(1)
            xs, ys = batch.take(x_train, (rows, index)), y_train[rows, index]
        else:
            xs, ys = batch.take(x_train, which), y_train[which]
        batch_losses, sizes = [], []
        for start in range(0, n_train, train.batch_size):
            end = start + train.batch_size
            xb, yb = batch.take(xs, (slice(None), slice(start, end))), ys[:, start:end]
            step_forward = forward
            if dropout is not None:  # drawn before the forward, as nn.Dropout draws in it
                noise = dropout(draw_from, draw_row, yb.shape[1])
                step_forward = lambda values, x, training, noise=noise: forward(values, x, training, noise)  # noqa: E731
            batch_losses.append(train_step(step_forward, flat, optimizer, xb, yb, task, loss))
            sizes.append(yb.shape[1])
            if schedules is not None:
                schedules.after_step()
        train_loss = sample_average(batch_losses, sizes, n_train)
        for m in draw_from:  # the reference's validation loader draws a base seed from the global RNG
            torch.empty((), dtype=torch.int64).random_(generator=m.global_gen)
        with torch.no_grad():
            val_losses, val_sizes, outputs = [], [], []
            for start in range(0, n_val, val_batch):
                out = forward(flat, batch.take(x_val, (slice(None), slice(start, start + val_batch))), False)
                val_losses.append(_member_loss(out, y_val[:, start : start + val_batch], task, loss))
                val_sizes.append(out.shape[1])
                outputs.append(out)
            val_loss = sample_average(val_losses, val_sizes, n_val)
        if task == "regression":
            metrics = stacked_regression_metrics(torch.cat(outputs, dim=1), y_val) if wanted else {}
            confusion = None
        else:
            metrics, confusion = stacked_classification_metrics(
                torch.cat(outputs, dim=1), y_val, task, ranking=bool(wanted & RANKING)
            )
        metrics = {name: values for name, values in metrics.items() if name in wanted}
        if len(live) < k:  # every member's row again: those that left the stack are NaN (they record nothing)
            train_loss, val_loss = _widened(train_loss, live, k), _widened(val_loss, live, k)
            metrics = {name: _widened(values, live, k) for name, values in metrics.items()}
            confusion = _widened(confusion, live, k, 0) if confusion is not None else None
        if schedules is not None:  # the rate each member's last step used, then its epoch-interval schedule
            curves.lr[schedules.scheduled, epoch - 1] = schedules.used[schedules.scheduled]
            schedules.after_epoch(val_loss, metrics, curves.active)
        improved = curves.record(epoch, train_loss, val_loss, metrics, confusion)
        reasons = _hook_reasons(curves, members, epoch, train_loss, val_loss, metrics, improved, on_epoch)
        curves.stop(epoch, train_loss, val_loss, reasons)
        kept = improved[live]  # each improved member's row, in one masked copy: its best_state, taken at the end
        if kept.any():
            mask = kept.to(device)
            if len(live) == k:
                best.copy_(torch.where(mask.unsqueeze(1), flat.detach(), best))
            else:
                best[live[kept].to(device)] = flat.detach()[mask]
            for name, value in buffers.items():
                best_buffers[name].copy_(
                    torch.where(mask.view(k, *(1,) * (value.dim() - 1)), value, best_buffers[name])
                )
        if not curves.active.any():
            break
        stays = curves.active[live]
        if compact and len(live) > 2 and not bool(stays.all()):
            if int(stays.sum()) < 2:  # one survivor keeps a companion: the MLP's kernels differ for one member
                stays[(~stays).nonzero()[0]] = True
            rows = stays.nonzero().flatten()
            on_device = rows.to(device)
            flat = flat.detach()[on_device].clone().requires_grad_()
            optimizer.take(rows, flat)
            loss.take(rows)
            which = which[on_device]
            x_val, y_val = batch.take(x_val, on_device), y_val[on_device]
            live = live[rows]
            draw_from, draw_row = _distinct(
                [members[i] for i in live.tolist()], lambda m: (id(m.shuffle_gen), id(m.global_gen))
            )
            draw_row = draw_row.to(device)
            if schedules is not None:
                schedules.live = live
                schedules.sync()
    elapsed = time.perf_counter() - started
    for m, history in zip(members, curves.histories()):
        m.history = history
        history.seconds = elapsed / k
        if m.config.train.param_groups:  # each group's rate per epoch, as the reference loop logs them
            n, lr = history.epochs_run, m.config.train.lr
            history.lr = [lr] * n
            history.group_lr = {g.name: [lr * g.lr_scale] * n for g in m.config.train.param_groups}
    return best, best_buffers


def _widened(values: torch.Tensor, live: torch.Tensor, k: int, fill: float = math.nan) -> torch.Tensor:
    """[rows of the stack, ...] as [K, ...]: each member's value at its row, `fill` for the members not in it."""
    out = torch.full((k, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[live.to(values.device)] = values
    return out


def _hook_reasons(curves: Curves, members, epoch: int, train_loss, val_loss, metrics, improved, on_epoch) -> dict:
    """As fit's callbacks: each member still recording sees its epoch; a returned reason (a pruner's) stops it."""
    if on_epoch is None:
        return {}
    records = curves.records(epoch, train_loss, val_loss, metrics, improved)
    reasons = {i: on_epoch(members[i], record) for i, record in records.items()}
    return {i: reason for i, reason in reasons.items() if reason}


def group_members(members: list[Member]) -> list[list[Member]]:
    groups: dict[tuple, list[Member]] = {}
    for member in members:
        groups.setdefault(group_key(member), []).append(member)
    return list(groups.values())
