"""The vectorized engine for any model: members of one architecture trained as one, by torch.func.

PyTorch's "model ensembling" recipe (`functional_call` + `vmap`) applied to a batch of trials: every member's
parameters live in one [K, P] tensor (the same layout the built-in MLP's path uses, so `StackedOptimizer` applies
each member's own optimizer kind, lr, weight decay and momentum), viewed as [K, ...] tensors per parameter; one
`vmap` over `functional_call` runs all K forwards, one backward gives every member its own gradients. Buffers
(BatchNorm's running statistics) are stacked too and updated per member in train mode, used in eval mode.
Its `nn.Dropout` layers stack: each is swapped for `_NoiseDropout`, which multiplies by a noise tensor given per
member like a buffer, drawn from the member's own generator where and as the reference loop's nn.Dropout draws it
(FuncStack.noise). A model that draws random numbers otherwise in training (F.dropout in its forward, Dropout2d,
noise layers) is not stacked: its members would draw other numbers than the reference loop, and each one's result
would depend on the trials stacked with it.

Members are set up exactly as the reference loop sets them up (epochs.prepare_member: seed, data, split,
initial weights, batch order) and keep the same bookkeeping (epoch.Curves: the decisions the reference loop takes at K = 1).
Members share one module only when they were built alike: the group key (epochs.group_key) holds every init arg,
not only the shapes they give, so an activation's name or a flag is each member's own; an init arg that only sets
nn.Dropout rates (epochs.model_key) is not in it, since each member's noise is drawn at its own rate.

What this engine cannot train exactly is found by `stack_problem` before a batch trains, by running what training
runs (two members stacked as training stacks them, two optimizer steps of `train_step` and a validation forward):
a model vmap cannot run (in-place ops on its weights, data-dependent control flow, `.item()` in forward), lazy
parameters, parameters that are not float32, random draws in training. train/engines.py then trains its trials on the
reference loop.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.func import functional_call, vmap
from torch.nn.parameter import UninitializedParameter

from sweeplab.train import batch
from sweeplab.train.experiment import resolve_device, val_batch_size
from sweeplab.train.model import build_model
from sweeplab.train.stacked.epochs import _distinct, drawn_noise, fit_stacked, stack_data, train_step
from sweeplab.train.stacked.loss import StackedLoss
from sweeplab.train.stacked.optim import StackedOptimizer


class _NoiseDropout(torch.nn.Module):
    """nn.Dropout(p) in a stacked forward: `input * noise` in training, the member's noise given as the buffer
    `noise` (functional_call), which is what torch's `_dropout_impl` computes from the noise it draws. Without
    noise (a probe) it records the input's sample shape and passes it through."""

    def __init__(self, p: float, name: str, calls: list):
        super().__init__()
        self.p, self.name, self.calls = p, name, calls
        self.shape: tuple[int, ...] = ()
        self.register_buffer("noise", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.noise is None:
            self.shape = tuple(x.shape[1:])
            self.calls.append(self.name)
            return x
        return x * self.noise


def _swap_dropouts(base: torch.nn.Module, members: list) -> tuple[dict[str, _NoiseDropout], list[str]]:
    """Each nn.Dropout (exactly) of the module that any member runs at a rate above 0 replaced by a _NoiseDropout;
    with the list its calls go to."""
    calls: list[str] = []
    swapped = {}
    for name, module in list(base.named_modules()):
        if type(module) is torch.nn.Dropout and any(m.dropout_rates.get(name, module.p) > 0 for m in members):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            swapped[name] = _NoiseDropout(module.p, name, calls)
            setattr(parent, child, swapped[name])
    return swapped, calls


class FuncStack:
    """K members of one architecture as one functional model: every member's parameters in one [K, P] float32
    tensor (`flat`, the layout `StackedOptimizer` steps), its buffers as [K, ...] tensors, and `forward(x [K, B,
    ...], training)` by vmap over functional_call. A parameter registered under two names (tied weights) is one
    column block, as `named_parameters` lists it; `states` gives each member's whole state_dict back."""

    def __init__(self, members: list, device: torch.device, base: torch.nn.Module | None = None):
        first = members[0]
        self.k = len(members)
        base = (base or build_model(first.spec, first.config.code_dir)).to(device)  # its weights are not used
        self.base = base
        self.device = device
        self.dropouts, calls = _swap_dropouts(base, members)
        self.dropout_order: list[str] = []  # the order a training forward calls them in (each once)
        self.problem: str | None = None
        if self.dropouts:
            x = batch.to(batch.take(first.dataset.x_train, slice(2)), device)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                base.train()
                args, kwargs = batch.args_kwargs(x)
                base(*args, **kwargs)
            self.dropout_order = list(calls)
            twice = sorted({name for name in calls if calls.count(name) > 1})
            if twice or set(calls) != set(self.dropouts):
                self.problem = f"{first.spec.name} calls its Dropout {(twice or sorted(self.dropouts))[0]} " + (
                    "more than once per forward" if twice else "never in a training forward"
                )
        self.param_names = [name for name, _ in base.named_parameters()]  # tied: the first name only
        self.buffer_names = [name for name, _ in base.named_buffers()]
        canonical = {id(t): name for name, t in [*base.named_parameters(), *base.named_buffers()]}
        # every state_dict name -> the parameter or buffer it holds (an alias of a tied one -> its first name)
        self.source = {name: canonical.get(id(t), name) for name, t in base.state_dict(keep_vars=True).items()}
        self.shapes = {name: tuple(first.init_state[name].shape) for name in self.param_names}
        self.sizes = [math.prod(self.shapes[name]) for name in self.param_names]
        owners, init_row = _distinct(members, lambda m: id(m.init_state))
        init_row = init_row.to(device)
        rows = torch.stack(
            [torch.cat([m.init_state[name].reshape(-1).float() for name in self.param_names]) for m in owners]
        )
        self.flat = rows.to(device)[init_row].contiguous()
        self.flat.requires_grad_()
        self.buffers = {
            name: torch.stack([m.init_state[name] for m in owners]).to(device)[init_row].clone()
            for name in self.buffer_names
        }
        # several inputs are a tuple (forward(*xs)) or a dict (forward(**xs)): vmap maps every tensor in them
        self._stacked = vmap(lambda p, b, xs: functional_call(base, (p, b), *batch.args_kwargs(xs)), randomness="error")

    def params_of(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = values.split(self.sizes, dim=1)
        return {name: part.view(self.k, *self.shapes[name]) for name, part in zip(self.param_names, parts)}

    def forward(self, flat: torch.Tensor, x: torch.Tensor, training: bool, noise: dict | None = None) -> torch.Tensor:
        self.base.train(training)  # dropout and BatchNorm as in train_epoch / evaluate
        return self._stacked(self.params_of(flat), self.buffers if noise is None else {**self.buffers, **noise}, x)

    def noise(self, draw_from: list, draw_row: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
        """Each Dropout's noise for one training batch of `size`, {name.noise: [rows, size, ...]}: per distinct
        pair of generators (its members draw alike), in the order the forward calls them, each drawn by
        epochs.drawn_noise at the member's own rate from the member's own global RNG, which is where the reference
        loop's forward draws it."""
        drawn: dict[str, list[torch.Tensor]] = {name: [] for name in self.dropout_order}
        for m in draw_from:
            for name in self.dropout_order:
                module = self.dropouts[name]
                rate = m.dropout_rates.get(name, module.p)
                drawn[name].append(drawn_noise(m.global_gen, rate, (size, *module.shape)))
        return {f"{name}.noise": torch.stack(rows).to(self.device)[draw_row] for name, rows in drawn.items()}

    def states(self, members: list, flat: torch.Tensor, buffers: dict[str, torch.Tensor]) -> list[dict]:
        """Each member's state_dict (CPU, its own dtypes) from stacked parameters and buffers."""
        values = {**self.params_of(flat.detach().cpu()), **{n: t.cpu() for n, t in buffers.items()}}
        return [
            {name: values[self.source[name]][i].clone().to(m.init_state[name].dtype) for name in m.init_state}
            for i, m in enumerate(members)
        ]


def stack_problem(member, steps: int = 2) -> str | None:
    """Why the member's trials cannot be stacked (a few words), or None. Two copies of the member are stacked as
    `train_func_group` stacks them and run through `steps` of `train_step` (forward, loss, backward, the stacked
    optimizer's step) and a validation forward on its own data, with torch's RNG left as it was: what fails here
    would fail training."""
    state = torch.get_rng_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vmap's "performance drop" notes: said by training, if it stacks
            return _try_stacking(member, steps)
    except Exception as exc:
        return stack_failure(member, exc)
    finally:
        torch.set_rng_state(state)


def _try_stacking(member, steps: int) -> str | None:
    name = member.spec.name  # one line per class and cause, whatever init args the trials give
    model = build_model(member.spec, member.config.code_dir)
    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        return f"{name} has lazy parameters (shaped by its first batch), which the stacked engine cannot stack"
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()} - {"float32"})
    if dtypes:
        return f"{name} has {', '.join(dtypes)} parameters; the stacked engine trains float32 ones"
    if member.config.train.freeze and any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return f"{name} has BatchNorm, whose statistics a freeze holds per member, which the stacked forward cannot"
    pair = [member, member]
    device = resolve_device(member.config.device)
    stack = FuncStack(pair, device, model)
    if stack.problem:
        return stack.problem
    if stack.dropouts and device.type != "cpu":  # the reference loop draws its masks from the device's generator
        return f"{name} has nn.Dropout, whose masks the stacked engine draws as the reference loop does on the CPU only"
    x_train, y_train, x_val, _, which = stack_data(pair, device)
    x_train, y_train = batch.take(x_train, which), y_train[which]
    size = member.config.train.batch_size
    if draws_random_numbers(stack, batch.take(x_train, (slice(None), slice(size)))):
        return (
            f"{name} draws random numbers in training (not by nn.Dropout: F.dropout, Dropout2d, noise), which "
            "stacked members would draw otherwise than the reference loop"
        )
    train, task = member.config.train, member.config.task
    optimizer = StackedOptimizer(stack.flat, [m.config for m in pair])
    for step in range(steps):
        start, end = step * size, (step + 1) * size
        xb, yb = batch.take(x_train, (slice(None), slice(start, end))), y_train[:, start:end]
        if yb.shape[1]:
            train_step(stack.forward, stack.flat, optimizer, xb, yb, task, StackedLoss(pair).to(device))
    with torch.no_grad():
        n_val = val_batch_size(train, member.dataset)
        stack.forward(stack.flat, batch.take(x_val, (slice(None), slice(n_val))), False)
    return None


def draws_random_numbers(stack: FuncStack, x: torch.Tensor) -> bool:
    """Whether the model's training forward draws from torch's RNG (dropout with p > 0, noise layers): the stacked
    forward runs under vmap's `randomness="error"`, which refuses any op that draws."""
    try:
        with torch.no_grad():
            stack.forward(stack.flat, x, True)
    except RuntimeError as exc:
        if "randomness" in str(exc):
            return True
        raise
    return False


def stack_failure(member, exc: Exception) -> str:
    """Why stacked training failed, in a few words: vmap's own errors name the op; the first line says it."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{member.spec.name} cannot be stacked by torch.func ({type(exc).__name__}: {first[:160]})"


def train_func_group(members: list, on_epoch=None, each_epoch=None) -> None:
    """`mlp.train_group` for any model: the same data, batch order, optimizer, curves and decisions
    (epochs.fit_stacked), with the forward by vmap over functional_call instead of the MLP's matmuls."""
    device = resolve_device(members[0].config.device)
    data = stack_data(members, device)
    stack = FuncStack(members, device)
    names = list(zip(stack.param_names, stack.sizes))  # every member's: one architecture
    best, best_buffers = fit_stacked(
        members,
        data,
        stack.flat,
        stack.forward,
        stack.buffers,
        on_epoch,
        each_epoch,
        lambda row: names,
        dropout=stack.noise if stack.dropouts else None,
    )
    for m, state in zip(members, stack.states(members, best, best_buffers)):
        m.history.stacked_members = len(members)  # a batched kernel sums in blocks of members: a rerun replays K
        if m.history.best_epoch:
            m.history.best_state = state
