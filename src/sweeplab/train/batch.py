"""What a batch is: `(inputs, target)`, where inputs is a tensor (`model(x)`), a tuple or list (`model(*inputs)`)
or a dict (`model(**inputs)`), nested as deep as the user's collate_fn nests it; the target is one tensor, and the
batch's size is the target's first dimension.

Everything that touches a batch goes through these few functions: the call (`call`), the device move (`to`),
indexing and slicing every tensor of it (`each`), stacking members' inputs for the stacked engine (`stack`), and
how it is described in one line (`describe`) and compared between items (`structure`). Lightning hands
`training_step` whatever the data iterable yields; this is the same idea with the seed's loop around it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

Inputs = Any  # a tensor, or tuples, lists and dicts of them (and of plain values a collate_fn adds)


def call(model: Callable, inputs: Inputs):
    """model(x) for a tensor, model(*inputs) for a tuple or list, model(**inputs) for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def args_kwargs(inputs: Inputs) -> tuple[tuple, dict]:
    """The inputs as (args, kwargs) of the forward: what `torch.func.functional_call` and `torch.export` take."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def each(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    """`fn` applied to every tensor of the structure (plain values are kept)."""
    return pytree.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, torch.Tensor) else leaf, inputs)


def take(inputs: Inputs, key) -> Inputs:
    """`tensor[key]` for every tensor of the structure (a slice, an index tensor, or a tuple of them)."""
    if isinstance(inputs, torch.Tensor):  # the one-tensor fast path: no tree walk per batch
        return inputs[key]
    return each(lambda t: t[key], inputs)


def to(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    device = torch.device(device)
    return each(lambda t: t if t.device == device else t.to(device, non_blocking=non_blocking), inputs)


def split(inputs: Inputs, size: int) -> list[Inputs]:
    """Consecutive batches of `size` rows of every tensor of the structure (tensor.split, leaf by leaf)."""
    leaves, spec = pytree.tree_flatten(inputs)
    parts = [leaf.split(size) if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
    n = len(next(p for p in parts if p is not None))
    return [
        pytree.tree_unflatten([p[i] if p is not None else leaf for p, leaf in zip(parts, leaves)], spec)
        for i in range(n)
    ]


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]


def stack(trees: list[Inputs]) -> Inputs:
    """Members' inputs of one structure stacked leaf by leaf: [N, ...] each -> [K, N, ...]."""
    flat = [pytree.tree_flatten(tree) for tree in trees]
    spec = flat[0][1]
    leaves = [torch.stack(parts) for parts in zip(*(leaves for leaves, _ in flat))]
    return pytree.tree_unflatten(leaves, spec)


def is_tensor(inputs: Inputs) -> bool:
    return isinstance(inputs, torch.Tensor)


def structure(inputs: Inputs, skip_first: int = 1) -> tuple:
    """What must agree between items (or members) for them to batch (or stack): the nesting, the keys, and every
    tensor's dtype and shape after the first `skip_first` dimensions."""
    leaves, spec = pytree.tree_flatten(inputs)
    return (
        str(spec),
        tuple(
            (str(leaf.dtype), tuple(leaf.shape[skip_first:])) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            for leaf in leaves
        ),
    )


def describe(inputs: Inputs, top: bool = True) -> str:
    """One line: `[2, 1, 8, 8]` for one tensor; `(padded_x [4, 29, 12] float32, lengths [4] int64)`,
    `{image: [4, 1, 8, 8] float32, features: [4, 6] float32}` for several inputs."""
    if isinstance(inputs, torch.Tensor):
        return str(list(inputs.shape)) if top else f"{list(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{key}: {describe(value, False)}" for key, value in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(value, False) for value in inputs) + ")"
    return type(inputs).__name__


def by_name(inputs: Inputs, names: list[str]) -> dict:
    """The top-level inputs keyed by the forward's argument names (a dict's values, a tuple's in order, a tensor)."""
    if isinstance(inputs, dict):
        values = list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        values = list(inputs)
    else:
        values = [inputs]
    return dict(zip(names, values))


def input_names(model: Any, inputs: Inputs) -> list[str]:
    """The forward's argument names for each top-level input: a dict's keys, or the forward's parameters in
    order for a tuple (`forward(self, padded_x, lengths)` -> padded_x, lengths); `x` for a single tensor."""
    if isinstance(inputs, dict):
        return [str(key) for key in inputs]
    if not isinstance(inputs, (tuple, list)):
        return ["x"]
    forward = getattr(model, "forward", model)
    try:
        parameters = [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        parameters = []
    return [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(len(inputs))]
