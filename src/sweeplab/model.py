"""The model family (an MLP) built from its config, and checkpoints that can rebuild it.

A checkpoint is the state_dict (CPU tensors) plus the plain constructor arguments (`ModelSpec`), so a model is
rebuilt with nothing else and loaded with `torch.load(weights_only=True)`: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network: the `model_args` stored beside the weights."""

    in_features: int
    hidden: tuple[int, ...]
    out_features: int
    activation: str = "relu"
    dropout: float = 0.0
    task: str = "regression"
    feature_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        out["feature_names"] = list(self.feature_names)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelSpec":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        known["hidden"] = tuple(known.get("hidden", ()))
        known["feature_names"] = tuple(known.get("feature_names", ()))
        return cls(**known)


class MLP(nn.Module):
    """Linear -> activation (-> dropout) per hidden layer, then a Linear head.

    With one hidden layer and no dropout this is the seed's `Regressor`: the same `net.0` / `net.2` parameter
    names, created in the same order, so `torch.manual_seed` gives the seed's initial weights.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = spec.in_features
        for size in spec.hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[spec.activation]()]
            if spec.dropout > 0:
                layers.append(nn.Dropout(spec.dropout))
            width = size
        layers.append(nn.Linear(width, spec.out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(spec: ModelSpec) -> MLP:
    return MLP(spec)


def state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy: the best state must not follow the live weights (the seed's deepcopy lesson)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Weights and the spec as plain types only, so `torch.load(weights_only=True)` can read it back."""
    torch.save({"state_dict": state_to_cpu(state), "model_spec": spec.to_dict()}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MLP, ModelSpec]:
    """Rebuild the model from a checkpoint file; tensors saved on a GPU land on `map_location`. Anything but a
    sweeplab checkpoint (truncated, tampered with, a pickle carrying code) is a ValueError naming the file."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; a truncated file fails to unzip
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{Path(path).name}: not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_spec" not in payload:
        raise ValueError(f"{Path(path).name}: not a sweeplab checkpoint (needs state_dict and model_spec)")
    try:
        spec = ModelSpec.from_dict(payload["model_spec"])
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {spec.activation!r}")
        model = build_model(spec)
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # wrong shapes or names, a spec that is not one
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{Path(path).name}: the weights do not fit the model spec ({first[:200]})") from None
    model.to(map_location)
    model.eval()
    return model, spec


def spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.to_dict(), indent=2, sort_keys=True)
