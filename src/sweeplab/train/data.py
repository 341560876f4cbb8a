"""Datasets: the seed's synthetic generator, CSV files, scikit-learn's bundled sets and a user's own loader
(named by import path), split into train and validation tensors. Inputs keep their shape: images stay [N, C, H, W].

`make_dataset(config)` draws from torch's global RNG exactly as the seed does (X, then noise), so calling it right
after `torch.manual_seed(seed)` gives the seed's samples. The split is `random_split`'s permutation. Batching is in
loop.py; the model that fits the data is in model.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from sweeplab.config import ConfigError, DataConfig, ExperimentConfig
from sweeplab.stop import Stopped
from sweeplab.train.plugins import error_text, exit_text, import_object, user_code


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
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (2,) for the seed's data, (1, 8, 8) for digits."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_classes(self) -> int | None:
        return None if self.task == "regression" else (2 if self.task == "binary" else self.n_outputs)


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
    split = None
    if data.source == "csv":
        x, y, names = _read_csv(data, config.task)
        description = f"csv:{data.path}"
    elif data.source == "sklearn":
        x, y, names = _sklearn(data.name, config.task)
        description = f"sklearn:{data.name}"
    elif data.source == "python":
        x, y, split = _from_loader(config)
        names = ()
        description = f"python:{data.class_path}"
    else:
        x, y = synthetic_xy(data.n_samples, data.noise)
        y = labels_for_task(y, config.task, data.n_classes)
        names = ("x1", "x2")
        description = f"synthetic(n={data.n_samples}, noise={data.noise})"
    if split is not None:  # the loader's own train/validation split
        (x_train, y_train), (x_val, y_val) = split
    else:
        n = x.shape[0]
        n_train, n_val = split_lengths(n, data.val_size)
        if n_train < 1 or n_val < 1:
            raise ConfigError(
                f"data.val_size: {data.val_size} leaves {n_train} train and {n_val} validation samples of {n}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.split_seed))
        train_idx, val_idx = perm[:n_train], perm[n_train:]
        x_train, y_train, x_val, y_val = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    if data.train_fraction < 1:  # the first of the (shuffled) training split: smaller sets nest in larger ones
        keep = max(1, math.floor(x_train.shape[0] * data.train_fraction))
        x_train, y_train = x_train[:keep], y_train[:keep]
        description += f", train_fraction={data.train_fraction:g}"
    if not names:
        names = tuple(f"x{i + 1}" for i in range(math.prod(x_train.shape[1:])))
    if data.source == "synthetic":
        n_classes = data.n_classes
    elif data.source == "sklearn" and config.task == "multiclass":
        n_classes = {"digits": 10, "iris": 3, "wine": 3, "breast_cancer": 2}[data.name]
    else:
        n_classes = _classes(torch.cat([y_train, y_val]), config) if config.task == "multiclass" else 1
    return Dataset(x_train, y_train, x_val, y_val, names, _n_outputs(config.task, n_classes), config.task, description)


def check_data(config: ExperimentConfig) -> Dataset | None:
    """Read and check a CSV, scikit-learn or python data source once, before anything is written anywhere (a bad
    value is one line naming the file, column and row; a loader that fails, one line naming data.class_path); the
    seed's generator needs no check. Returns the data set when it built one (seeded as a run seeds it)."""
    if config.data.source in ("sklearn", "python"):
        dataset = seeded_dataset(config)
        if config.predict_x and any(len(row) != dataset.n_features for row in config.predict_x):
            raise ConfigError(f"predict_x: rows must have {dataset.n_features} values, one per feature")
        return dataset
    if config.data.source == "csv":
        x, _, _ = _read_csv(config.data, config.task)
        n_train, n_val = split_lengths(x.shape[0], config.data.val_size)
        if n_train < 1 or n_val < 1:
            raise ConfigError(
                f"data.val_size: {config.data.val_size} leaves {n_train} train and {n_val} validation "
                f"samples of {x.shape[0]}"
            )
        if config.predict_x and any(len(row) != x.shape[1] for row in config.predict_x):
            raise ConfigError(f"predict_x: rows must have {x.shape[1]} values, one per feature")
    return None


def seeded_dataset(config: ExperimentConfig) -> Dataset:
    """The data set a run of `config` trains on (seeded as the run seeds it), leaving torch's RNG as it was."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(config.seed)
        return make_dataset(config)
    finally:
        torch.set_rng_state(state)


def _n_outputs(task: str, n_classes: int) -> int:
    return n_classes if task == "multiclass" else 1


def _classes(labels: torch.Tensor, config: ExperimentConfig) -> int:
    """K for labels that must be 0..K-1, every one of them present: labels 1..K (class 0 never seen, yet given
    a logit) or {0, 5, 1000} (a 1001-way head for three classes) are an encoding to map first, said in one line."""
    present = torch.unique(labels)
    k = int(present.max()) + 1
    if len(present) != k:
        where = (
            f"data.path {config.data.path}"
            if config.data.source == "csv"
            else f"data.class_path {config.data.class_path}"
        )
        missing = sorted(set(range(k)) - set(present.tolist()))
        shown = ", ".join(map(str, present.tolist()[:6])) + (", ..." if len(present) > 6 else "")
        raise ConfigError(
            f"{where}: multiclass labels must be 0..K-1 with every class present; got {{{shown}}}, with no sample of "
            f"class {missing[0]}{' and ' + str(len(missing) - 1) + ' more' if len(missing) > 1 else ''}: map them "
            "to 0..K-1 first (e.g. sklearn's LabelEncoder)"
        )
    return k


def _read_csv(data: DataConfig, task: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    import pandas as pd  # CSV data only (~0.3 s to import)

    try:
        frame = pd.read_csv(data.path)
    except FileNotFoundError:
        raise ConfigError(f"data.path: no such file {data.path}") from None
    except Exception as exc:  # pandas raises many kinds for a broken file
        raise ConfigError(f"{data.path}: not a readable CSV file ({exc})") from None
    if data.target not in frame.columns:
        raise ConfigError(
            f"{data.path}: data.target column {data.target!r} not found (columns: {', '.join(map(str, frame.columns))})"
        )
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
    infinite = numeric.abs() > FLOAT32_MAX  # 1e39 is finite in float64, infinite in the float32 it trains as
    if infinite.any().any():
        column = infinite.any()[infinite.any()].index[0]
        row = int(infinite[column].to_numpy().nonzero()[0][0])
        raise ConfigError(
            f"{data.path}: column {column!r} row {row + 2} is not a finite number: {frame[column].iloc[row]}"
        )
    x = torch.tensor(numeric.to_numpy(dtype="float32"))
    target = frame[data.target]
    codes = pd.to_numeric(target, errors="coerce")
    for bad, what in (
        (codes.isna() & target.notna(), "is not a number: {!r}"),
        (target.isna(), "is missing"),
        (codes.abs() > FLOAT32_MAX, "is not a finite number: {}"),
    ):
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise ConfigError(
                f"{data.path}: data.target column {data.target!r} row {row + 2} " + what.format(target.iloc[row])
            )
    if task == "regression":
        y = torch.tensor(codes.to_numpy(dtype="float32")).unsqueeze(1)
    else:
        if (codes != codes.round()).any() or (codes < 0).any():
            raise ConfigError(
                f"{data.path}: data.target {data.target!r} must hold class indices 0..K-1 for task {task}"
            )
        labels = torch.tensor(codes.to_numpy(dtype="int64"))
        if task == "binary":
            if int(labels.max()) > 1:
                raise ConfigError(f"{data.path}: data.target {data.target!r} has labels above 1 for task binary")
            y = labels.float().unsqueeze(1)
        else:
            y = labels
    return x, y, tuple(features)


def _sklearn(name: str, task: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """One of scikit-learn's bundled data sets (no download): digits as [N, 1, 8, 8] images of 0..16 intensities,
    the others as their feature columns, with their feature names."""
    x, target, names = _sklearn_set(name)
    return x, _labels(target, task, f"data.name {name}"), names


@functools.lru_cache(maxsize=None)
def _sklearn_set(name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Read once per process (~20 ms for digits; every trial of a sweep needs it). The split indexes it into new
    tensors, so nothing downstream writes into these."""
    import sklearn.datasets  # scikit-learn's sets only (~0.6 s to import)

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    if name == "digits":
        x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    else:
        x = torch.tensor(bunch.data, dtype=torch.float32)
    return x, torch.as_tensor(bunch.target), tuple(str(n) for n in bunch.feature_names)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _labels(y: torch.Tensor, task: str, where: str) -> torch.Tensor:
    """Targets in the form the task's loss takes: regression [N, 1] float, binary [N, 1] float 0/1, multiclass
    [N] class indices; anything else is one line naming `where`."""
    if task == "regression":
        if not (y.is_floating_point() or y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)):
            raise ConfigError(f"{where}: targets of dtype {y.dtype} are not numbers")
        if y.dim() > 2:
            raise ConfigError(f"{where}: targets of shape {list(y.shape)}; task regression takes [N] or [N, outputs]")
        y = y.float()
        return y.unsqueeze(1) if y.dim() == 1 else y
    flat = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y
    if flat.dim() != 1:
        raise ConfigError(f"{where}: targets of shape {list(y.shape)}; task {task} takes one class index per sample")
    if flat.is_floating_point() and not bool((flat == flat.round()).all()):
        raise ConfigError(f"{where}: targets are not class indices (task {task} takes 0..K-1); is the task regression?")
    labels = flat.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ConfigError(f"{where}: negative class index {int(labels.min())}; task {task} takes 0..K-1")
    if task == "binary":
        if labels.numel() and int(labels.max()) > 1:
            raise ConfigError(f"{where}: labels above 1 for task binary; is the task multiclass?")
        return labels.float().unsqueeze(1)
    return labels


def _from_loader(config: ExperimentConfig):
    """The user's loader (`data.class_path` + `init_args`), called once: (x, y, None), or (None, None, the split)
    when it gives {"train": (x, y), "val": (x, y)}. A map-style Dataset is read item by item into tensors."""
    data = config.data
    field = "data.class_path"
    loader = import_object(data.class_path, config.code_dir, field)
    if not callable(loader):
        raise ConfigError(f"{field}: {data.class_path} is a {type(loader).__name__}, not a function or class")
    try:
        with user_code():
            got = loader(**data.init_args)
    except TypeError as exc:
        raise ConfigError(f"data.init_args: {data.class_path} refused its arguments: {error_text(exc)}") from None
    except Exception as exc:
        raise ConfigError(f"{field}: {data.class_path}() raised {error_text(exc)}") from None
    except (SystemExit, KeyboardInterrupt) as exc:  # the loader tried to end the process; a Ctrl-C goes on up
        if isinstance(exc, Stopped):
            raise
        raise ConfigError(f"{field}: {data.class_path}() {exit_text(exc)}") from None
    where = f"{field}: {data.class_path}()"
    if isinstance(got, dict):
        if set(got) != {"train", "val"}:
            raise ConfigError(f"{where} returned a dict with keys {sorted(map(str, got))}; give train and val")
        parts = [_pair(got[key], f"{where}[{key!r}]", config.task) for key in ("train", "val")]
        if parts[0][0].shape[1:] != parts[1][0].shape[1:]:
            raise ConfigError(
                f"{where}: train inputs {list(parts[0][0].shape[1:])} and val inputs "
                f"{list(parts[1][0].shape[1:])} differ in shape"
            )
        return None, None, parts
    x, y = _pair(got, where, config.task)
    return x, y, None


def _pair(got, where: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as tensors from a pair of tensors or arrays, or a map-style Dataset of (x, y) items."""
    if isinstance(got, torch.utils.data.Dataset) and not isinstance(got, (tuple, list)):
        try:
            n = len(got)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{where} returned a Dataset without len(); give a map-style Dataset") from None
        if n < 2:
            raise ConfigError(f"{where} returned a Dataset of {n} samples")
        try:
            items = [got[i] for i in range(n)]
            xs = torch.stack([torch.as_tensor(item[0]) for item in items])
            ys = torch.stack([torch.as_tensor(item[1]) for item in items])
        except Exception as exc:
            raise ConfigError(f"{where}: its items are not (input, target) pairs of one shape ({exc})"[:300]) from None
        got = (xs, ys)
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ConfigError(
            f"{where} returned {type(got).__name__}; give (X, y), {{'train': (X, y), 'val': (X, y)}} "
            "or a map-style torch Dataset"
        )
    for name, value in zip("Xy", got):  # strings or objects: one line, not torch's list of dtypes
        kind = value.dtype.kind if isinstance(value, np.ndarray) else None
        if kind in ("U", "S", "O"):
            first = np.asarray(value).reshape(-1)[:3].tolist()
            hint = ": map labels to class indices 0..K-1 first (e.g. sklearn's LabelEncoder)" if name == "y" else ""
            raise ConfigError(f"{where}: {name} holds {value.dtype} values such as {first}, not numbers{hint}")
    try:
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in got)
    except (TypeError, ValueError) as exc:  # ragged rows, lists of strings
        raise ConfigError(f"{where}: X and y must be arrays of numbers ({error_text(exc)[:120]})") from None
    if x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"{where}: X {list(x.shape)} and y {list(y.shape)} need one row per sample each")
    if not x.is_floating_point():
        x = x.float()
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{where}: X holds NaN or infinite values")
    y = _labels(y, task, where)
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ConfigError(f"{where}: y holds NaN or infinite values")
    return x.detach().cpu().contiguous(), y.detach().cpu().contiguous()
