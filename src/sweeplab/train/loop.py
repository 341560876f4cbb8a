"""The core training loop: train_epoch / evaluate / fit -> History, and predict.

This is the seed's loop (batch -> forward -> loss -> zero_grad -> backward -> step; validate in eval mode under
no_grad; per-sample averaged losses; the best state copied, restored before predicting), generalised to three
tasks and per-epoch callbacks. It knows nothing of MLflow or Optuna: logging and pruning hang on the callbacks
(track/recorder.py logs each epoch, the ledger asks the pruner), and experiment.py wires a config to it.

Batching in-memory tensors goes through `TensorBatches`, which indexes instead of collating one sample at a time
(~5x less work than a DataLoader here) and consumes the random generators exactly as `DataLoader` does, so a run
is bit-identical to the seed's DataLoader loop for the same seeds.

Why one module of ~440 lines: it is the seed's loop and the step around it (batching, the step with its
options, validation); the epoch's decisions and metrics are epoch.py's.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Iterator, Protocol, Sized

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeplab.config import DEFAULT_METRICS
from sweeplab.train import batch
from sweeplab.train.batch import Inputs
from sweeplab.train.epoch import (  # what an epoch means is epoch.py's; the loop holds it at K = 1
    MINIMIZE,
    RANKING,
    Callback,
    Curves,
    History,
    classification_metrics,
    draw_order,
    objective_value,
    sample_average,
    stacked_regression_metrics,
)
from sweeplab.train.items import BatchError, InMemoryItems, target_for_task
from sweeplab.train.model import state_to_cpu


class ShapeError(ValueError):
    """Labels that do not fit the model output for the loss (the seed's debugging checklist, items 1-2)."""


class TensorBatches:
    """Mini-batches of in-memory tensors, drawn as `DataLoader(TensorDataset(x, y), batch_size, shuffle,
    generator)` draws them: each pass first takes a base seed from the loader's generator (or the global RNG),
    then, when shuffling, two `randperm`s from the same generator (the second one RandomSampler discards). Tensors
    are moved to the device once. `x` may be several inputs (a tuple or dict of tensors): each is indexed alike."""

    def __init__(
        self,
        x: Inputs,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        self.x = batch.to(x, device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.y.shape[0]

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        x, y = self.x, self.y
        perm = draw_order(len(self), self.shuffle, self.generator)  # as DataLoader draws it (epoch.draw_order)
        if perm is not None:
            if self.device.type != "cpu":
                perm = perm.to(self.device)
            x, y = batch.take(x, perm), y[perm]
        if isinstance(x, torch.Tensor):
            return zip(x.split(self.batch_size), y.split(self.batch_size))
        return zip(batch.split(x, self.batch_size), y.split(self.batch_size))


def seed_worker(worker_id: int) -> None:
    """A DataLoader worker's numpy and random seeded from its torch seed (the loader's base seed + worker id), as
    PyTorch's reproducibility notes do: a Dataset that draws from either is then reproducible too."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class LoaderBatches:
    """A real `DataLoader`: over a map-style Dataset read lazily (with the user's workers and collate_fn), or over
    in-memory tensors (`train.loader: dataloader`, a collate_fn, and the reference in tests). It draws from the
    generators exactly as `TensorBatches` does. Every tensor of a batch is moved to the device; targets take the
    task's form (data.target_for_task) when `task` is given."""

    def __init__(
        self,
        x,
        y: torch.Tensor | None = None,
        batch_size: int = 1,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        collate_fn: Callable | None = None,
        task: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        dataset = x if y is None else (TensorDataset(x, y) if isinstance(x, torch.Tensor) else InMemoryItems(x, y))
        self.device = torch.device(device)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory and self.device.type == "cuda",
            persistent_workers=persistent_workers and num_workers > 0,
            worker_init_fn=seed_worker if num_workers else None,
        )
        self.target = (lambda t: target_for_task(t, task)) if task is not None else (lambda t: t)
        self.non_blocking = pin_memory and self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]:
        try:
            for inputs, target in self.loader:
                yield batch.to(inputs, self.device, self.non_blocking), self.target(target).to(self.device)
        except BatchError as exc:
            # from a worker, torch re-raises it as "Caught BatchError in DataLoader worker process 0. Original
            # Traceback ...": its own line is the traceback's last
            text = str(exc).rstrip()
            if text.startswith("Caught "):
                text = text.splitlines()[-1].split(f"{BatchError.__name__}: ", 1)[-1]
            raise BatchError(text) from None


class Batches(Protocol, Sized):
    def __iter__(self) -> Iterator[tuple[Inputs, torch.Tensor]]: ...


def baseline_loss(y_train: torch.Tensor, y_val: torch.Tensor, task: str, regression_loss: str = "mse") -> float:
    """The validation loss of the best constant prediction fitted on the training labels: a model that learned
    nothing about x. Regression: the training mean (MSE) or median (L1); binary: the training rate of class 1;
    multiclass: the training class frequencies. A run that does not get well below it never learned."""
    y_train, y_val = y_train.detach().cpu(), y_val.detach().cpu()
    if task == "multiclass":
        counts = torch.bincount(y_train.long(), minlength=int(max(y_train.max(), y_val.max())) + 1).double()
        logits = (counts.clamp(min=0.5) / counts.sum()).log()  # a class never seen still gets a finite loss
        return float(nn.functional.cross_entropy(logits.expand(len(y_val), -1), y_val.long()))
    if task == "binary":
        rate = float(y_train.double().mean().clamp(1e-6, 1 - 1e-6))
        logit = torch.full_like(y_val, math.log(rate / (1 - rate)), dtype=torch.float64)
        return float(nn.functional.binary_cross_entropy_with_logits(logit, y_val.double()))
    if regression_loss == "l1":
        return float((y_val.double() - y_train.double().median()).abs().mean())
    return float((y_val.double() - y_train.double().mean()).pow(2).mean())


def check_batch(pred: torch.Tensor, target: torch.Tensor, loss_fn: nn.Module) -> None:
    """Fail with both shapes when the labels cannot be what the loss expects, instead of letting MSELoss
    broadcast [N] against [N, 1] into a wrong number, or CrossEntropy fail deep inside."""
    name = type(loss_fn).__name__
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if target.dtype != torch.long or target.dim() != 1 or target.shape[0] != pred.shape[0]:
            raise ShapeError(
                f"{name}: labels {list(target.shape)} {target.dtype} do not fit output "
                f"{list(pred.shape)}: it needs class indices of shape [{pred.shape[0]}] torch.int64"
            )
        return
    if target.shape != pred.shape or not target.is_floating_point():
        raise ShapeError(
            f"{name}: labels {list(target.shape)} {target.dtype} do not fit output "
            f"{list(pred.shape)} {pred.dtype}: they must have the same shape and a float dtype"
        )


def _same_shape(loss_fn: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """The cheap per-batch half of `check_batch`: whether an output still fits its labels' shape (so MSE cannot
    broadcast [B, 1] against [B, 2] on the one batch where a model's output changes shape)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return lambda pred, target: pred.dim() == 2 and pred.shape[0] == target.shape[0]
    return lambda pred, target: pred.shape == target.shape


class Step:
    """The per-batch contract's options: what happens between a batch's loss and the next batch. By default the
    seed's lines (zero_grad, backward, step); with options, in Lightning's order: the loss scaled by
    1/`accumulate` and backward (through a GradScaler for float16); once `accumulate` batches are in (or the
    epoch's batches end): gradients unscaled, clipped by norm (`clip_grad_norm_`) or value (`clip_grad_value_`),
    the optimizer step, a step-interval scheduler's step, zero_grad. `autocast` runs the forward and the loss under
    torch.autocast (bf16, or float16 on CUDA)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        accumulate: int = 1,
        precision: str = "32",
        device_type: str = "cpu",
        scheduler=None,
        interval: str = "epoch",
        freeze: list | None = None,
    ):
        self.optimizer, self.accumulate, self.scheduler, self.interval = optimizer, accumulate, scheduler, interval
        self.freeze = freeze or []  # options.frozen_parameters: (parameters, BatchNorms, epochs) per entry
        self.frozen_norms: list[nn.Module] = []
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if precision == "16" else None
        self.lr = optimizer.param_groups[0]["lr"]  # the rate the last optimizer step used
        self.pending = 0  # batches backpropagated since the last optimizer step
        self.group_lrs = self._group_lrs()  # each named group's rate (train.param_groups), as `lr` is taken

    def _group_lrs(self) -> dict[str, float]:
        """Each named parameter group's rate but the default's (train.param_groups: logged as lr_<name>)."""
        groups = self.optimizer.param_groups
        return {g["name"]: g["lr"] for g in groups if g.get("name") not in (None, "default")}

    def begin_epoch(self, epoch: int) -> None:
        """`train.freeze`: its parameters take no gradient (so no update, weight decay or optimizer state) through
        their epochs; then they train. Their BatchNorms keep their statistics meanwhile (`hold_frozen`)."""
        self.frozen_norms = []
        for parameters, norms, epochs in self.freeze:
            for parameter in parameters:
                parameter.requires_grad_(epoch > epochs)
            if epoch <= epochs:
                self.frozen_norms += norms

    def hold_frozen(self) -> None:
        for module in self.frozen_norms:
            module.eval()

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def batch(self, model: nn.Module, loss: torch.Tensor) -> None:
        """Without options these are the seed's lines: zero_grad, backward, step (optimizer_step at once)."""
        if self.pending == 0:
            self.optimizer.zero_grad()
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        self.pending += 1
        if self.pending == self.accumulate:
            self.optimizer_step(model)

    def end_epoch(self, model: nn.Module) -> None:
        """The epoch's last batches, when fewer than `accumulate`, step too (as Lightning does)."""
        if self.pending:
            self.optimizer_step(model)

    def optimizer_step(self, model: nn.Module) -> None:
        self.pending = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad_value is not None:
            nn.utils.clip_grad_value_(model.parameters(), self.clip_grad_value)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), self.clip_grad_norm)
        self.lr = self.optimizer.param_groups[0]["lr"]
        if self.group_lrs:
            self.group_lrs = self._group_lrs()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()


def train_epoch(
    model: nn.Module,
    batches: Batches,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    check_shapes: bool = False,
    step: Step | None = None,
) -> float:
    """One pass over the training batches; returns the per-sample average loss (of the unscaled batch losses)."""
    model.train()
    step = step if step is not None else Step(optimizer)
    step.hold_frozen()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    same = _same_shape(loss_fn)
    for batch_x, batch_y in batches:
        with step.autocast():
            pred = batch.call(model, batch_x)
            if check_shapes:
                check_batch(pred, batch_y, loss_fn)
                check_shapes = False
            elif not same(pred, batch_y):  # a model whose output changes shape from batch to batch
                check_batch(pred, batch_y, loss_fn)
            loss = loss_fn(pred, batch_y)
        step.batch(model, loss)
        losses.append(loss.detach())
        sizes.append(batch_y.shape[0])  # the batch's size is its target's
    step.end_epoch(model)
    return float(sample_average(losses, sizes, len(batches))[0])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    loss_fn: nn.Module,
    task: str = "regression",
    step: Step | None = None,
    metrics: Iterable[str] | None = None,
    own: dict[str, Callable] | None = None,
) -> tuple[float, dict[str, float], list[list[int]] | None]:
    """Validation in eval mode without gradients (under the training's autocast, when it has one): (per-sample
    average loss, the `metrics` asked for (default: the task's, config.DEFAULT_METRICS) and the user's `own`
    ({name: function(outputs, targets)} over the whole split), confusion matrix)."""
    wanted = set(DEFAULT_METRICS[task] if metrics is None else metrics)
    model.eval()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    same = _same_shape(loss_fn)
    autocast = step.autocast() if step is not None else contextlib.nullcontext()
    with autocast:
        for batch_x, batch_y in batches:
            pred = batch.call(model, batch_x)
            if not same(pred, batch_y):
                check_batch(pred, batch_y, loss_fn)
            losses.append(loss_fn(pred, batch_y))
            sizes.append(batch_y.shape[0])
            preds.append(pred)
            targets.append(batch_y)
    loss = float(sample_average(losses, sizes, len(batches))[0])
    outputs, target = torch.cat(preds).float(), torch.cat(targets)
    confusion, values = None, {}
    if task == "regression":
        if wanted:
            stacked = stacked_regression_metrics(outputs.unsqueeze(0), target.unsqueeze(0))
            values = {name: float(v[0]) for name, v in stacked.items() if name in wanted}
    else:
        found, confusion = classification_metrics(outputs, target, task, ranking=bool(wanted & RANKING))
        values = {name: value for name, value in found.items() if name in wanted}
    for name, function in (own or {}).items():
        values[name] = function(outputs.cpu(), target.cpu())
    return loss, values, confusion


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    train_batches: Batches,
    val_batches: Batches,
    epochs: int,
    task: str = "regression",
    callbacks: Iterable[Callback] = (),
    restore_best: bool = True,
    objective: tuple[str, str] = MINIMIZE,
    step: Step | None = None,
    early_stopping: tuple[int, float] | None = None,
    monitor: str | None = None,
    metrics: Iterable[str] | None = None,
    own_metrics: dict[str, Callable] | None = None,
    keep_last: bool = False,
) -> History:
    """Train for `epochs`, keep the best validation state (a CPU copy), and restore it at the end.

    A non-finite loss ends the run with status "diverged" at that epoch; a callback returning a reason ends it
    with status "stopped"; early stopping (patience, min_delta) ends it completed. Either way the History holds the
    curves up to that epoch. `step` holds the per-batch options (Step); its epoch-interval scheduler is stepped
    after each validation (ReduceLROnPlateau with the `monitor` metric's value), as torch's own loop steps it.
    """
    callbacks = list(callbacks)
    step = step if step is not None else Step(optimizer)
    # the decisions both engines take, at K = 1 (keep_last: the last epoch is the result, a refit's rule)
    curves = Curves(1, epochs, tuple(objective), [early_stopping], keep_last)
    scheduler = step.scheduler
    best_state = None
    started = time.perf_counter()
    group_lrs: dict[str, list[float]] = {}
    for epoch in range(1, epochs + 1):
        step.begin_epoch(epoch)
        train_loss = train_epoch(model, train_batches, loss_fn, optimizer, check_shapes=epoch == 1, step=step)
        val_loss, values, confusion = evaluate(model, val_batches, loss_fn, task, step, metrics, own_metrics)
        rates = step.group_lrs
        if scheduler is not None or rates:
            curves.lr[0, epoch - 1] = step.lr
            for name, rate in rates.items():
                group_lrs.setdefault(name, []).append(rate)
            if scheduler is not None and step.interval == "epoch":
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(objective_value(val_loss, values, monitor or objective[0]))
                else:
                    scheduler.step()
        train_t = torch.tensor([train_loss], dtype=torch.float64)
        val_t = torch.tensor([val_loss], dtype=torch.float64)
        values_t = {name: torch.tensor([value], dtype=torch.float64) for name, value in values.items()}
        confusion_t = torch.tensor([confusion]) if confusion is not None else None
        improved = curves.record(epoch, train_t, val_t, values_t, confusion_t)
        if bool(improved[0]):
            best_state = state_to_cpu(model.state_dict())
        reasons = []
        if callbacks:
            record = curves.records(epoch, train_t, val_t, values_t, improved)[0]
            record.group_lr = dict(rates)
            reasons = [reason for reason in (callback(record) for callback in callbacks) if reason]
        curves.stop(epoch, train_t, val_t, {0: reasons[0]} if reasons else {})
        if not curves.all_active:
            break
    (history,) = curves.histories()
    history.group_lr = group_lrs
    history.best_state = best_state
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    history.seconds = time.perf_counter() - started
    return history


@torch.no_grad()
def predict(model: nn.Module, x: Inputs) -> torch.Tensor:
    """Outputs (values or logits) for x (a tensor, or several inputs) in eval mode, without gradients, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return batch.call(model, batch.to(x, device)).cpu()
