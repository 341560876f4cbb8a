"""`data.folds: F`: which samples of the training split each fold holds out, and a fold member's data.

A fold member (`data.fold = i`, set by sweeplab) trains on the training split less its fold i and validates on
fold i; the validation split stays out of the search (a refit's held-out score). The folds are scikit-learn's:
`StratifiedKFold` on the labels for classification (binary and multiclass), `KFold` for regression or a lazy
Dataset without labels, both shuffled by `data.split_seed`, so a plain loop with scikit-learn gives the same folds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sweeplab.config import ConfigError, DataConfig
from sweeplab.train import batch
from sweeplab.train.items import IndexedSubset


def fold_indices(n: int, labels: torch.Tensor | None, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) positions in the training split for fold `data.fold` of `data.folds`; `labels` ([n] class
    indices, or None) stratify them. One line for folds the data cannot give."""
    from sklearn.model_selection import KFold, StratifiedKFold

    folds = data.folds
    if folds > n:
        raise ConfigError(f"data.folds: {folds} folds of a training split of {n} samples")
    seed = data.split_seed % 2**32  # scikit-learn's random_state is 32 bits
    if labels is not None:
        counts = np.bincount(labels.numpy())
        present = counts[counts > 0]
        if present.min() < folds:
            rare = int(np.flatnonzero(counts == present.min())[0])
            raise ConfigError(
                f"data.folds: {folds} stratified folds need {folds} training samples of each class; class {rare} "
                f"has {present.min()}"
            )
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        split = splitter.split(np.zeros(n), labels.numpy())
    else:
        split = KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n))
    for i, (train, held_out) in enumerate(split):
        if i == data.fold:
            return train, held_out
    raise AssertionError("unreachable: fold < folds is validated")


def class_labels(y: torch.Tensor | None, task: str) -> torch.Tensor | None:
    """The labels that stratify folds: multiclass indices [N], binary [N, 1] 0/1 as indices; None for regression."""
    if y is None or task == "regression":
        return None
    return y.reshape(-1).long()


def hold_out(dataset, data: DataConfig):
    """The fold member's data set: the training split less fold `data.fold` to train on, that fold to validate on."""
    labels = class_labels(dataset.y_train, dataset.task)
    train, held = fold_indices(dataset.n_train, labels, data)
    where = f", fold {data.fold + 1} of {data.folds}"
    y_train = dataset.y_train
    ys = (y_train[train], y_train[held]) if y_train is not None else (None, None)
    if dataset.lazy:
        parts = IndexedSubset(dataset.train_set, train), IndexedSubset(dataset.train_set, held)
        return dataclasses.replace(
            dataset,
            train_set=parts[0],
            val_set=parts[1],
            y_train=ys[0],
            y_val=ys[1],
            description=dataset.description + where,
        )
    t, h = torch.from_numpy(train), torch.from_numpy(held)
    return dataclasses.replace(
        dataset,
        x_train=batch.take(dataset.x_train, t),
        y_train=ys[0],
        x_val=batch.take(dataset.x_train, h),
        y_val=ys[1],
        description=dataset.description + where,
    )
