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

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sized

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeplab.train.model import state_to_cpu


class ShapeError(ValueError):
    """Labels that do not fit the model output for the loss (the seed's debugging checklist, items 1-2)."""


class TensorBatches:
    """Mini-batches of in-memory tensors, drawn as `DataLoader(TensorDataset(x, y), batch_size, shuffle,
    generator)` draws them: each pass first takes a base seed from the loader's generator (or the global RNG),
    then, when shuffling, two `randperm`s from the same generator (the second one RandomSampler discards). Tensors are moved to the device once."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
            x, y = x[perm], y[perm]
        return zip(x.split(self.batch_size), y.split(self.batch_size))


class LoaderBatches:
    """A real `DataLoader` over the tensors, for datasets that need one (and as the reference in tests)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        self.loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


class Batches(Protocol, Sized):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


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
    status: str = "completed"  # completed | diverged | stopped
    stop_reason: str | None = None
    seconds: float = 0.0
    objective: tuple[str, str] = MINIMIZE
    best_value: float = math.nan  # the objective's metric at the best epoch (= best_val_loss by default)

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)

    def better(self, value: float) -> bool:
        """Strictly better than the best so far (NaN never is; the first best of a tie is kept)."""
        if not self.best_epoch:
            return (value < math.inf) if self.objective[1] == "minimize" else (value > -math.inf)
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
        return False


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


def train_epoch(
    model: nn.Module, batches: Batches, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, check_shapes: bool = False
) -> float:
    """One pass over the training batches; returns the per-sample average loss."""
    model.train()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    same = _same_shape(loss_fn)
    for batch_x, batch_y in batches:
        pred = model(batch_x)
        if check_shapes:
            check_batch(pred, batch_y, loss_fn)
            check_shapes = False
        elif not same(pred, batch_y):  # a model whose output changes shape from batch to batch
            check_batch(pred, batch_y, loss_fn)
        loss = loss_fn(pred, batch_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        sizes.append(batch_x.shape[0])
    return _sample_average(losses, sizes, len(batches))


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Batches, loss_fn: nn.Module, task: str = "regression"
) -> tuple[float, dict[str, float], list[list[int]] | None]:
    """Validation in eval mode without gradients: (per-sample average loss, task metrics, confusion matrix)."""
    model.eval()
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    preds: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    same = _same_shape(loss_fn)
    for batch_x, batch_y in batches:
        pred = model(batch_x)
        if not same(pred, batch_y):
            check_batch(pred, batch_y, loss_fn)
        losses.append(loss_fn(pred, batch_y))
        sizes.append(batch_x.shape[0])
        if task != "regression":
            preds.append(pred)
            targets.append(batch_y)
    loss = _sample_average(losses, sizes, len(batches))
    if task == "regression":
        return loss, {}, None
    return loss, *classification_metrics(torch.cat(preds), torch.cat(targets), task)


def classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, task: str
) -> tuple[dict[str, float], list[list[int]]]:
    """Validation metrics: binary -> accuracy, precision, recall, F1 (positive class 1); multiclass -> accuracy,
    macro-F1. Undefined ratios (no predicted or no actual positives) count as 0, as scikit-learn's default does."""
    metrics, confusion = stacked_classification_metrics(logits.unsqueeze(0), target.unsqueeze(0), task)
    return {name: float(values[0]) for name, values in metrics.items()}, confusion[0].tolist()


def stacked_classification_metrics(
    logits: torch.Tensor, target: torch.Tensor, task: str
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
    else:
        metrics["val_macro_f1"] = f1.mean(dim=1)
    return metrics, confusion


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
) -> History:
    """Train for `epochs`, keep the best validation state (a CPU copy), and restore it at the end.

    A non-finite loss ends the run with status "diverged" at that epoch; a callback returning a reason ends it
    with status "stopped". Either way the History holds the curves up to that epoch.
    """
    callbacks = list(callbacks)
    history = History(objective=tuple(objective))
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_loss = train_epoch(model, train_batches, loss_fn, optimizer, check_shapes=epoch == 1)
        val_loss, metrics, confusion = evaluate(model, val_batches, loss_fn, task)
        improved = history.record(epoch, train_loss, val_loss, metrics, confusion)
        if improved:
            history.best_state = state_to_cpu(model.state_dict())
        record = EpochRecord(
            epoch,
            train_loss,
            val_loss,
            metrics,
            history.best_val_loss,
            history.best_epoch,
            improved,
            objective_value(val_loss, metrics, objective[0]),
            history.best_value,
        )
        reasons = [reason for reason in (callback(record) for callback in callbacks) if reason]
        if history.stop(epoch, reasons):
            break
    if restore_best and history.best_state is not None:
        model.load_state_dict(history.best_state)
    history.seconds = time.perf_counter() - started
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs (values or logits) for x in eval mode, without gradients, returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return model(x.to(device)).cpu()
