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
from sweeplab.train.model import ACTIVATIONS
from sweeplab.train.stacked.epochs import Member, _distinct, fit_stacked, stack_data

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
    for state in (m.init_state for m in owners):
        h = state["net.0.weight"].shape[0]
        padded = [torch.zeros(shape) for shape in shapes]
        padded[0][:h] = state["net.0.weight"]
        padded[1][:h] = state["net.0.bias"]
        padded[2][:, :h] = state["net.2.weight"]
        padded[3][:] = state["net.2.bias"]
        padded_rows.append(torch.cat([t.reshape(-1) for t in padded]))
    flat = torch.stack(padded_rows).to(device)[init_row.to(device)]
    flat.requires_grad_()
    activation = ACTIVATIONS[config.model.activation]()

    def unpack(values: torch.Tensor) -> list[torch.Tensor]:
        rows = values.shape[0]  # fewer than k once members that ended have left the stack
        return [part.view(rows, *shape) for part, shape in zip(values.split(sizes_p, dim=1), shapes)]

    def forward(values: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
        w1, b1, w2, b2 = unpack(values)
        hidden = activation(torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)))
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))

    layout = list(zip(("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"), sizes_p))
    best, _ = fit_stacked(members, data, flat, forward, {}, on_epoch, each_epoch, layout, compact=COMPACT)
    w1, b1, w2, b2 = unpack(best.cpu())
    for i, m in enumerate(members):
        # the padded width and a group of one change how a matmul sums (not what): a rerun replays both
        m.history.stacked_width, m.history.stacked_members = width, k
        if m.history.best_epoch:
            h = m.spec.hidden[0]  # drop the padding: the state_dict of the member's own model
            m.history.best_state = {
                "net.0.weight": w1[i, :h].clone(),
                "net.0.bias": b1[i, :h].clone(),
                "net.2.weight": w2[i, :, :h].clone(),
                "net.2.bias": b2[i].clone(),
            }
