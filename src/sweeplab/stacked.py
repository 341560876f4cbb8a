"""The vectorized engine for any model: members of one architecture trained as one, by torch.func.

PyTorch's "model ensembling" recipe (`functional_call` + `vmap`) applied to a batch of trials: every member's
parameters live in one [K, P] tensor (the same layout the built-in MLP's path uses, so `_StackedOptimizer` applies
each member's own optimizer kind, lr, weight decay and momentum), viewed as [K, ...] tensors per parameter; one
`vmap` over `functional_call` runs all K forwards, one backward gives every member its own gradients. Buffers
(BatchNorm's running statistics) are stacked too and updated per member in train mode, used in eval mode.
Dropout draws per member (`randomness="different"`): such members agree with the reference loop in distribution,
not draw for draw.

Members are set up exactly as the reference loop sets them up (vectorized.prepare_member: seed, data, split,
initial weights, batch order) and keep the same bookkeeping (vectorized._Curves: History.record/stop's rules).
A model vmap cannot run (in-place ops on unbatched state, data-dependent control flow, `.item()` in forward) is
found by `vmap_problem` before its batch trains; engines.py then trains its trials on the reference loop.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, stack_module_state, vmap

from .experiment import resolve_device
from .model import build_model
from .vectorized import _distinct, fit_stacked, stack_data


def _split_state(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The state_dict's names that are parameters (trained) and buffers (carried: BatchNorm's statistics)."""
    return [name for name, _ in model.named_parameters()], [name for name, _ in model.named_buffers()]


def vmap_problem(member, batch: int = 2) -> str | None:
    """Why the member's model cannot be stacked by vmap (a few words), or None: two copies are run through a
    training step and an evaluation under vmap on a real batch, with torch's RNG left as it was."""
    state = torch.get_rng_state()
    try:
        models = [build_model(member.spec, member.config.code_dir) for _ in range(2)]
        for model in models:
            model.load_state_dict(member.init_state)
        params, buffers = stack_module_state(models)
        base = models[0]
        x = member.dataset.x_train[:batch].unsqueeze(0).expand(2, *member.dataset.x_train[:batch].shape)

        def forward(p, b, xs):
            return functional_call(base, (p, b), (xs,))

        base.train()
        out = vmap(forward, randomness="different")(params, buffers, x.contiguous())
        out.sum().backward()
        base.eval()
        with torch.no_grad():
            vmap(forward, randomness="different")(params, buffers, x.contiguous())
        return None
    except Exception as exc:  # vmap's own errors name the op: say the first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{member.spec.name} cannot run under torch.func.vmap ({type(exc).__name__}: {first[:160]})"
    finally:
        torch.set_rng_state(state)


def train_func_group(members: list, on_epoch=None, each_epoch=None) -> None:
    """`vectorized.train_group` for any model: the same data, batch order, optimizer, curves and decisions
    (vectorized.fit_stacked), with the forward by vmap over functional_call instead of the MLP's matmuls."""
    first = members[0]
    device = resolve_device(first.config.device)
    k = len(members)
    data = stack_data(members, device)
    base = build_model(first.spec, first.config.code_dir).to(device)
    param_names, buffer_names = _split_state(base)
    shapes = {name: tuple(first.init_state[name].shape) for name in param_names}
    sizes = [math.prod(shapes[name]) for name in param_names]
    owners, init_row = _distinct(members, lambda m: id(m.init_state))
    init_row = init_row.to(device)
    rows = torch.stack([torch.cat([m.init_state[name].reshape(-1).float() for name in param_names]) for m in owners])
    flat = rows.to(device)[init_row].contiguous()
    flat.requires_grad_()
    buffers = {
        name: torch.stack([m.init_state[name] for m in owners]).to(device)[init_row].clone() for name in buffer_names
    }

    def params_of(values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: part.view(k, *shapes[name]) for name, part in zip(param_names, values.split(sizes, dim=1))}

    stacked = vmap(lambda p, b, xs: functional_call(base, (p, b), (xs,)), randomness="different")

    def forward(x: torch.Tensor, training: bool) -> torch.Tensor:
        base.train(training)  # dropout and BatchNorm as in train_epoch / evaluate
        return stacked(params_of(flat), buffers, x)

    best, best_buffers = fit_stacked(members, data, flat, forward, buffers, on_epoch, each_epoch)
    best_params = params_of(best.cpu())
    best_buffers = {name: value.cpu() for name, value in best_buffers.items()}
    for i, m in enumerate(members):
        if m.history.best_epoch:
            values = {**{n: t[i] for n, t in best_params.items()}, **{n: t[i] for n, t in best_buffers.items()}}
            m.history.best_state = {name: values[name].clone().to(m.init_state[name].dtype) for name in m.init_state}
