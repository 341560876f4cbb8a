"""k-fold cross-validation (`data.folds: F`) for any engine: a trial trained as F fold members, scored by their mean.

`Folded` wraps the engine a sweep (or a rerun) trains with. Each job whose config asks for folds becomes F fold
members (`data.fold = 0..F-1`: train/splits.py gives each its data), trained by the wrapped engine beside the batch's
other jobs: the stacked engine stacks the folds of every trial of a batch as members of its groups. Once every fold
has trained epoch e, the trial's epoch e is the mean over folds of the training and validation losses and of every
metric, with each fold's own as `fold<i>_<metric>`; one `epoch.Curves` (K = 1) takes the trial's decisions on that
mean curve, as it takes any run's: best epoch, objective, early stopping, divergence and a hook's (a pruner's)
reason. Fold members train without early stopping of their own, and are stopped once the trial is.

A fold trial keeps no weights of its own (its folds' best epochs differ): a sweep's champion is refit on the whole
training split for the mean curve's best epoch (sweep/driver.refit), as scikit-learn's GridSearchCV refits.
"""

from __future__ import annotations

import math

import torch

from sweeplab.config import ExperimentConfig
from sweeplab.train.data import seeded_dataset
from sweeplab.train.engines import Engine, EpochHook, Job
from sweeplab.train.epoch import Curves, EpochRecord
from sweeplab.train.experiment import Trained, model_spec_for


def fold_config(config: ExperimentConfig, fold: int) -> ExperimentConfig:
    """Fold `fold`'s member: its data, and no early stopping of its own (the trial's mean curve decides)."""
    data = config.data.model_copy(update={"fold": fold})
    train = config.train.model_copy(update={"early_stopping": None})
    return config.model_copy(update={"data": data, "train": train})


def is_folded(config: ExperimentConfig) -> bool:
    return config.data.folds is not None and config.data.fold is None


def refit_config(config: ExperimentConfig, epochs: int) -> ExperimentConfig:
    """A fold trial's configuration refit on the whole training split for `epochs` (its mean curve's best epoch),
    without early stopping: scikit-learn's GridSearchCV refit. Its last epoch is its result (`keep_last`)."""
    data = config.data.model_copy(update={"folds": None, "fold": None})
    train = config.train.model_copy(update={"epochs": max(1, int(epochs)), "early_stopping": None})
    return config.model_copy(update={"data": data, "train": train})


class _Trial:
    """One fold trial on its way: its members' epochs as they come, and its Curves over their mean."""

    def __init__(self, job: Job, on_epoch: EpochHook | None):
        self.job, self.on_epoch = job, on_epoch
        config = job.config
        self.folds = config.data.folds
        self.members = [Job(job.lease, fold_config(config, i)) for i in range(self.folds)]
        stopping = config.train.early_stopping
        self.curves = Curves(
            1,
            config.train.epochs,
            (config.objective.metric, config.objective.direction),
            [(stopping.patience, stopping.min_delta) if stopping else None],
        )
        self.epochs: dict[int, dict[int, EpochRecord]] = {}  # epoch -> {fold: its record}
        self.ended_at: int | None = None  # the trial's last epoch, once it ended before its members

    def epoch(self, fold: int, record: EpochRecord) -> str | None:
        """A member's epoch; when it completes the trial's epoch, the trial's decisions on the mean. Returns why the
        member stops (the trial ended), or None."""
        if self.ended_at is not None:
            return f"its trial ended at epoch {self.ended_at}"
        seen = self.epochs.setdefault(record.epoch, {})
        seen[fold] = record
        if len(seen) < self.folds:
            return None
        return self._decide(record.epoch, [seen[i] for i in range(self.folds)])

    def _decide(self, epoch: int, records: list[EpochRecord]) -> str | None:
        del self.epochs[epoch]
        train = torch.tensor([_mean([r.train_loss for r in records])], dtype=torch.float64)
        val = torch.tensor([_mean([r.val_loss for r in records])], dtype=torch.float64)
        metrics = {
            name: torch.tensor([_mean([r.metrics.get(name, math.nan) for r in records])], dtype=torch.float64)
            for name in records[0].metrics
        }
        for i, r in enumerate(records):
            metrics[f"fold{i}_train_loss"] = torch.tensor([r.train_loss], dtype=torch.float64)
            metrics[f"fold{i}_val_loss"] = torch.tensor([r.val_loss], dtype=torch.float64)
            for name, value in r.metrics.items():
                metrics[f"fold{i}_{name}"] = torch.tensor([value], dtype=torch.float64)
        curves = self.curves
        improved = curves.record(epoch, train, val, metrics, None)
        reasons = []
        if self.on_epoch is not None:
            (record,) = curves.records(epoch, train, val, metrics, improved).values()
            reason = self.on_epoch(self.job, record)
            reasons = [reason] if reason else []
        curves.stop(epoch, train, val, {0: reasons[0]} if reasons else {})
        if curves.all_active:
            return None
        self.ended_at = epoch
        return f"its trial ended at epoch {epoch}"

    def finish(self) -> None:
        """The trial's result from its members': its History over the mean curve, or the first member's failure."""
        failed = [m.error for m in self.members if m.error is not None]
        if failed:
            self.job.error = failed[0]
            return
        (history,) = self.curves.histories()  # over the epochs every fold trained
        history.seconds = sum(m.result.history.seconds for m in self.members)
        stacked = [m.result.history.stacked_members for m in self.members]
        history.stacked_members = max(stacked) if None not in stacked else None  # its folds' group (the largest)
        config = self.job.config
        dataset = seeded_dataset(config)  # the whole training split: what the trial describes and a refit trains on
        self.job.result = Trained(config, dataset, model_spec_for(config, dataset), history)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


class Folded:
    """An engine (the one it wraps) that trains `data.folds` trials as their fold members (module docstring)."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.name, self.live, self.stacks = inner.name, inner.live, inner.stacks

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        trials = [_Trial(job, on_epoch) for job in jobs if is_folded(job.config)]
        if not trials:
            return self.inner.train(jobs, on_epoch)
        owner = {id(member): (trial, i) for trial in trials for i, member in enumerate(trial.members)}
        plain = [job for job in jobs if not is_folded(job.config)]
        members = [member for trial in trials for member in trial.members]

        def hook(job: Job, record: EpochRecord) -> str | None:
            if id(job) in owner:
                trial, fold = owner[id(job)]
                return trial.epoch(fold, record)
            return on_epoch(job, record) if on_epoch is not None else None

        try:
            self.inner.train(plain + members, hook)
        finally:
            for trial in trials:
                if all(m.result is not None or m.error is not None for m in trial.members):
                    trial.finish()
