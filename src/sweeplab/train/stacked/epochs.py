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
stacked by func.py, both through the same epoch loop (`fit_stacked`). The per-member loss is loss.py, the
per-member optimizer and schedules optim.py; members that end leave the stack (`fit_stacked`'s `compact`).

Why one module of ~460 lines: members, grouping and the one stacked epoch loop (`fit_stacked`) that the MLP's
and torch.func's paths share; the losses are loss.py's, the optimizers and schedules optim.py's.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.parameter import is_lazy

from sweeplab.config import ConfigError, ExperimentConfig, logged_metrics, own_metrics
from sweeplab.train import batch
from sweeplab.train.data import Dataset, drawn
from sweeplab.train.epoch import (
    RANKING,
    Curves,
    History,
    draw_order,
    sample_average,
    stacked_classification_metrics,
    stacked_regression_metrics,
)
from sweeplab.train.experiment import model_spec_for, resolve_device, val_batch_size
from sweeplab.train.init import initial_model
from sweeplab.train.model import DROPOUT_ARG, ModelSpec, architecture, behaviour, dropout_rates
from sweeplab.train.stacked.loss import StackedLoss, loss_kind, loss_problem, member_loss
from sweeplab.train.stacked.optim import Schedules, StackedOptimizer


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
    if config.model.dropout and resolve_device(config.device).type != "cpu":
        raise ConfigError(
            "engine: vectorized draws model.dropout's masks as the reference loop does on the CPU; on "
            f"{resolve_device(config.device).type} the reference loop draws them from that device's generator"
        )


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
    dropout_rates: dict[str, float] = field(default_factory=dict)  # a user's model: each nn.Dropout's own rate
    behaviour: tuple | None = None  # a user's model built with a dropout-rate init arg: model.behaviour
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
    dataset, rng_after_data = drawn(config, shared)
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
        model = initial_model(config, spec)  # model.init_from: every member starts from the loaded weights
        global_gen = torch.Generator()
        global_gen.set_state(torch.get_rng_state())
        shuffle_gen = torch.Generator().manual_seed(train.shuffle_seed) if train.shuffle_seed is not None else None
        # a lazy module's parameters have no values before its first batch: stacked.stack_problem refuses it
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not is_lazy(v)}
        rates = dropout_rates(model) if spec.class_path is not None else {}
        made = behaviour(model) if spec.class_path is not None and _rate_args(spec) else None
        shared[draws_key] = (state, shuffle_gen, global_gen, rates, made)
    init_state, shuffle_gen, global_gen, rates, made = shared[draws_key]
    return Member(key, config, dataset, spec, init_state, shuffle_gen, global_gen, dropout_rates=rates, behaviour=made)


def _rate_args(spec: ModelSpec) -> set[str]:
    """The init args that may set a dropout rate (named like one, a number): model_key leaves them out when the
    module they build behaves alike but for its nn.Dropout rates (model.behaviour)."""
    return {
        name
        for name, value in spec.init_args.items()
        if DROPOUT_ARG.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def model_key(member: Member) -> tuple | str:
    """What decides whether members can share one model. The MLP: its activation (hidden sizes are padded). A
    user's model: its class, every init arg (an activation's name and a flag change what the one shared module
    computes, not only the shapes they give) and its parameters' and buffers' names, shapes and dtypes
    (model.architecture). Init args named like a dropout rate are left out when the module they built is told
    apart by what it holds instead (model.behaviour, its nn.Dropout rates left out): those rates are each
    member's own (func.FuncStack draws each member's noise at its own rate), so a sweep over dropout stacks."""
    spec = member.spec
    if spec.class_path is None:  # the dropout rate is each member's own (0: noise of ones; MLP.head names)
        return (member.config.model.activation,)
    args = spec.init_args
    if member.behaviour is not None:
        args = {k: v for k, v in args.items() if k not in _rate_args(spec)}
    key = (spec.class_path, json.dumps(args, sort_keys=True, default=repr), architecture(member.init_state))
    return key if member.behaviour is None else (*key, member.behaviour)


def group_key(member: Member) -> tuple:
    """Members that can share one stacked model (`model_key`). Hidden sizes and optimizers may differ (padding
    and masks, below); everything that shapes the batches may not."""
    c, d = member.config, member.dataset
    return (
        model_key(member),
        c.train.batch_size,
        val_batch_size(c.train, d),
        c.train.epochs,
        c.train.shuffle,
        c.task,
        loss_kind(c),  # the loss's class; its init args are per member (StackedLoss)
        d.n_train,
        d.n_val,
        batch.structure(d.x_train),  # one tensor's or several inputs' dtypes and shapes
        d.n_outputs,
        c.device,
        c.objective.metric,
        c.objective.direction,
        logged_metrics(c),
    )


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


def drawn_noise(generator: torch.Generator, p: float, shape: tuple[int, ...]) -> torch.Tensor:
    """One member's nn.Dropout(p) noise for an input of `shape`, as torch's `_dropout_impl` makes it on the CPU
    (empty_like(input).bernoulli_(1 - p), then div_(1 - p)) from the generator that stands for the member's global
    RNG: the forward multiplies by it, as nn.Dropout does. The one rule for the MLP's path and func.py's."""
    if p == 0:  # torch returns the input as it is: no draw
        return torch.ones(shape)
    if p == 1:  # the input times zero: no draw
        return torch.zeros(shape)
    return torch.empty(shape).bernoulli_(1 - p, generator=generator).div_(1 - p)


def _draw_pair(member: Member) -> tuple[int, int]:
    """What a member's draws come from: members with the same pair of generators draw alike (prepare_member)."""
    return id(member.shuffle_gen), id(member.global_gen)


def train_step(forward, flat: torch.Tensor, optimizer: StackedOptimizer, xb, yb, task: str, loss, noise=None):
    """The seed's six lines for K members at once: forward, loss, zero_grad, backward, step; the [K] losses.
    `noise`: the batch's dropout noise, given to the forward as its `noise` (None: the forward takes none)."""
    out = forward(flat, xb, True) if noise is None else forward(flat, xb, True, noise)
    losses = member_loss(out, yb, task, loss)
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
    layout: Callable[[int], list[tuple[str, int]]] | None = None,  # a row's (parameter name, columns)
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
    members' own generators where the reference loop's forward draws it (mlp.py's, or FuncStack.noise), given to
    the forward as `noise`."""
    compact = compact and not buffers  # compaction gathers no buffers: the MLP's path only (it has none)
    first = members[0]
    config, dataset = first.config, first.dataset
    train, task = config.train, config.task
    device = flat.device
    k = len(members)
    x_train, y_train, x_val, y_val, which = data
    optimizer = StackedOptimizer(flat, [m.config for m in members], layout)
    loss = StackedLoss(members).to(device)
    wanted = set(logged_metrics(config))  # the group's (group_key): the same for every member
    n_train, n_val = dataset.n_train, dataset.n_val
    scheduled = any(m.config.train.scheduler is not None for m in members)
    schedules = Schedules(members, optimizer, math.ceil(n_train / train.batch_size)) if scheduled else None
    val_batch = val_batch_size(train, dataset)
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
    draw_from, draw_row = _distinct(members, _draw_pair)
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
            # dropout's noise drawn before the forward, as nn.Dropout draws it in the reference loop's forward
            noise = dropout(draw_from, draw_row, yb.shape[1]) if dropout is not None else None
            batch_losses.append(train_step(forward, flat, optimizer, xb, yb, task, loss, noise))
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
                val_losses.append(member_loss(out, y_val[:, start : start + val_batch], task, loss))
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
            draw_from, draw_row = _distinct([members[i] for i in live.tolist()], _draw_pair)
            draw_row = draw_row.to(device)
            if schedules is not None:
                schedules.leave(live)
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
