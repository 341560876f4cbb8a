"""The seed's MLP stacked by hand: K members' weights in one [K, P] tensor, their forwards as batched matmuls.

The lab's one-hidden-layer MLPs of different widths train together here, zero-padded to the group's widest layer
(the padding is proved inert below). The epoch loop, the optimizers and the curves are the shared ones in
epochs.py; func.py stacks any other model by torch.func instead.
"""

from __future__ import annotations

import math
import os

import torch

from sweeplab.train.experiment import resolve_device
from sweeplab.train.model import ACTIVATIONS, MLP
from sweeplab.train.stacked.epochs import Member, _distinct, drawn_noise, fit_stacked, stack_data

# members that end leave the stack (fit_stacked's `compact`); SWEEPLAB_COMPACT=0 keeps every row to the end, as
# before (what tests/test_compact.py and benchmarks/bench_compact.py compare with)
COMPACT = os.environ.get("SWEEPLAB_COMPACT", "1") != "0"


def train_group(members: list[Member], on_epoch=None, each_epoch=None) -> None:
    """Train a group of same-shaped MLP members together (the forward as batched matmuls; func.py has it by
    torch.func for any model). `on_epoch(member, record)` sees each epoch of each member still recording, as
    fit's callbacks do, and may return a reason to stop recording that member (its pruner's decision); it keeps
    computing with the others. `each_epoch()` is called once per epoch (a stop check). Without `on_epoch`, no
    Python runs per member per epoch: the curves and decisions are [K] tensor operations."""
    first = members[0]
    config, dataset = first.config, first.dataset
    device = resolve_device(config.device)
    k = len(members)
    data = stack_data(members, device, flatten=True)
    # Every member padded to the group's widest hidden layer with zero rows in W1, b1 and zero columns in W2.
    # A padded unit outputs act(0) = 0 (relu, tanh, gelu, silu) into a zero column, so it changes no output;
    # its gradients are zero (dL/dW2 = dL/dout * 0, dL/dh = W2_pad^T dL/dout = 0), so no optimizer moves it
    # (Adam, RMSprop: 0 / (0 + eps) = 0; SGD, momentum, weight decay: 0), and the padding stays exactly zero.
    width = max(m.spec.hidden[0] for m in members)
    n_in, n_out = dataset.n_features, dataset.n_outputs
    shapes = [(width, n_in), (width,), (n_out, width), (n_out,)]
    sizes_p = [math.prod(shape) for shape in shapes]
    owners, init_row = _distinct(members, lambda m: id(m.init_state))
    padded_rows = []  # each distinct initial weight set padded once, then gathered for every member on the device
    for owner in owners:
        state, head = owner.init_state, MLP.head(owner.spec)
        h = state["net.0.weight"].shape[0]
        padded = [torch.zeros(shape) for shape in shapes]
        padded[0][:h] = state["net.0.weight"]
        padded[1][:h] = state["net.0.bias"]
        padded[2][:, :h] = state[f"{head}.weight"]
        padded[3][:] = state[f"{head}.bias"]
        padded_rows.append(torch.cat([t.reshape(-1) for t in padded]))
    flat = torch.stack(padded_rows).to(device)[init_row.to(device)]
    flat.requires_grad_()
    activation = ACTIVATIONS[config.model.activation]()

    def unpack(values: torch.Tensor) -> list[torch.Tensor]:
        rows = values.shape[0]  # fewer than k once members that ended have left the stack
        return [part.view(rows, *shape) for part, shape in zip(values.split(sizes_p, dim=1), shapes)]

    def forward(values: torch.Tensor, x: torch.Tensor, training: bool, noise: torch.Tensor | None = None):
        w1, b1, w2, b2 = unpack(values)
        hidden = activation(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
        if noise is not None:  # nn.Dropout in training: input * (bernoulli(1 - p) / (1 - p)), each member's own
            hidden = hidden * noise
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))

    def dropout_noise(draw_from: list[Member], draw_row: torch.Tensor, size: int) -> torch.Tensor:
        """Each member's dropout noise for one training batch [rows, size, width] (epochs.drawn_noise) at its own
        rate (0: ones, drawing nothing, as its reference twin has no Dropout), from its own global RNG at the same
        point of its sequence: once per distinct pair of generators (its members draw alike), padded with zeros to
        the group's width (a padded unit's output is 0)."""
        rows = []
        for m in draw_from:
            noise = torch.zeros(size, width)
            noise[:, : m.spec.hidden[0]] = drawn_noise(m.global_gen, m.spec.dropout, (size, m.spec.hidden[0]))
            rows.append(noise)
        return torch.stack(rows).to(device)[draw_row]

    def layout(row: int) -> list[tuple[str, int]]:  # each member's parameter names (its head's after a Dropout)
        head = MLP.head(members[row].spec)
        return list(zip(("net.0.weight", "net.0.bias", f"{head}.weight", f"{head}.bias"), sizes_p))

    dropping = any(m.spec.dropout > 0 for m in members)
    best, _ = fit_stacked(
        members,
        data,
        flat,
        forward,
        {},
        on_epoch,
        each_epoch,
        layout,
        compact=COMPACT,
        dropout=dropout_noise if dropping else None,
    )
    w1, b1, w2, b2 = unpack(best.cpu())
    for i, m in enumerate(members):
        # the padded width and a group of one change how a matmul sums (not what): a rerun replays both
        m.history.stacked_width, m.history.stacked_members = width, k
        if m.history.best_epoch:
            h, head = m.spec.hidden[0], MLP.head(m.spec)  # drop the padding: the state_dict of the member's own model
            m.history.best_state = {
                "net.0.weight": w1[i, :h].clone(),
                "net.0.bias": b1[i, :h].clone(),
                f"{head}.weight": w2[i, :, :h].clone(),
                f"{head}.bias": b2[i].clone(),
            }
