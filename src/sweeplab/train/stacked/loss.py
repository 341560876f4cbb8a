"""The stacked engine's loss: each member's mean loss [K], reduced as torch reduces it for one member, for the
losses it applies exactly (STACKED_LOSSES); any other sends the trial to the reference loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sweeplab.config import LOSSES, ExperimentConfig, loss_class_name
from sweeplab.train.loop import ShapeError

# torch.nn losses the stacked engine reduces per member exactly as torch reduces them for one, with the init args
# it applies; any other loss (or init arg) sends the trial to the reference loop
STACKED_LOSSES = {
    "MSELoss": set(),
    "L1Loss": set(),
    "HuberLoss": {"delta"},
    "SmoothL1Loss": {"beta"},
    "CrossEntropyLoss": {"weight", "label_smoothing"},
    "BCEWithLogitsLoss": {"pos_weight"},
}


def loss_kind(config: ExperimentConfig) -> str:
    """The torch loss class a config trains with (`mse` in a classifier is its task's own)."""
    loss = config.train.loss
    if not isinstance(loss, str):
        return loss.class_path
    return loss_class_name(loss, config.task)


def loss_problem(config: ExperimentConfig) -> str | None:
    loss = config.train.loss
    if isinstance(loss, str):
        return None
    if loss.class_path not in STACKED_LOSSES:
        return f"stacks {', '.join(STACKED_LOSSES)} by short name; not train.loss {loss.class_path}"
    extra = sorted(set(loss.init_args) - STACKED_LOSSES[loss.class_path])
    if extra:
        return f"stacks {loss.class_path} without {', '.join(extra)}"
    return None


class StackedLoss:
    """The members' loss, [K] per-member means, each reduced as torch reduces it for one member: built per member
    (options.build_loss, so `balanced` weights are each member's own) and applied to all at once. A group's members
    share the loss and its plain init args (group_key); class weights may differ per member ([K, C])."""

    def __init__(self, members: list):
        from sweeplab.train.options import build_loss

        modules = [build_loss(m.config, m.dataset.y_train, m.dataset.n_classes) for m in members]
        k = len(modules)
        first = modules[0]
        self.kind = type(first).__name__

        def column(name: str, default: float) -> float | torch.Tensor:
            """One value for all members (torch's fused loss takes it), or a [K, 1, 1] column when they differ."""
            values = [float(getattr(m, name, default)) for m in modules]
            return values[0] if len(set(values)) == 1 else torch.tensor(values).view(k, 1, 1)

        # each member's own: a searched delta, beta or label smoothing need not split the group
        self.delta, self.beta, self.smoothing = (
            column("delta", 1.0),
            column("beta", 1.0),
            column("label_smoothing", 0.0),
        )
        self.weight = self._rows([getattr(m, "weight", None) for m in modules], members[0].dataset.n_classes)
        self.pos_weight = self._rows([getattr(m, "pos_weight", None) for m in modules], members[0].dataset.n_outputs)

    @staticmethod
    def _rows(values: list, width: int) -> torch.Tensor | None:
        """Per-member class weights as [K, 1, width] (ones for a member without), or None when none has any."""
        if all(value is None for value in values):
            return None
        rows = [torch.ones(width) if value is None else value.reshape(-1).float().expand(width) for value in values]
        return torch.stack(rows).unsqueeze(1)

    def take(self, rows: torch.Tensor) -> None:
        """Keep only these members' rows (a compacted stack: fit_stacked)."""
        for name in ("weight", "pos_weight", "delta", "beta", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[rows.to(value.device)])

    def to(self, device: torch.device) -> "StackedLoss":
        for name in ("weight", "pos_weight", "delta", "beta", "smoothing"):
            value = getattr(self, name)
            setattr(self, name, value.to(device) if isinstance(value, torch.Tensor) else value)
        return self

    def __call__(self, out: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
        return member_loss(out, target, task, self)


def member_loss(out: torch.Tensor, target: torch.Tensor, task: str, loss) -> torch.Tensor:
    """Per-member mean loss, [K]: the reference's loss, reduced over each member's batch only. Outputs that do not
    fit the labels (a model whose output shape changes between batches) fail as loop.check_batch fails them.
    `loss`: a StackedLoss, or a name (a probe's)."""
    fits = out.shape[:2] == target.shape if task == "multiclass" else out.shape == target.shape
    if not fits:
        raise ShapeError(
            f"the model's output {list(out.shape[1:])} does not fit the labels {list(target.shape[1:])} of this batch"
        )
    kind = loss.kind if isinstance(loss, StackedLoss) else LOSSES.get(loss, (None, loss))[1]
    if task == "multiclass":
        k, b, c = out.shape
        smoothing = loss.smoothing if isinstance(loss, StackedLoss) else 0.0
        weight = loss.weight if isinstance(loss, StackedLoss) else None
        if weight is None and not isinstance(smoothing, torch.Tensor):  # torch's fused loss, one smoothing for all
            flat = F.cross_entropy(
                out.reshape(k * b, c), target.reshape(k * b), reduction="none", label_smoothing=smoothing
            )
            return flat.view(k, b).mean(1)
        # torch's formula: (1 - eps) w[y] (-log p_y) + eps/C sum_c w_c (-log p_c); its mean divides by sum of w[y]
        logp = F.log_softmax(out, dim=2)
        labels = target.long().unsqueeze(2)
        weight = torch.ones(1, 1, c, device=out.device, dtype=out.dtype) if weight is None else weight
        picked = weight.expand(k, b, c).gather(2, labels).squeeze(2)  # [K, B]: w[y_i]
        nll = -logp.gather(2, labels).squeeze(2) * picked
        if isinstance(smoothing, torch.Tensor) or smoothing:
            eps = smoothing.view(k, 1) if isinstance(smoothing, torch.Tensor) else smoothing
            nll = (1 - eps) * nll + eps * (-(logp * weight).sum(dim=2) / c)
        return nll.sum(1) / picked.sum(1)
    if task == "binary":
        pos_weight = loss.pos_weight if isinstance(loss, StackedLoss) else None
        return F.binary_cross_entropy_with_logits(out, target, reduction="none", pos_weight=pos_weight).mean(dim=(1, 2))
    if kind == "L1Loss":
        return (out - target).abs().mean(dim=(1, 2))
    if kind == "HuberLoss":
        delta = loss.delta if isinstance(loss, StackedLoss) else 1.0
        if not isinstance(delta, torch.Tensor):
            return F.huber_loss(out, target, reduction="none", delta=delta).mean(dim=(1, 2))
        error = (out - target).abs()  # torch's: 0.5 e^2 below delta, delta (|e| - delta / 2) above
        return torch.where(error < delta, 0.5 * error * error, delta * (error - 0.5 * delta)).mean(dim=(1, 2))
    if kind in ("SmoothL1Loss", "smooth_l1"):
        beta = loss.beta if isinstance(loss, StackedLoss) else 1.0
        if not isinstance(beta, torch.Tensor):
            return F.smooth_l1_loss(out, target, reduction="none", beta=beta).mean(dim=(1, 2))
        error = (out - target).abs()  # torch's: 0.5 e^2 / beta below beta, |e| - beta / 2 above
        return torch.where(error < beta, 0.5 * error * error / beta, error - 0.5 * beta).mean(dim=(1, 2))
    return (out - target).pow(2).mean(dim=(1, 2))
