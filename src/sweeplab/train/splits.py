"""Which samples each split holds: the test split (`data.test_size`, set aside first), the train/validation split
(random_split's permutation, or scikit-learn's stratified split with `data.stratify`), and a fold member's
(`data.folds: F`) part of the training split.

A fold member (`data.fold = i`, set by sweeplab) trains on the training split less its fold i and validates on
fold i; the validation split stays out of the search (a refit's held-out score). The folds are scikit-learn's:
`StratifiedKFold` on the labels for classification (binary and multiclass), `KFold` for regression or a lazy
Dataset without labels, both shuffled by `data.split_seed`, so a plain loop with scikit-learn gives the same folds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from sweeplab.config import ConfigError, DataConfig
from sweeplab.train import batch
from sweeplab.train.items import IndexedSubset


def split_lengths(n: int, val_size: int | float) -> tuple[int, int]:
    """(train, val) lengths; a fraction is floored for val, as `random_split` floors each part and hands the
    remainder out from the first (train) part on."""
    if isinstance(val_size, float):
        n_val = math.floor(n * val_size)
        n_train = math.floor(n * (1 - val_size))
        remainder = n - n_val - n_train
        n_train += (remainder + 1) // 2
        n_val += remainder // 2
    else:
        n_val = val_size
        n_train = n - n_val
    return n_train, n_val


def split_indices(
    n: int, data: DataConfig, labels: torch.Tensor | None = None, size=None, seed: int | None = None, name: str = "val"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, split off) indices of n samples: `random_split`'s permutation by `data.split_seed` (the validation
    split; `size` and `seed` give the test split's), or with `data.stratify` and `labels`, scikit-learn's
    `train_test_split(stratify=labels)` by the same seed."""
    size = data.val_size if size is None else size
    seed = data.split_seed if seed is None else seed
    n_kept, n_off = split_lengths(n, size)
    if n_kept < 1 or n_off < 1:
        kept = "train" if name == "val" else "train and validation"
        raise ConfigError(f"data.{name}_size: {size} leaves {n_kept} {kept} and {n_off} {name} samples of {n}")
    if data.stratify and labels is not None:
        from sklearn.model_selection import train_test_split

        try:
            kept, off = train_test_split(
                np.arange(n), test_size=n_off, train_size=n_kept, stratify=labels.numpy(), random_state=seed % 2**32
            )
        except ValueError as exc:  # a class too rare to appear in both parts
            raise ConfigError(f"data.stratify: {exc}") from None
        return torch.from_numpy(kept), torch.from_numpy(off)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_kept], perm[n_kept:]


def partition(n: int, y: torch.Tensor | None, data: DataConfig, task: str):
    """(train, validation, test) positions of n samples, the one way every data set is split: the test split set
    aside first by its own seed (`data.test_size`, `data.test_seed`; None without it), so the rest splits as it
    would without one, then the rest into training and validation (`split_indices`). `y` (or None: a lazy Dataset
    without labels) stratifies both with `data.stratify`."""
    labels = class_labels(y, task) if data.stratify else None
    rest, test = torch.arange(n), None
    if data.test_size is not None:
        rest, test = split_indices(n, data, labels, data.test_size, data.test_seed, "test")
        labels = labels[rest] if labels is not None else None
    train, val = (rest[i] for i in split_indices(len(rest), data, labels))
    return train, val, test


def train_kept(n_train: int, data: DataConfig) -> int:
    """How many of the (shuffled) training split `data.train_fraction` keeps: its first ones, so smaller sets nest
    in larger ones."""
    return max(1, math.floor(n_train * data.train_fraction))


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
