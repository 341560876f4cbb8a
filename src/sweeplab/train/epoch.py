"""What an epoch means, written once for K members: its record, its metrics, and one set of decisions.

Both engines hold it: the stacked engine (train/stacked/) for K members at once, the reference loop (loop.fit)
at K = 1, as `classification_metrics` is the stacked metrics over one member. A decision is a tensor operation
over [K] members: an epoch improves when its objective is finite and strictly better than the best so far (the
first of a tie kept); a non-finite training or validation loss ends a member as "diverged"; a hook's reason (a
pruner's) as "stopped"; early stopping (Keras' and Lightning's patience and min_delta) ends it completed; a member
that trained without one finite objective has no best epoch and "failed". `Curves.histories` gives each member
its History, which is what the rest of sweeplab reads. The batch order both engines draw (`draw_order`) and the
per-sample average of a split's batch losses (`sample_average`) are here too. Imports nothing of sweeplab but
the config's names: neither engine imports the other for these.

Why one module of ~410 lines: the record, the metrics over [K] members and the decisions are one meaning of
an epoch, which both engines hold; split, the engines would again own parts of it twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class EpochRecord:
    """What one epoch produced for one member; callbacks receive it."""

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
    group_lr: dict[str, float] = field(default_factory=dict)  # train.param_groups: each named group's (lr_<name>)


# A callback sees each epoch and may return a reason to stop (a pruner does); None carries on.
Callback = Callable[[EpochRecord], Optional[str]]


MINIMIZE = ("val_loss", "minimize")  # the default objective


def objective_value(val_loss: float, metrics: dict[str, float], metric: str) -> float:
    return val_loss if metric == "val_loss" else metrics.get(metric, math.nan)


@dataclass
class History:
    """One member's training as `Curves` decided it: per-epoch curves, the best epoch by the objective (1-based; 0
    when no epoch had a finite objective), how it ended (`status`: completed | diverged | stopped | failed, and
    `stop_reason`), and, set by the engine, the best state and the seconds it took."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    confusion_matrix: list[list[int]] | None = None
    status: str = "completed"
    stop_reason: str | None = None
    seconds: float = 0.0
    # set by the stacked engine, for a rerun to train as it did (track/rerun.py): the hidden width the MLP's group
    # padded it to, and how many members the group had (batched kernels sum in blocks of members)
    stacked_width: int | None = None
    stacked_members: int | None = None
    objective: tuple[str, str] = MINIMIZE
    best_value: float = math.nan  # the objective's metric at the best epoch (= best_val_loss by default)
    lr: list[float] = field(default_factory=list)  # per epoch, the rate its last optimizer step used (a schedule)
    group_lr: dict[str, list[float]] = field(default_factory=dict)  # per epoch, each named parameter group's rate
    early_stopping: tuple[int, float] | None = None  # (patience, min_delta) on the objective
    epochs_without: int = 0  # epochs in a row, at the end, without an improvement by more than min_delta

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)


# --- the decisions: on a Python float, or on a [K] tensor of members -------------------------------------------


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


class Curves:
    """K members' epochs as [K, epochs] float64 tensors (CPU) and every decision on them, taken for all members at
    once (the reference loop is K = 1). `record` an epoch, tell the hooks (`records`), `stop` the members that end
    there; once training is over, `histories` gives each member's History."""

    def __init__(
        self,
        k: int,
        epochs: int,
        objective: tuple[str, str] = MINIMIZE,
        stopping: list[tuple[int, float] | None] | None = None,
        keep_last: bool = False,
    ):
        self.objective = tuple(objective)
        # a refit's rule (sweep/refit.py): every epoch with a finite objective is kept, so the result is the last
        self.keep_last = keep_last
        # early stopping per member (patience, min_delta; none: infinite patience)
        self.stopping = stopping if stopping and any(stopping) else None
        if self.stopping is not None:
            self.patience = torch.tensor([s[0] if s else math.inf for s in self.stopping], dtype=torch.float64)
            self.min_delta = torch.tensor([s[1] if s else 0.0 for s in self.stopping], dtype=torch.float64)
            self.patience_best = torch.full((k,), math.nan, dtype=torch.float64)
            self.epochs_without = torch.zeros(k, dtype=torch.int64)
        self.sign = 1.0 if self.objective[1] == "minimize" else -1.0  # decisions on sign * value: lower is better
        self.best_score = torch.full((k,), math.inf, dtype=torch.float64)
        self.best_value = torch.full((k,), math.nan, dtype=torch.float64)
        self.train = torch.full((k, epochs), math.nan, dtype=torch.float64)
        self.val = torch.full((k, epochs), math.nan, dtype=torch.float64)
        self.metrics: dict[str, torch.Tensor] = {}
        self.confusion: torch.Tensor | None = None  # each member's at its best epoch
        self.best_val = torch.full((k,), math.inf, dtype=torch.float64)
        self.best_epoch = torch.zeros(k, dtype=torch.int64)
        self.active = torch.ones(k, dtype=torch.bool)
        self.all_active = True  # no member has ended (kept beside `active` to skip masking in the common case)
        self.epochs_run = torch.zeros(k, dtype=torch.int64)
        self.status = ["completed"] * k
        self.reasons: dict[int, str] = {}  # why each member that ended early ended
        self.lr = torch.full((k, epochs), math.nan, dtype=torch.float64)  # members with a schedule: History.lr

    def record(
        self,
        epoch: int,
        train: torch.Tensor,
        val: torch.Tensor,
        metrics: dict[str, torch.Tensor],
        confusion: torch.Tensor | None,
    ) -> torch.Tensor:
        """One epoch of the members still recording ([K] float64 losses, each metric [K], confusion [K, C, C] or
        None); returns which of them improved ([K] bool)."""
        column, active = epoch - 1, self.active
        if self.all_active:  # the common case, without masked indexing (an epoch of the reference loop is K = 1)
            self.train[:, column], self.val[:, column] = train, val
            for name, values in metrics.items():
                self.metrics.setdefault(name, torch.full_like(self.train, math.nan))[:, column] = values
        else:
            self.train[:, column] = torch.where(active, train, math.nan)
            self.val[:, column] = torch.where(active, val, math.nan)
            for name, values in metrics.items():
                curve = self.metrics.setdefault(name, torch.full_like(self.train, math.nan))
                curve[:, column] = torch.where(active, values.double(), math.nan)
        value = val if self.objective[0] == "val_loss" else metrics[self.objective[0]].double()
        score = self.sign * value
        # finite and strictly better (NaN compares false; +inf is never below the best; -inf is refused): a tie
        # keeps the first
        improved = active & (score < self.best_score) & (score != -math.inf)
        if self.keep_last:
            improved = active & (score.abs() < math.inf)
        self.best_score = torch.where(improved, score, self.best_score)
        self.best_value = torch.where(improved, value, self.best_value)
        self.best_val = torch.where(improved, val, self.best_val)
        self.best_epoch.masked_fill_(improved, epoch)
        if confusion is not None:
            self.confusion = torch.zeros_like(confusion) if self.confusion is None else self.confusion
            self.confusion[improved] = confusion[improved]
        self.epochs_run.masked_fill_(active, epoch)
        if self.stopping is not None:
            minimize = self.objective[1] == "minimize"
            unset = math.inf if minimize else -math.inf
            reference = torch.where(torch.isnan(self.patience_best), unset, self.patience_best)
            better = active & improves(value, reference, minimize, self.min_delta)
            self.patience_best = torch.where(better, value, self.patience_best)
            self.epochs_without = torch.where(better, 0, self.epochs_without + active.long())
        return improved

    def records(
        self, epoch: int, train: torch.Tensor, val: torch.Tensor, metrics: dict, improved: torch.Tensor
    ) -> dict[int, EpochRecord]:
        """{row: the EpochRecord a hook sees} for each member still recording, after `record`."""
        metric = self.objective[0]
        train_values, val_values = train.tolist(), val.tolist()
        best_values, best_epochs = self.best_val.tolist(), self.best_epoch.tolist()
        objective_best, improved_values = self.best_value.tolist(), improved.tolist()
        metric_values = {name: values.tolist() for name, values in metrics.items()}
        rates = self.lr[:, epoch - 1].tolist()
        out = {}
        for i in self.active.nonzero().flatten().tolist():
            epoch_metrics = {name: values[i] for name, values in metric_values.items()}
            out[i] = EpochRecord(
                epoch,
                train_values[i],
                val_values[i],
                epoch_metrics,
                best_values[i],
                best_epochs[i],
                improved_values[i],
                val_values[i] if metric == "val_loss" else epoch_metrics.get(metric, math.nan),
                objective_best[i],
                None if math.isnan(rates[i]) else rates[i],
            )
        return out

    def stop(self, epoch: int, train: torch.Tensor, val: torch.Tensor, reasons: dict[int, str]) -> None:
        """After `record`, each member still recording ends here, in this order of precedence: a non-finite
        training or validation loss ("diverged"), a hook's reason ("stopped"), `patience` epochs without an
        improvement by more than min_delta (early stopping: completed, its best epoch its result)."""
        active = self.active
        finite = (train.abs() < math.inf) & (val.abs() < math.inf)  # NaN compares false
        diverged = active & ~finite
        ended = diverged.clone()
        if bool(diverged.any()):
            for i in diverged.nonzero().flatten().tolist():
                self.status[i] = "diverged"
                self.reasons[i] = f"diverged at epoch {epoch} (train_loss={train[i].item()}, val_loss={val[i].item()})"
        for row, reason in reasons.items():
            if active[row] and not diverged[row]:
                self.status[row], self.reasons[row] = "stopped", reason
                ended[row] = True
        if self.stopping is not None:
            patient = active & ~ended & out_of_patience(self.epochs_without, self.patience)
            for i in patient.nonzero().flatten().tolist():
                patience, min_delta = self.stopping[i]
                by = f" by more than {min_delta:g}" if min_delta else ""
                self.reasons[i] = (
                    f"early stopping at epoch {epoch}: {self.objective[0]} did not improve{by} in {patience} epochs"
                )
            ended |= patient
        if bool(ended.any()):
            self.active = active & ~ended
            self.all_active = False

    def histories(self) -> list[History]:
        """Each member's History, once training is over. A member that trained without one finite objective has
        no best epoch and no result: it failed, with the reason."""
        train, val = self.train.tolist(), self.val.tolist()
        metrics = {name: curve.tolist() for name, curve in self.metrics.items()}
        confusion = self.confusion.tolist() if self.confusion is not None else None
        lr = self.lr.tolist()
        metric = self.objective[0]
        out = []
        for i, (n, best) in enumerate(zip(self.epochs_run.tolist(), self.best_epoch.tolist())):
            history = History(
                train[i][:n],
                val[i][:n],
                {name: curve[i][:n] for name, curve in metrics.items()},
                objective=self.objective,
                status=self.status[i],
                stop_reason=self.reasons.get(i),
            )
            if best:
                history.best_epoch, history.best_val_loss = best, val[i][best - 1]
                history.best_value = (
                    history.val_loss[best - 1] if metric == "val_loss" else history.metrics[metric][best - 1]
                )
                history.best_metrics = {name: curve[i][best - 1] for name, curve in metrics.items()}
                history.confusion_matrix = confusion[i] if confusion is not None else None
            elif n and history.status == "completed":  # trained, never a finite objective: no result
                last = history.val_loss[-1] if metric == "val_loss" else history.metrics.get(metric, [math.nan])[-1]
                history.status = "failed"
                history.stop_reason = (
                    f"{metric} was not finite at any of its {n} epochs (the last: {last}): no best epoch"
                )
            if n and not math.isnan(lr[i][0]):
                history.lr = lr[i][:n]
            if self.stopping is not None and self.stopping[i]:
                history.early_stopping = self.stopping[i]
                history.epochs_without = int(self.epochs_without[i])
            out.append(history)
        return out


# --- what both engines draw and average ---------------------------------------------------------------------------


def draw_order(
    n: int, shuffle: bool, generator: torch.Generator | None = None, global_generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """One epoch's batch order, consuming the random generators exactly as `DataLoader(dataset, shuffle,
    generator)` does: each pass first takes a base seed from the loader's generator (else the global RNG:
    `global_generator`, or torch's own when None); when shuffling, two `randperm`s from the loader's generator
    (RandomSampler discards the second; without a generator, a fresh one seeded from the global RNG). None when
    not shuffling (the data's own order)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator or global_generator)
    if not shuffle:
        return None
    if generator is None:
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=global_generator).item())
        generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return perm


def sample_average(batch_losses: list[torch.Tensor], sizes: list[int], n: int) -> torch.Tensor:
    """Each member's per-sample average of a split's batch losses (batch means [K], or scalars for K = 1):
    sum(batch mean * batch size) / n, in float64, in batch order: the seed's sum of Python floats, bit for bit.
    Returns [K] float64 (CPU). One host transfer per epoch, not one per batch."""
    stacked = torch.stack(batch_losses).detach()
    if stacked.dim() == 1:  # K = 1: Python floats (each float32 mean exactly) are faster than a tensor op a batch
        total = 0.0
        for value, size in zip(stacked.tolist(), sizes):
            total += value * size
        return torch.tensor([total / n], dtype=torch.float64)
    stacked = stacked.double().cpu()
    total = torch.zeros(stacked.shape[1], dtype=torch.float64)
    for losses, size in zip(stacked, sizes):
        total += losses * size
    return total / n


# --- the metrics of an epoch's validation -------------------------------------------------------------------------


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
