"""Datasets: the seed's synthetic generator and CSV files, split into train and validation tensors.

`make_dataset(config)` draws from torch's global RNG exactly as the seed does (X, then noise), so calling it right
after `torch.manual_seed(seed)` gives the seed's samples. The split is `random_split`'s permutation. Batching is in
loop.py; the model that fits the data is in model.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError, DataConfig, ExperimentConfig


@dataclass(frozen=True)
class Dataset:
    """Train/validation tensors (on CPU) and what a model needs to know about them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    feature_names: tuple[str, ...]
    n_outputs: int
    task: str
    description: str

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def synthetic_xy(n_samples: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's generator, drawing from the global RNG: y = 3*x1 + 2*x2 + 5 + noise * N(0, 1)."""
    x = torch.randn(n_samples, 2)
    eps = torch.randn(n_samples, 1) * noise
    y = 3 * x[:, [0]] + 2 * x[:, [1]] + 5 + eps
    return x, y


def multiclass_edges(n_classes: int) -> torch.Tensor:
    """Cut points that make the classes equally likely for the noiseless target y ~ N(5, 13)."""
    probs = torch.arange(1, n_classes, dtype=torch.float64) / n_classes
    return (5 + math.sqrt(13) * torch.special.ndtri(probs)).to(torch.float32)


def labels_for_task(y: torch.Tensor, task: str, n_classes: int) -> torch.Tensor:
    """Regression keeps y [N, 1]; binary is (y > 5) as float [N, 1]; multiclass is a class index [N] (long)."""
    if task == "regression":
        return y
    if task == "binary":
        return (y > 5).float()
    return torch.bucketize(y[:, 0], multiclass_edges(n_classes))


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


def make_dataset(config: ExperimentConfig) -> Dataset:
    data = config.data
    if data.source == "csv":
        x, y, names = _read_csv(data, config.task)
        description = f"csv:{data.path}"
    else:
        x, y = synthetic_xy(data.n_samples, data.noise)
        y = labels_for_task(y, config.task, data.n_classes)
        names = ("x1", "x2")
        description = f"synthetic(n={data.n_samples}, noise={data.noise})"
    n = x.shape[0]
    n_train, n_val = split_lengths(n, data.val_size)
    if n_train < 1 or n_val < 1:
        raise ConfigError(f"data.val_size: {data.val_size} leaves {n_train} train and {n_val} validation samples of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.split_seed))
    train_idx, val_idx = perm[:n_train], perm[n_train:]
    n_outputs = _n_outputs(config.task, data.n_classes if data.source == "synthetic" else int(y.max()) + 1)
    return Dataset(x[train_idx], y[train_idx], x[val_idx], y[val_idx], names, n_outputs, config.task, description)


def check_data(config: ExperimentConfig) -> None:
    """Read and check a CSV data source once, before anything is written anywhere (a bad value is one line naming
    the file, column and row); the seed's generator needs no check. Draws nothing from torch's RNG."""
    if config.data.source == "csv":
        x, _, _ = _read_csv(config.data, config.task)
        n_train, n_val = split_lengths(x.shape[0], config.data.val_size)
        if n_train < 1 or n_val < 1:
            raise ConfigError(f"data.val_size: {config.data.val_size} leaves {n_train} train and {n_val} validation "
                              f"samples of {x.shape[0]}")
        if config.predict_x and any(len(row) != x.shape[1] for row in config.predict_x):
            raise ConfigError(f"predict_x: rows must have {x.shape[1]} values, one per feature")


def _n_outputs(task: str, n_classes: int) -> int:
    return n_classes if task == "multiclass" else 1


def _read_csv(data: DataConfig, task: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    import pandas as pd

    try:
        frame = pd.read_csv(data.path)
    except FileNotFoundError:
        raise ConfigError(f"data.path: no such file {data.path}") from None
    except Exception as exc:  # pandas raises many kinds for a broken file
        raise ConfigError(f"{data.path}: not a readable CSV file ({exc})") from None
    if data.target not in frame.columns:
        raise ConfigError(f"{data.path}: data.target column {data.target!r} not found (columns: {', '.join(map(str, frame.columns))})")
    features = data.features or [c for c in frame.columns if c != data.target]
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ConfigError(f"{data.path}: data.features column(s) not found: {', '.join(missing)}")
    numeric = frame[features].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & frame[features].notna()
    if bad.any().any():
        column = bad.any()[bad.any()].index[0]
        row = int(bad[column].to_numpy().nonzero()[0][0])
        raise ConfigError(f"{data.path}: column {column!r} row {row + 2} is not a number: {frame[column].iloc[row]!r}")
    if numeric.isna().any().any():
        column = numeric.columns[numeric.isna().any()][0]
        raise ConfigError(f"{data.path}: column {column!r} has missing values")
    infinite = numeric.isin([math.inf, -math.inf])
    if infinite.any().any():
        column = infinite.any()[infinite.any()].index[0]
        row = int(infinite[column].to_numpy().nonzero()[0][0])
        raise ConfigError(f"{data.path}: column {column!r} row {row + 2} is not a finite number: {frame[column].iloc[row]}")
    x = torch.tensor(numeric.to_numpy(dtype="float32"))
    target = frame[data.target]
    codes = pd.to_numeric(target, errors="coerce")
    for bad, what in ((codes.isna() & target.notna(), "is not a number: {!r}"), (target.isna(), "is missing"),
                      (codes.isin([math.inf, -math.inf]), "is not a finite number: {}")):
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise ConfigError(f"{data.path}: data.target column {data.target!r} row {row + 2} "
                              + what.format(target.iloc[row]))
    if task == "regression":
        y = torch.tensor(codes.to_numpy(dtype="float32")).unsqueeze(1)
    else:
        if (codes != codes.round()).any() or (codes < 0).any():
            raise ConfigError(f"{data.path}: data.target {data.target!r} must hold class indices 0..K-1 for task {task}")
        labels = torch.tensor(codes.to_numpy(dtype="int64"))
        if task == "binary":
            if int(labels.max()) > 1:
                raise ConfigError(f"{data.path}: data.target {data.target!r} has labels above 1 for task binary")
            y = labels.float().unsqueeze(1)
        else:
            y = labels
    return x, y, tuple(features)
