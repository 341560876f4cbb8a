"""Datasets: the seed's synthetic generator, CSV files, scikit-learn's bundled sets and a user's own loader
(named by import path), split into train and validation tensors. Inputs keep their shape: images stay [N, C, H, W].

`make_dataset(config)` draws from torch's global RNG exactly as the seed does (X, then noise), so calling it right
after `torch.manual_seed(seed)` gives the seed's samples. Which samples each split holds (random_split's
permutation, a stratified split, a test split, a fold) is splits.py; batching is loop.py and items.py; the model
that fits the data is model.py. A small map-style Dataset is read into memory once (`in_memory`); a larger one is
split by indices and read lazily. Why one module of ~800 lines: every source ends in the same Dataset and the same
one-line refusals naming the file, column, row or item, and those checks are most of it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset, default_collate

from sweeplab.config import ConfigError, DataConfig, ExperimentConfig
from sweeplab.stop import Stopped
from sweeplab.train import batch
from sweeplab.train.batch import Inputs
from sweeplab.train.items import (  # how items become batches (and a bad one is named): items.py
    IndexedSubset,
    InMemoryItems,
    as_tensors,
    index_in_dataset,
    outside_classes,
    outside_text,
    target_for_task,
)
from sweeplab.train.model import classes_from_model
from sweeplab.train.plugins import error_text, exit_text, import_object, user_code
from sweeplab.train.splits import hold_out, partition, split_lengths, train_kept


@dataclass(frozen=True)
class Dataset:
    """Train/validation data and what a model needs to know about them.

    In memory (the default where it applies): `x_*` are tensors, or tuples/dicts of tensors (several inputs), with
    one row per sample, and `y_*` the targets. Lazy (a map-style Dataset the user's loader returned): `train_set` /
    `val_set` are Subsets of it by the split's indices, never read whole; batches come from a DataLoader
    (`loop.LoaderBatches`); `y_*` are known only when the Dataset has a `targets` attribute. `collate_fn` (the
    user's `data.collate_fn`) makes batches wherever they are made; `example` is a batch of the first validation
    samples (what checks, the logged example and the champion's export use)."""

    x_train: Inputs | None
    y_train: torch.Tensor | None
    x_val: Inputs | None
    y_val: torch.Tensor | None
    feature_names: tuple[str, ...]
    n_outputs: int
    task: str
    description: str
    train_set: TorchDataset | None = None
    val_set: TorchDataset | None = None
    collate_fn: Callable | None = None
    example: tuple[Inputs, torch.Tensor] | None = None
    loader_args: dict = field(default_factory=dict)  # num_workers, pin_memory, persistent_workers
    where: str = "data"  # how errors name the data: `data.class_path: my_data.load()` for a user's loader
    collated_shape: tuple[int, ...] = ()  # one sample's shape where the collate_fn keeps it (_example); () if not
    # the test split (data.test_size, or a loader's `test`): never trained or validated on; scored once at the end
    x_test: Inputs | None = None
    y_test: torch.Tensor | None = None
    test_set: TorchDataset | None = None
    class_names: tuple[str, ...] = ()  # data.classes, or a Dataset's `classes`: the labels' names in order

    @property
    def has_test(self) -> bool:
        return self.test_set is not None or self.y_test is not None

    def test_view(self) -> "Dataset":
        """This data set with its test split where the validation split is: what scoring on it evaluates."""
        return dataclasses.replace(self, x_val=self.x_test, y_val=self.y_test, val_set=self.test_set)

    @property
    def lazy(self) -> bool:
        return self.train_set is not None

    @property
    def n_train(self) -> int:
        return len(self.train_set) if self.lazy else int(self.y_train.shape[0])

    @property
    def n_val(self) -> int:
        return len(self.val_set) if self.lazy else int(self.y_val.shape[0])

    @property
    def inputs(self) -> Inputs:
        """A few samples' inputs (the example batch): the structure the model is called with."""
        return self.example[0] if self.example is not None else self.x_val

    @property
    def structured(self) -> bool:
        """Several inputs (a tuple or dict), not one tensor."""
        return not batch.is_tensor(self.inputs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (2,) for the seed's data, (1, 8, 8) for digits; () when the inputs are several
        tensors, or one whose shape a collate_fn decides per batch (one that keeps every item's shape, as a
        collate_fn that only stacks or transforms does, gives that shape)."""
        if self.structured:
            return ()
        if self.collate_fn is not None:
            return self.collated_shape
        return tuple(self.inputs.shape[1:])

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape) if self.input_shape else 0

    @property
    def n_classes(self) -> int | None:
        return None if self.task == "regression" else (2 if self.task == "binary" else self.n_outputs)

    def first_batch(self, n: int = 2) -> tuple[Inputs, torch.Tensor]:
        """The first `n` training samples as one batch, made as training makes batches (the collate_fn's)."""
        if self.lazy or self.collate_fn is not None:
            items = self.train_set if self.lazy else InMemoryItems(self.x_train, self.y_train)
            collate = self.collate_fn or default_collate
            inputs, target = collate([items[i] for i in range(min(n, len(items)))])
            return inputs, target_for_task(target, self.task)
        return batch.take(self.x_train, slice(n)), self.y_train[:n]


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


def make_dataset(config: ExperimentConfig) -> Dataset:
    """The run's data set: its training and validation splits, or a fold member's (`data.fold`: train/splits.py)."""
    dataset = _named(_make_dataset(config), config)
    return hold_out(dataset, config.data) if config.data.fold is not None else dataset


def _named(dataset: Dataset, config: ExperimentConfig) -> Dataset:
    """The classes' names: `data.classes`, else the `classes` of the user's Dataset (torchvision's convention), as
    many as the classes the labels count."""
    names = config.data.classes
    where = "data.classes"
    if names is None and dataset.lazy:
        source = dataset.train_set
        while not hasattr(source, "classes") and hasattr(source, "dataset"):  # the Subsets down to the user's
            source = source.dataset
        found = getattr(source, "classes", None)
        if isinstance(found, (list, tuple)) and found:
            names, where = [str(name) for name in found], f"{dataset.where}: its Dataset's classes"
    if not names or dataset.task == "regression":
        return dataset
    if len(names) != dataset.n_classes or len(set(names)) != len(names):
        raise ConfigError(f"{where}: {len(names)} names ({', '.join(names[:6])}) for {dataset.n_classes} classes")
    return dataclasses.replace(dataset, class_names=tuple(names))


def _make_dataset(config: ExperimentConfig) -> Dataset:
    data = config.data
    split = None
    if data.source == "csv":
        x, y, names = _read_csv(data, config.task)
        description = f"csv:{data.path}"
    elif data.source == "sklearn":
        x, y, names = _sklearn(data.name, config.task)
        description = f"sklearn:{data.name}"
    elif data.source == "python":
        loaded = _from_loader(config)
        _check_own_split(config, loaded)
        description = f"python:{data.class_path}"
        if loaded.lazy:
            small = in_memory(config, loaded)
            if small is None:
                return _lazy_dataset(config, loaded)
            loaded, size = small
            description += f" (a Dataset read into memory: {size / 2**20:.1f} MB)"
        x, y, split = loaded.x, loaded.y, loaded.split
        names = ()
    else:
        x, y = synthetic_xy(data.n_samples, data.noise)
        y = labels_for_task(y, config.task, data.n_classes)
        names = ("x1", "x2")
        description = f"synthetic(n={data.n_samples}, noise={data.noise})"
    x_test = y_test = None
    if split is not None:  # the loader's own train/validation (and test) split
        (x_train, y_train), (x_val, y_val) = ((part.x, part.y) for part in split[:2])
        if len(split) > 2:
            x_test, y_test = split[2].x, split[2].y
    else:
        train_idx, val_idx, test = partition(y.shape[0], y, data, config.task)
        if test is not None:
            x_test, y_test = batch.take(x, test), y[test]
        x_train, x_val = batch.take(x, train_idx), batch.take(x, val_idx)
        y_train, y_val = y[train_idx], y[val_idx]
    if data.train_fraction < 1:
        keep = train_kept(y_train.shape[0], data)
        x_train, y_train = batch.take(x_train, slice(keep)), y_train[:keep]
        description += f", train_fraction={data.train_fraction:g}"
    if not names and batch.is_tensor(x_train):
        names = tuple(f"x{i + 1}" for i in range(math.prod(x_train.shape[1:])))
    if data.source == "synthetic":
        n_classes = data.n_classes
    elif data.source == "sklearn" and config.task == "multiclass":
        n_classes = {"digits": 10, "iris": 3, "wine": 3, "breast_cancer": 2}[data.name]
    else:
        n_classes = _classes(torch.cat([y_train, y_val]), config) if config.task == "multiclass" else 1
    collate = collate_fn_of(config)
    example, kept = None, ()
    if collate is not None:
        items = InMemoryItems(x_val, y_val)
        *example, kept = _example(items, collate, f"data.collate_fn: {data.collate_fn}", config.task)
        example = tuple(example)
    return Dataset(
        x_train,
        y_train,
        x_val,
        y_val,
        names,
        _n_outputs(config.task, n_classes),
        config.task,
        description,
        collate_fn=collate,
        example=example,
        loader_args=loader_args(data),
        collated_shape=kept,
        x_test=x_test,
        y_test=y_test,
    )


def loader_args(data: DataConfig) -> dict:
    return {
        "num_workers": data.num_workers,
        "pin_memory": data.pin_memory,
        "persistent_workers": data.persistent_workers and data.num_workers > 0,
    }


def collate_fn_of(config: ExperimentConfig) -> Callable | None:
    """The user's `data.collate_fn` (module.function, found as a class_path is), or None."""
    path = config.data.collate_fn
    if path is None:
        return None
    function = import_object(path, config.code_dir, "data.collate_fn")
    if not callable(function):
        raise ConfigError(f"data.collate_fn: {path} is a {type(function).__name__}, not a function")
    return function


# A map-style Dataset whose items are tensors this small in all is read once into tensors: batches by indexing,
# and the stacked engine trains it; above it, it is read lazily through a DataLoader (SWEEPLAB_IN_MEMORY_MB).
IN_MEMORY_MB = 256
_IN_MEMORY: dict[tuple, tuple["Loaded", int] | None] = {}


def in_memory(config: ExperimentConfig, loaded: "Loaded") -> tuple["Loaded", int] | None:
    """The user's Dataset(s) read into tensors (the in-memory Loaded, and its size in bytes), or None where it stays
    lazy: a collate_fn or DataLoader workers asked for, items that are not (tensor inputs, target) of one shape
    (the lazy path names the odd item), or more than IN_MEMORY_MB, estimated from the first item and the length.
    Read once per process and loader."""
    from sweeplab.stores import env_number

    data = config.data
    if data.collate_fn is not None or data.num_workers > 0:
        return None
    budget = env_number("SWEEPLAB_IN_MEMORY_MB", IN_MEMORY_MB) * 2**20
    key = (id(loaded), budget)
    if key in _IN_MEMORY:
        return _IN_MEMORY[key]
    parts, found, size = loaded.split or (loaded,), [], 0
    where = f"data.class_path: {data.class_path}()"
    for part in parts:
        dataset = part.dataset
        try:
            with user_code():
                first = dataset[0]
                pair = isinstance(first, (tuple, list)) and len(first) == 2
                leaves = pytree.tree_leaves(first[0]) if pair else []
                arrays = leaves and all(isinstance(leaf, (torch.Tensor, np.ndarray)) for leaf in leaves)
                if not arrays or (sum(leaf.nbytes for leaf in leaves) + 8) * len(dataset) > budget:
                    _IN_MEMORY[key] = None
                    return None
                inputs, target = default_collate([dataset[i] for i in range(len(dataset))])
        except Exception:  # items of other shapes, or one that raises: the lazy path says which, in one line
            _IN_MEMORY[key] = None
            return None
        try:
            x, y = _pair((inputs, target), where, config.task)
        except ConfigError:  # a NaN, a label that is not a class index: the lazy path names the item
            _IN_MEMORY[key] = None
            return None
        found.append(Loaded(x=x, y=y))
        size += sum(t.nbytes for t in batch.tensors(x)) + y.nbytes
    memory = Loaded(x=found[0].x, y=found[0].y) if len(found) == 1 else Loaded(split=tuple(found))
    _IN_MEMORY[key] = (memory, size)
    return _IN_MEMORY[key]


def _check_own_split(config: ExperimentConfig, loaded: "Loaded") -> None:
    """A loader that gives its own split decides it: the settings that would make one are refused, not ignored."""
    if loaded.split is None:
        return
    where = f"data.class_path: {config.data.class_path}() gives its own split"
    if config.data.test_size is not None:
        raise ConfigError(f"data.test_size: {where}; give its dict a 'test' entry instead")
    if config.data.stratify:
        raise ConfigError(f"data.stratify: {where}; stratify it there (scikit-learn's train_test_split)")


def _lazy_dataset(config: ExperimentConfig, loaded: "Loaded") -> Dataset:
    """A map-style Dataset split by indices (Subsets: nothing is read here but the example batch)."""
    data = config.data
    description = f"python:{data.class_path} (lazy)"
    test_set = y_test = None
    if loaded.split is not None:
        # each split's items by their index in its own Dataset (a range costs no memory)
        train_set, val_set, *test = (IndexedSubset(p.dataset, range(len(p.dataset))) for p in loaded.split)
        y_train, y_val = loaded.split[0].y, loaded.split[1].y
        if test:
            test_set, y_test = test[0], loaded.split[2].y
    else:
        n, known = len(loaded.dataset), loaded.y is not None
        if data.stratify and not known:
            raise ConfigError(
                f"data.stratify: data.class_path: {data.class_path}() gave a Dataset without labels to stratify by "
                "(give it a `targets` attribute, as torchvision's datasets have)"
            )
        train_idx, val_idx, test = partition(n, loaded.y, data, config.task)
        if test is not None:
            test_set = IndexedSubset(loaded.dataset, test.numpy())
            y_test = loaded.y[test] if known else None
        # the indices as int64 arrays (8 bytes each; a list of Python ints takes ~36, in every worker it is sent to)
        train_set = IndexedSubset(loaded.dataset, train_idx.numpy())
        val_set = IndexedSubset(loaded.dataset, val_idx.numpy())
        y_train, y_val = (loaded.y[train_idx], loaded.y[val_idx]) if known else (None, None)
    if data.train_fraction < 1:
        keep = train_kept(len(train_set), data)
        train_set = IndexedSubset(train_set, np.arange(keep))
        y_train = y_train[:keep] if y_train is not None else None
        description += f", train_fraction={data.train_fraction:g}"
    where = f"data.class_path: {data.class_path}()"
    collate = collate_fn_of(config)
    *example, kept = _example(val_set, collate, where, config.task)
    example = tuple(example)
    _example(train_set, collate, where + " (training split)", config.task, n=2)
    if config.task == "multiclass":
        if y_train is not None:
            n_classes = _classes(torch.cat([y_train, y_val]), config)
        elif "n_classes" in data.model_fields_set:
            n_classes = data.n_classes
        elif config.model.class_path is not None:
            n_classes = classes_from_model(config, example[0], kept if collate is not None else example_shape(example))
        else:
            raise ConfigError(
                f"{where}: a lazy Dataset for task multiclass needs its number of classes for the built-in MLP's "
                "head: give data.n_classes, or a `targets` attribute (one label per item, as torchvision's datasets "
                "have)"
            )
        _within_classes(example[1], n_classes, val_set, where)
        n_outputs = n_classes
    elif config.task == "binary":
        n_outputs = 1
    else:
        n_outputs = int(example[1].shape[1])
    return Dataset(
        None,
        y_train,
        None,
        y_val,
        (),
        n_outputs,
        config.task,
        description,
        train_set=train_set,
        val_set=val_set,
        collate_fn=collate,
        example=example,
        loader_args=loader_args(data),
        where=where,
        collated_shape=kept if collate is not None else (),
        test_set=test_set,
        y_test=y_test,
    )


def example_shape(example: tuple) -> tuple[int, ...]:
    """One sample's shape in an example batch of one tensor (what Dataset.input_shape says); () for several."""
    return tuple(example[0].shape[1:]) if batch.is_tensor(example[0]) else ()


def _within_classes(labels: torch.Tensor, n_classes: int, items, where: str) -> None:
    """The example batch's labels against the number of classes: one outside 0..K-1 is named by its item."""
    k = outside_classes(labels, n_classes)
    if k is not None:
        raise ConfigError(f"{where}: item {index_in_dataset(items, k)}'s {outside_text(labels[k].item(), n_classes)}")


EXAMPLE_ITEMS = 8


def _example(items, collate, where: str, task: str, n: int = EXAMPLE_ITEMS):
    """The first `n` items read, checked and collated as training collates them: an item that is not (inputs,
    target), whose structure differs from the first's, or that the collate_fn refuses is one line naming `where`
    and the item's index. Returns (inputs, target, kept): the batch, targets in the task's form, and one sample's
    shape when every item's inputs are one tensor of that shape and the batch is them stacked ([n, *shape]), else
    ()."""
    n = min(n, len(items))
    got = []
    first_structure = None
    for i in range(n):
        try:
            with user_code():
                item = items[i]
        except Exception as exc:
            raise ConfigError(f"{where}: reading item {index_in_dataset(items, i)} raised {error_text(exc)}") from None
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            kind = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
            raise ConfigError(
                f"{where}: item {index_in_dataset(items, i)} is {kind}; an item must be (inputs, target), inputs a tensor, "
                "a tuple or a dict of them"
            )
        inputs, target = item
        # without a collate_fn every shape must agree (default_collate stacks them); with one, only the nesting
        # and the dtypes (skip every dimension: padding is the function's job)
        shape = batch.structure(as_tensors(inputs), skip_first=0 if collate is None else 99)
        if first_structure is None:
            first_structure = shape
        elif shape != first_structure:
            raise ConfigError(
                f"{where}: item {index_in_dataset(items, i)}'s inputs {batch.describe(as_tensors(inputs))} differ from item "
                f"{index_in_dataset(items, 0)}'s {batch.describe(as_tensors(got[0][0]))}"
                + ("" if collate is not None else " (give data.collate_fn to batch items of different shapes)")
            )
        got.append(item)
    try:
        with user_code():
            inputs, target = (collate or default_collate)(got)
    except Exception as exc:
        field = "data.collate_fn" if collate is not None else where
        raise ConfigError(f"{field}: collating items 0-{n - 1} raised {error_text(exc)}"[:400]) from None
    for leaf in batch.tensors(inputs):
        if leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise ConfigError(f"{where}: items 0-{n - 1} hold NaN or infinite inputs")
    if not isinstance(target, torch.Tensor):
        raise ConfigError(f"{where}: a batch's target is a {type(target).__name__}; it must be one tensor")
    _labels(target, task, where)
    shapes = {tuple(as_tensors(item[0]).shape) if batch.is_tensor(as_tensors(item[0])) else None for item in got}
    kept = next(iter(shapes)) if len(shapes) == 1 and None not in shapes else None
    kept = kept if batch.is_tensor(inputs) and kept is not None and tuple(inputs.shape) == (n, *kept) else ()
    return inputs, target_for_task(target, task), kept


def check_data(config: ExperimentConfig) -> Dataset | None:
    """Read and check a CSV, scikit-learn or python data source once, before anything is written anywhere (a bad
    value is one line naming the file, column and row; a loader that fails, one line naming data.class_path); the
    seed's generator needs no check. Returns the data set when it built one (seeded as a run seeds it)."""
    if config.data.folds is not None and config.data.fold is None:  # folds the training split cannot give: now
        seeded_dataset(config.model_copy(update={"data": config.data.model_copy(update={"fold": 0})}))
    if config.data.source in ("sklearn", "python"):
        dataset = seeded_dataset(config)
        check_predict_x(config, dataset)
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


def check_predict_x(config: ExperimentConfig, dataset: Dataset) -> None:
    if not config.predict_x:
        return
    if not dataset.input_shape:
        raise ConfigError(
            f"predict_x: the model takes {batch.describe(dataset.inputs)}, not rows of features; predict with "
            "`sweeplab predict RUN --input FILE.json` ({name: values} per input)"
        )
    if any(len(row) != dataset.n_features for row in config.predict_x):
        raise ConfigError(f"predict_x: rows must have {dataset.n_features} values, one per feature")


def seeded_dataset(config: ExperimentConfig) -> Dataset:
    """The data set a run of `config` trains on (seeded as the run seeds it), leaving torch's RNG as it was."""
    return drawn(config, {})[0]


def drawn(config: ExperimentConfig, made: dict) -> tuple[Dataset, torch.Tensor]:
    """The data set a run of `config` trains on, and torch's RNG state after it (what the model's initial weights
    draw from), as every engine draws them: torch's RNG seeded by `config.seed`, then the data. Made once per
    seed, task and data settings in `made` (a stacked batch's members share one); torch's RNG is left as it was.
    (The user's loader itself is called once per process: `_from_loader`.)"""
    key = ("data", config.seed, config.task, config.data.model_dump_json(), config.code_dir)
    if key not in made:
        state = torch.get_rng_state()
        try:
            torch.manual_seed(config.seed)
            dataset = make_dataset(config)
            made[key] = (dataset, torch.get_rng_state())
        finally:
            torch.set_rng_state(state)
    return made[key]


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


@dataclass
class Loaded:
    """What the user's loader gave: in-memory inputs `x` (a tensor, or tuples/dicts of them) and targets `y`; or a
    map-style `dataset`, read lazily, with its `targets` (`y`) when it has them; or its own train/val split of
    either kind."""

    x: Inputs = None
    y: torch.Tensor | None = None
    dataset: TorchDataset | None = None
    split: tuple["Loaded", ...] | None = None  # train, val (and test)

    @property
    def lazy(self) -> bool:
        return self.dataset is not None or (self.split is not None and self.split[0].dataset is not None)


# The loader's result per process: a sweep's trials (and the checks before them) call it once, not once each.
# Keyed by torch's RNG state too, and the state after the call restored on a hit, so a loader that draws random
# numbers leaves the run exactly as calling it would.
_LOADED: dict = {}


def _from_loader(config: ExperimentConfig) -> Loaded:
    """The user's loader (`data.class_path` + `init_args`), called once per process: (X, y), {"train": (X, y),
    "val": (X, y)}, or a map-style Dataset of (inputs, target) items (read lazily), or {"train": Dataset, "val":
    Dataset}. X may be a tensor, an array, or a tuple or dict of them (several inputs)."""
    data = config.data
    field = "data.class_path"
    key = (
        data.class_path,
        json.dumps(data.init_args, sort_keys=True, default=repr),
        config.code_dir,
        hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
        config.task,
    )
    if key in _LOADED:
        loaded, rng_after = _LOADED[key]
        torch.set_rng_state(rng_after)
        return loaded
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
    if isinstance(got, dict) and {"train", "val"} <= set(got) <= {"train", "val", "test"}:
        keys = ("train", "val", "test") if "test" in got else ("train", "val")
        parts = tuple(_part(got[key], f"{where}[{key!r}]", config.task) for key in keys)

        if parts[0].lazy != parts[1].lazy:
            raise ConfigError(f"{where}: train and val must both be Datasets, or both (X, y)")
        if not parts[0].lazy and batch.structure(parts[0].x) != batch.structure(parts[1].x):
            raise ConfigError(
                f"{where}: train inputs {batch.describe(parts[0].x)} and val inputs {batch.describe(parts[1].x)} "
                "differ in shape"
            )
        loaded = Loaded(split=parts)
    elif isinstance(got, dict) and set(got) & {"train", "val"}:
        raise ConfigError(f"{where} returned a dict with keys {sorted(map(str, got))}; give train and val (and test)")
    else:
        loaded = _part(got, where, config.task)
    _LOADED[key] = (loaded, torch.get_rng_state())
    return loaded


def _part(got, where: str, task: str) -> Loaded:
    if isinstance(got, TensorDataset) and len(got.tensors) == 2:  # tensors in memory: indexed, not read item by item
        got = got.tensors
    if isinstance(got, IterableDataset):
        raise ConfigError(
            f"{where} returned an IterableDataset, which has no length or index to split by; give a map-style Dataset "
            "(__len__ and __getitem__)"
        )
    if isinstance(got, TorchDataset) and not isinstance(got, (tuple, list)):
        try:
            n = len(got)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"{where} returned a Dataset without len(); give a map-style Dataset") from None
        if n < 2:
            raise ConfigError(f"{where} returned a Dataset of {n} samples")
        return Loaded(dataset=got, y=_targets_of(got, n, where, task))
    x, y = _pair(got, where, task)
    return Loaded(x=x, y=y)


def _targets_of(dataset, n: int, where: str, task: str) -> torch.Tensor | None:
    """A Dataset's `targets` attribute (torchvision's convention: one label per item), read without reading the
    items; None when it has none."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    try:
        y = targets.clone() if isinstance(targets, torch.Tensor) else torch.as_tensor(np.array(targets))
    except (TypeError, ValueError):
        return None
    if y.shape[0] != n:
        raise ConfigError(f"{where}: its targets attribute has {y.shape[0]} labels for {n} items")
    return _labels(y, task, f"{where}.targets")


def _pair(got, where: str, task: str) -> tuple[Inputs, torch.Tensor]:
    """(x, y) as tensors from a pair of tensors or arrays; x may be a tuple or dict of them (several inputs)."""
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise ConfigError(
            f"{where} returned {type(got).__name__}; give (X, y), {{'train': (X, y), 'val': (X, y)}} "
            "or a map-style torch Dataset"
        )
    value = got[1]
    kind = value.dtype.kind if isinstance(value, np.ndarray) else None
    if kind in ("U", "S", "O"):
        first = np.asarray(value).reshape(-1)[:3].tolist()
        raise ConfigError(
            f"{where}: y holds {value.dtype} values such as {first}, not numbers: map labels to class indices 0..K-1 "
            "first (e.g. sklearn's LabelEncoder)"
        )
    try:
        y = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: y must be an array of numbers ({error_text(exc)[:120]})") from None
    if isinstance(got[0], (dict, tuple, list)) and not _is_rows(got[0]):
        x = _inputs_tree(got[0], where, y.shape[0] if y.dim() else -1)
    else:
        x = _features(got[0], where, "X")
        if x.dim() < 2 or x.shape[0] != y.shape[0]:
            raise ConfigError(f"{where}: X {list(x.shape)} and y {list(y.shape)} need one row per sample each")
    y = _labels(y, task, where)
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise ConfigError(f"{where}: y holds NaN or infinite values")
    return x, y.detach().cpu().contiguous()


def _is_rows(value) -> bool:
    """A list of rows of numbers ([[1, 2], [3, 4]]), not several inputs."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], (list, int, float))


def _features(value, where: str, name: str, floats: bool = True) -> torch.Tensor:
    kind = value.dtype.kind if isinstance(value, np.ndarray) else None
    if kind in ("U", "S", "O"):
        first = np.asarray(value).reshape(-1)[:3].tolist()
        raise ConfigError(f"{where}: {name} holds {value.dtype} values such as {first}, not numbers")
    try:
        x = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    except (TypeError, ValueError) as exc:  # ragged rows, lists of strings
        raise ConfigError(f"{where}: {name} must be an array of numbers ({error_text(exc)[:120]})") from None
    if floats or x.is_floating_point():
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(f"{where}: {name} holds NaN or infinite values")
    return x.detach().cpu().contiguous()


def _inputs_tree(value, where: str, n: int, name: str = "X"):
    """Several inputs: a tuple, list or dict of arrays or tensors (nested as deep as the model takes them), each
    with one row per sample. Floating inputs train as float32; integer ones (lengths, token ids) keep their type."""
    if isinstance(value, dict):
        return {key: _inputs_tree(v, where, n, f"{name}[{key!r}]") for key, v in value.items()}
    if isinstance(value, (tuple, list)) and not _is_rows(value):
        return type(value)(_inputs_tree(v, where, n, f"{name}[{i}]") for i, v in enumerate(value))
    x = _features(value, where, name, floats=False)
    if x.dim() < 1 or x.shape[0] != n:
        raise ConfigError(f"{where}: {name} {list(x.shape)} needs one row per sample ({n} targets)")
    return x
