"""The core training loop: train_epoch / evaluate / fit -> History, and predict.

This is the seed's loop (batch -> forward -> loss -> zero_grad -> backward -> step; validate in eval mode under
no_grad; per-sample averaged losses; the best state copied, restored before predicting), generalised to three
tasks and per-epoch callbacks. It knows nothing of MLflow or Optuna: logging and pruning hang on the callbacks
(track/recorder.py logs each epoch, the ledger asks the pruner), and experiment.py wires a config to it.

Batching in-memory tensors goes through `TensorBatches`, which indexes instead of collating one sample at a time
(~5x less work than a DataLoader here) and consumes the random generators exactly as `DataLoader` does, so a run
is bit-identical to the seed's DataLoader loop for the same seeds.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sized

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeplab.config import DEFAULT_METRICS
from sweeplab.train import batch
from sweeplab.train.batch import Inputs
from sweeplab.train.data import BatchError, InMemoryItems, target_for_task
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
        # DataLoader's _BaseDataLoaderIter draws this seed on every pass, used or not (it seeds worker RNGs).
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        x, y = self.x, self.y
        if self.shuffle:
            generator = self.generator
            if generator is None:  # RandomSampler without a generator seeds a fresh one from the global RNG
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator().manual_seed(seed)
            perm = torch.randperm(len(self), generator=generator)
            # RandomSampler ends each pass with `randperm(n)[:num_samples % n]`, an empty slice of a full
            # permutation that still advances the generator; the generator is the loader's own, so drawing it
            # now rather than after the last batch changes nothing else.
            torch.randperm(len(self), generator=generator)
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


@dataclass
class EpochRecord:
    """What one epoch produced; callbacks receive it."""

    epoch: int
    train_loss: float
    val_loss: float
    metrics: dict[str, float]
    best_val_loss: float  # val_loss at the best epoch (by the objective)
    best_epoch: int
    improved: bool
    value: float = math.nan  # the objective's metric this epoch (val_loss by default): what a pruner is told
    best_value: float = math.nan  # ... and at the best epoch
    lr: float | None = None  # the rate the epoch's last optimizer step used, when a schedule changes it


# A callback sees each epoch and may return a reason to stop (a pruner does); None carries on.
Callback = Callable[[EpochRecord], Optional[str]]


MINIMIZE = ("val_loss", "minimize")  # the default objective


def objective_value(val_loss: float, metrics: dict[str, float], metric: str) -> float:
    return val_loss if metric == "val_loss" else metrics.get(metric, math.nan)


@dataclass
class History:
    """Per-epoch curves and the best epoch by the objective (1-based; 0 when no epoch was finite): the lowest
    val_loss by default, or the best of another validation metric (`objective`: (metric, direction))."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    confusion_matrix: list[list[int]] | None = None
    status: str = "completed"  # completed | diverged | stopped | failed (no finite objective: settle)
    stop_reason: str | None = None
    seconds: float = 0.0
    objective: tuple[str, str] = MINIMIZE
    best_value: float = math.nan  # the objective's metric at the best epoch (= best_val_loss by default)
    lr: list[float] = field(default_factory=list)  # per epoch, the rate its last optimizer step used (a schedule)
    early_stopping: tuple[int, float] | None = None  # (patience, min_delta) on the objective
    patience_best: float = math.nan  # early stopping's reference: the best by more than min_delta so far
    epochs_without: int = 0  # epochs in a row without such an improvement

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)

    def better(self, value: float) -> bool:
        """Strictly better than the best so far (NaN and +-inf never are; the first best of a tie is kept)."""
        if not math.isfinite(value):
            return False
        if not self.best_epoch:
            return True
        return value < self.best_value if self.objective[1] == "minimize" else value > self.best_value

    def record(
        self,
        epoch: int,
        train_loss: float,
        val_loss: float,
        metrics: dict[str, float],
        confusion: list[list[int]] | None = None,
    ) -> bool:
        """Append one epoch's results; True when it is the new best, and the caller must then keep the model's
        state as `best_state`. The vectorized engine takes the same decisions (a strictly lower val_loss; a
        non-finite loss in `stop`) for K members at once as tensor operations (stacked/epochs._Curves); the tests hold
        both to the reference loop."""
        self.train_loss.append(train_loss)
        self.val_loss.append(val_loss)
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append(value)
        value = objective_value(val_loss, metrics, self.objective[0])
        improved = self.better(value)
        if improved:
            self.best_val_loss, self.best_epoch, self.best_value = val_loss, epoch, value
            self.best_metrics, self.confusion_matrix = dict(metrics), confusion
        if self.early_stopping is not None:
            minimize = self.objective[1] == "minimize"
            reference = (
                self.patience_best if not math.isnan(self.patience_best) else (math.inf if minimize else -math.inf)
            )
            if improves(value, reference, minimize, self.early_stopping[1]):
                self.patience_best, self.epochs_without = value, 0
            else:
                self.epochs_without += 1
        return improved

    def stop(self, epoch: int, reasons: list[str]) -> bool:
        """After an epoch is recorded: True, with status and reason set, when the run ends here. A non-finite
        loss ends it as "diverged"; a reason (a pruner's, say) as "stopped"."""
        train_loss, val_loss = self.train_loss[-1], self.val_loss[-1]
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            self.status = "diverged"
            self.stop_reason = f"diverged at epoch {epoch} (train_loss={train_loss}, val_loss={val_loss})"
            return True
        if reasons:
            self.status, self.stop_reason = "stopped", reasons[0]
            return True
        if self.early_stopping is not None and out_of_patience(self.epochs_without, self.early_stopping[0]):
            patience, min_delta = self.early_stopping
            by = f" by more than {min_delta:g}" if min_delta else ""
            self.stop_reason = (
                f"early stopping at epoch {epoch}: {self.objective[0]} did not improve{by} in {patience} epochs"
            )
            return True  # a completed run: its best epoch is its result
        return False

    def settle(self) -> None:
        """Once training has ended: a run that trained without one finite objective value has no best epoch and
        so no result (a user metric that returns NaN, AUROC of one class): it failed, with the reason. Both
        engines call it on every member's History; Outcome.of_history reads the status."""
        if self.status != "completed" or self.best_epoch or not self.epochs_run:
            return
        metric = self.objective[0]
        last = self.val_loss[-1] if metric == "val_loss" else self.metrics.get(metric, [math.nan])[-1]
        self.status = "failed"
        self.stop_reason = (
            f"{metric} was not finite at any of its {self.epochs_run} epochs (the last: {last}): no best epoch"
        )


# --- the epoch decisions both engines take: on a Python float, or on a [K] tensor of members ---------------------


def improves(value, best, minimize, min_delta=0.0):
    """Whether `value` beats `best` by more than `min_delta` (NaN never does). `minimize`: a bool, or a [K] bool
    tensor (each member's direction)."""
    lower, higher = value < best - min_delta, value > best + min_delta
    if isinstance(minimize, bool):
        return lower if minimize else higher
    return torch.where(minimize, lower, higher)


def out_of_patience(epochs_without, patience):
    """Early stopping as Keras and Lightning define it: `patience` epochs in a row without an improvement."""
    return epochs_without >= patience


def loss_for_task(task: str, regression_loss: str = "mse") -> nn.Module:
    if task == "binary":
        return nn.BCEWithLogitsLoss()
    if task == "multiclass":
        return nn.CrossEntropyLoss()
    return nn.L1Loss() if regression_loss == "l1" else nn.MSELoss()


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


def _sample_average(losses: list[torch.Tensor], sizes: list[int], n_samples: int) -> float:
    # One host transfer per epoch instead of .item() per batch; the sum runs in the seed's order and precision
    # (Python floats of the float32 batch means, weighted by batch size), so the result is bit-identical.
    total = 0.0
    for value, size in zip(torch.stack(losses).tolist(), sizes):
        total += value * size
    return total / n_samples


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
    ):
        self.optimizer, self.accumulate, self.scheduler, self.interval = optimizer, accumulate, scheduler, interval
        self.clip_grad_norm, self.clip_grad_value = clip_grad_norm, clip_grad_value
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.device_type = device_type
        self.scaler = torch.amp.GradScaler(device_type) if precision == "16" else None
        self.plain = (
            accumulate == 1 and clip_grad_norm is None and clip_grad_value is None and self.scaler is None
        ) and (scheduler is None or interval == "epoch")
        self.lr = optimizer.param_groups[0]["lr"]  # the rate the last optimizer step used
        self.pending = 0  # batches backpropagated since the last optimizer step

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def batch(self, model: nn.Module, loss: torch.Tensor) -> None:
        if self.plain:  # the seed's lines
            self.optimizer.zero_grad()
            loss.backward()
            self.lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            return
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
    return _sample_average(losses, sizes, len(batches))


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
    loss = _sample_average(losses, sizes, len(batches))
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


RANKING = {"val_auroc", "val_average_precision"}


def classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, task: str, ranking: bool = True
) -> tuple[dict[str, float], list[list[int]]]:
    """Validation metrics: binary -> accuracy, precision, recall, F1 (positive class 1); multiclass -> accuracy,
    macro-F1. Undefined ratios (no predicted or no actual positives) count as 0, as scikit-learn's default does."""
    metrics, confusion = stacked_classification_metrics(logits.unsqueeze(0), target.unsqueeze(0), task, ranking)
    return {name: float(values[0]) for name, values in metrics.items()}, confusion[0].tolist()


def stacked_classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, task: str, ranking: bool = True
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`classification_metrics` for K members at once: logits [K, N, C], targets [K, N, ...] -> each metric as a
    float64 [K] tensor and the confusion matrices [K, C, C] (CPU; rows: actual, columns: predicted)."""
    k = logits.shape[0]
    if task == "binary":
        predicted = (logits[..., 0] > 0).long()
        actual = target[..., 0].long()
        n_classes = 2
    else:
        predicted = logits.argmax(dim=2)
        actual = target.long()
        n_classes = logits.shape[2]
    cells = n_classes * n_classes
    member = torch.arange(k, device=logits.device).unsqueeze(1) * cells
    confusion = torch.bincount((member + actual * n_classes + predicted).reshape(-1), minlength=k * cells)
    confusion = confusion.reshape(k, n_classes, n_classes).cpu()
    tp = confusion.diagonal(dim1=1, dim2=2).double()
    predicted_count = confusion.sum(dim=1).double()
    actual_count = confusion.sum(dim=2).double()
    precision = torch.where(predicted_count > 0, tp / predicted_count.clamp(min=1), 0.0)
    recall = torch.where(actual_count > 0, tp / actual_count.clamp(min=1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
    metrics = {"val_accuracy": tp.sum(dim=1) / confusion.sum(dim=(1, 2))}
    if task == "binary":
        metrics.update(val_precision=precision[:, 1], val_recall=recall[:, 1], val_f1=f1[:, 1])
        if ranking:  # a Python loop over the members: only when asked for
            metrics.update(ranking_metrics(logits[..., 0], target[..., 0]))
    else:
        metrics["val_macro_f1"] = f1.mean(dim=1)
    return metrics, confusion


def stacked_regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Regression metrics for K members: pred, target [K, N, C] -> each a float64 [K] tensor (CPU), as
    scikit-learn computes them with its default multioutput="uniform_average" (each output's, then their mean):
    val_mae, val_rmse (the root of each output's mean squared error), val_r2 (1 for a constant target predicted
    exactly, else 0 for a constant target: scikit-learn's force_finite)."""
    error = pred.double() - target.double()
    actual = target.double()
    squared = error.pow(2).sum(dim=1)
    spread = (actual - actual.mean(dim=1, keepdim=True)).pow(2).sum(dim=1)
    r2 = torch.where(spread > 0, 1 - squared / spread.clamp(min=1e-300), torch.where(squared == 0, 1.0, 0.0))
    return {
        "val_mae": error.abs().mean(dim=1).mean(dim=1).cpu(),
        "val_rmse": error.pow(2).mean(dim=1).sqrt().mean(dim=1).cpu(),
        "val_r2": r2.mean(dim=1).cpu(),
    }


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A binary classifier's ranking metrics for K members: scores (logits), labels [K, N] -> val_auroc and
    val_average_precision, float64 [K] (CPU), as scikit-learn's roc_auc_score and average_precision_score compute
    them: tied scores are one threshold. NaN where undefined (AUROC without both classes, AP without positives)."""
    auroc, average_precision = [], []
    for member_scores, member_labels in zip(scores.detach().double().cpu(), labels.detach().double().cpu()):
        order = torch.argsort(member_scores, descending=True, stable=True)
        ranked, hits = member_scores[order], member_labels[order]
        last = torch.cat([(ranked[1:] != ranked[:-1]).nonzero().flatten(), torch.tensor([len(ranked) - 1])])
        true_pos = hits.cumsum(0)[last]
        false_pos = (last + 1).double() - true_pos
        positives, negatives = float(true_pos[-1]), float(false_pos[-1])
        if positives == 0 or negatives == 0:
            auroc.append(math.nan)
        else:
            tpr = torch.cat([torch.zeros(1, dtype=torch.float64), true_pos / positives])
            fpr = torch.cat([torch.zeros(1, dtype=torch.float64), false_pos / negatives])
            auroc.append(float(torch.trapezoid(tpr, fpr)))
        if positives == 0:
            average_precision.append(math.nan)
        else:
            recall = torch.cat([torch.zeros(1, dtype=torch.float64), true_pos / positives])
            precision = true_pos / (true_pos + false_pos)
            average_precision.append(float(((recall[1:] - recall[:-1]) * precision).sum()))
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return {"val_auroc": as_tensor(auroc), "val_average_precision": as_tensor(average_precision)}


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
) -> History:
    """Train for `epochs`, keep the best validation state (a CPU copy), and restore it at the end.

    A non-finite loss ends the run with status "diverged" at that epoch; a callback returning a reason ends it
    with status "stopped"; early stopping (patience, min_delta) ends it completed. Either way the History holds the
    curves up to that epoch. `step` holds the per-batch options (Step); its epoch-interval scheduler is stepped
    after each validation (ReduceLROnPlateau with the `monitor` metric's value), as torch's own loop steps it.
    """
    callbacks = list(callbacks)
    step = step if step is not None else Step(optimizer)
    history = History(objective=tuple(objective), early_stopping=early_stopping)
    scheduler = step.scheduler
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_loss = train_epoch(model, train_batches, loss_fn, optimizer, check_shapes=epoch == 1, step=step)
        val_loss, values, confusion = evaluate(model, val_batches, loss_fn, task, step, metrics, own_metrics)
        if scheduler is not None:
            history.lr.append(step.lr)
            if step.interval == "epoch":
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(objective_value(val_loss, values, monitor or objective[0]))
                else:
                    scheduler.step()
        improved = history.record(epoch, train_loss, val_loss, values, confusion)
        if improved:
            history.best_state = state_to_cpu(model.state_dict())
        record = EpochRecord(
            epoch,
            train_loss,
            val_loss,
            values,
            history.best_val_loss,
            history.best_epoch,
            improved,
            objective_value(val_loss, values, objective[0]),
            history.best_value,
            history.lr[-1] if history.lr else None,
        )
        reasons = [reason for reason in (callback(record) for callback in callbacks) if reason]
        if history.stop(epoch, reasons):
            break
    history.settle()
    if restore_best and history.best_state is not None:
        model.load_state_dict(history.best_state)
    history.seconds = time.perf_counter() - started
    return history


@torch.no_grad()
def predict(model: nn.Module, x: Inputs) -> torch.Tensor:
    """Outputs (values or logits) for x (a tensor, or several inputs) in eval mode, without gradients, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return batch.call(model, batch.to(x, device)).cpu()
