"""How items become batches, and how a bad one is named: the in-memory data as items (InMemoryItems), a split
of the user's Dataset whose batches know their items' indices (IndexedSubset), and the collate that every batch
of items goes through (CheckedCollate), which turns an item that raises when read, a NaN, a zero-length sequence,
a ragged item or a collate_fn's failure into one BatchError naming the split and the item's index in the user's
Dataset, in the loop's process or in a DataLoader worker. data.py builds the splits; loop.py reads the batches.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset, default_collate

from sweeplab.train import batch
from sweeplab.train.batch import Inputs
from sweeplab.train.plugins import error_text


class InMemoryItems(TorchDataset):
    """In-memory inputs (a tensor, or tuples/dicts of tensors) and targets as a map-style Dataset of (inputs,
    target) items: what a DataLoader with the user's collate_fn reads."""

    def __init__(self, x: Inputs, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i):
        return batch.take(self.x, i), self.y[i]


class BatchError(RuntimeError):
    """Items read during training that cannot make a batch (a ragged item past the ones checked before the run, a
    collate_fn that refuses some batch): one line naming the items by their index in the user's Dataset."""


class Items(list):
    """A batch's items as read, with `indices`: each one's index in the user's own Dataset; `failure`: (index,
    error) when reading one of them raised (CheckedCollate, which knows the split, says so)."""

    indices: list[int]
    failure: tuple[int | None, str] | None = None


class IndexedSubset(Subset):
    """A split of the user's Dataset (torch's Subset) whose batches of items carry their indices in that Dataset,
    so that a batch that will not collate, or an item that raises when read, is named by them (CheckedCollate: the
    collate runs right after the read, in the loop's process or in a DataLoader worker). It reads exactly as
    Subset does."""

    def __getitems__(self, positions: list[int]) -> Items:
        try:
            items = Items(super().__getitems__(positions))
        except Exception as exc:
            items = Items()
            items.failure = self._failing(positions, exc)
        items.indices = [index_in_dataset(self, int(p)) for p in positions]
        return items

    def _failing(self, positions: list[int], exc: Exception) -> tuple[int | None, str]:
        """The first item that raises when read alone, with its error; else the batch read's own error."""
        for p in positions:
            try:
                self[int(p)]
            except Exception as alone:
                return index_in_dataset(self, int(p)), error_text(alone)
        return None, error_text(exc)


class CheckedCollate:
    """The collate_fn (the user's, or torch's default_collate) of a DataLoader, which turns its failure into
    BatchError: the first item unlike the first of its batch (not an (inputs, target) pair, or of another
    structure or shape), else the function's own error, with the batch's indices. A class, not a closure: a
    DataLoader worker started by `spawn` (macOS, Windows) receives it pickled."""

    def __init__(self, collate: Callable | None, where: str = "data", n_classes: int | None = None):
        self.collate, self.where, self.n_classes = collate, where, n_classes

    def __call__(self, items):
        failure = getattr(items, "failure", None)
        if failure is not None:
            index, error = failure
            what = f"item {index}" if index is not None else f"items {_listed(items.indices)}"
            raise BatchError(f"{self.where}: reading {what} raised {error}"[:400])
        if self.collate is not None:  # a zero-length sequence pads to nothing: said here, not in the model
            self.check_empty(items)
        try:
            out = (self.collate or default_collate)(items)
        except Exception as exc:
            raise BatchError(self.problem(items, exc)) from None
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            field = "data.collate_fn" if self.collate is not None else self.where
            raise BatchError(
                f"{field}: for {self.of(items)} it returned {_shown(out)}; a batch must be (inputs, target)"
            )
        self.check_finite(items, out)
        if self.n_classes is not None:
            self.check_classes(items, out[1])
        return out

    def of(self, items) -> str:
        indices = getattr(items, "indices", None)
        return f"items {_listed(indices)}" if indices else f"a batch of {len(items)} items"

    def check_empty(self, items) -> None:
        for k, item in enumerate(items):
            inputs = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else None
            leaves = [inputs] if isinstance(inputs, torch.Tensor) else batch.tensors(as_tensors(inputs))
            empty = next((leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.numel() == 0), None)
            if empty is not None:
                raise BatchError(
                    f"{self.where}: {self.name(items, k)}'s inputs {list(empty.shape)} are empty (a sequence of "
                    "length 0?): every item needs at least one value"
                )

    def check_finite(self, items, out) -> None:
        """NaN or infinity in a batch ends a run as "diverged" with no word of where it came from: named here."""
        leaves = [t for t in batch.tensors(out[0]) if t.is_floating_point()]
        if isinstance(out[1], torch.Tensor) and out[1].is_floating_point():
            leaves.append(out[1])
        if all(bool(torch.isfinite(t).all()) for t in leaves):
            return
        for k, item in enumerate(items):
            for part, value in zip(("inputs", "target"), item):
                leaves = pytree.tree_leaves(as_tensors(value))
                values = [torch.as_tensor(leaf) for leaf in leaves if isinstance(leaf, (torch.Tensor, float))]
                if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in values):
                    raise BatchError(f"{self.where}: {self.name(items, k)}'s {part} hold NaN or infinite values")
        field = "data.collate_fn" if self.collate is not None else self.where
        raise BatchError(f"{field}: the batch it made of {self.of(items)} holds NaN or infinite values")

    def check_classes(self, items, target) -> None:
        """A label outside 0..K-1 (K the Dataset's classes: its labels, data.n_classes or the model's width)
        would end the run in the loss's IndexError: named here by its item. K = 2 is binary's 0/1."""
        labels = torch.as_tensor(target)
        labels = labels.reshape(-1) if labels.dim() == 2 and labels.shape[1] == 1 else labels
        if labels.dim() != 1 or labels.is_floating_point() and not bool((labels == labels.round()).all()):
            return  # not class indices at all: the loss says so (checked on the example before the run)
        first = outside_classes(labels, self.n_classes)
        if first is None:
            return
        for k, item in enumerate(items):  # the item itself (a collate_fn may reorder a batch)
            own = torch.as_tensor(item[1]) if isinstance(item, (tuple, list)) and len(item) == 2 else None
            if own is not None and own.numel() == 1 and outside_classes(own.reshape(1), self.n_classes) is not None:
                raise BatchError(f"{self.where}: {self.name(items, k)}'s {outside_text(own.item(), self.n_classes)}")
        raise BatchError(
            f"{self.where}: in the batch of {self.of(items)}, a {outside_text(labels[first].item(), self.n_classes)}"
        )

    @staticmethod
    def name(items, k: int) -> str:
        indices = getattr(items, "indices", None)
        return f"item {indices[k]}" if indices else f"the batch's item {k}"

    def problem(self, items, exc: Exception) -> str:
        indices = getattr(items, "indices", None)
        name = (lambda k: f"item {indices[k]}") if indices else (lambda k: f"the batch's item {k}")
        shapes = []
        for k, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                return f"{self.where}: {name(k)} is a {type(item).__name__}; an item must be (inputs, target)"
            shapes.append(batch.structure(as_tensors(item[0]), skip_first=0 if self.collate is None else 99))
        if len(set(shapes)) > 1:  # name the odd one out: the first item of the rarest structure, against the commonest
            counts = {shape: shapes.count(shape) for shape in shapes}
            odd = shapes.index(min(counts, key=counts.get))
            usual = shapes.index(max(counts, key=counts.get))
            return (
                f"{self.where}: {name(odd)}'s inputs {batch.describe(as_tensors(items[odd][0]))} differ from "
                f"{name(usual)}'s {batch.describe(as_tensors(items[usual][0]))}"
                + ("" if self.collate is not None else " (give data.collate_fn to batch items of different shapes)")
            )
        field = "data.collate_fn" if self.collate is not None else self.where
        return f"{field}: collating {self.of(items)} raised {error_text(exc)}"[:400]


def outside_classes(labels: torch.Tensor, n_classes: int) -> int | None:
    """The position of the first label outside 0..n_classes-1, or None: the rule the pre-flight applies to the
    example batch (data.py) and CheckedCollate to every batch."""
    outside = ((labels < 0) | (labels >= n_classes)).nonzero()
    return int(outside[0]) if len(outside) else None


def outside_text(label: float, n_classes: int) -> str:
    return f"target {label:g} is outside the {n_classes} classes (0..{n_classes - 1})"


def _listed(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"a tensor {list(value.shape)}"
    return f"a {type(value).__name__}"


def target_for_task(y, task: str) -> torch.Tensor:
    """A batch's targets in the form the task's loss takes (as `_labels` makes them for in-memory data):
    regression and binary [B, outputs] float, multiclass [B] class indices."""
    y = torch.as_tensor(y)
    if task == "multiclass":
        return (y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y).long()
    y = y.float()
    return y.unsqueeze(1) if y.dim() == 1 else y


def index_in_dataset(items, i: int) -> int:
    """The item's index in the user's own Dataset (a split's Subset maps it)."""
    while isinstance(items, Subset):
        i, items = items.indices[i], items.dataset
    return int(i)


def as_tensors(inputs):
    """An item's inputs with every numpy array (at any nesting) as a tensor, so its shapes can be compared."""
    return pytree.tree_map(lambda leaf: torch.as_tensor(leaf) if isinstance(leaf, np.ndarray) else leaf, inputs)
