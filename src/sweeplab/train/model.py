"""The models: the built-in MLP, or the user's own nn.Module named by `class_path` + `init_args`; checkpoints
that can rebuild either; and the number of classes a user's model gives when nothing else says it
(`classes_from_model`, its output's width).

A checkpoint is the state_dict (CPU tensors) plus the plain constructor arguments (`ModelSpec`: the MLP's sizes,
or the user's class path and its init args as JSON), so a model is rebuilt with nothing else and loaded with
`torch.load(weights_only=True)`: nothing is ever unpickled. A user's class is imported (plugins.py) only from a
module the user can import; the checkpoint does not say where to look.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sweeplab.config import ConfigError, ExperimentConfig
from sweeplab.train import batch
from sweeplab.train.plugins import call_users, data_args, instantiate, model_class

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
    class_path: str | None = None  # the user's nn.Module (module.Class); None: the built-in MLP
    init_args: dict[str, Any] = field(default_factory=dict)  # with the data's shape filled in (plugins.DATA_ARGS)
    input_shape: tuple[int, ...] = ()  # one sample's shape: (2,) for the seed's data, (1, 8, 8) for digits
    # several inputs (or one whose shape a collate_fn decides): {"kind": tensor|args|kwargs, "inputs": [{"name",
    # "dtype", "shape"}]}, a shape's -1s the batch and the sizes that vary; {} for one tensor of input_shape
    inputs: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()  # the classes' names in label order (data.classes); () for indices

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        out["classes"] = list(self.classes)
        out["feature_names"] = list(self.feature_names)
        out["input_shape"] = list(self.sample_shape)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelSpec":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        known["hidden"] = tuple(known.get("hidden", ()))
        known["feature_names"] = tuple(known.get("feature_names", ()))
        known["input_shape"] = tuple(known.get("input_shape") or ())
        known["init_args"] = dict(known.get("init_args") or {})
        known["inputs"] = dict(known.get("inputs") or {})
        known["classes"] = tuple(known.get("classes") or ())
        return cls(**known)

    @property
    def named_inputs(self) -> list[str]:
        """The forward's inputs by name, for a model of several inputs; [] for one tensor of features."""
        return [spec["name"] for spec in self.inputs.get("inputs", [])]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.input_shape or (self.in_features,)

    @property
    def name(self) -> str:
        return self.class_path or "sweeplab MLP"


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
        return self.net(x.flatten(1) if x.dim() > 2 else x)  # images: their pixels as features

    @staticmethod
    def head(spec: ModelSpec) -> str:
        """The head's name in the state_dict, as __init__ lays the layers out: after each hidden layer's Linear,
        activation and (dropout > 0) Dropout. `net.2` for the seed's model, `net.3` with dropout."""
        return f"net.{len(spec.hidden) * (3 if spec.dropout > 0 else 2)}"


def build_model(spec: ModelSpec, code_dir: str | None = None, where: str = "beside the experiment file") -> nn.Module:
    """The MLP of the spec, or the user's class with its init args (imported from `code_dir`, which is `where`,
    or sys.path)."""
    if spec.class_path is None:
        return MLP(spec)

    return instantiate(model_class(spec.class_path, code_dir, where=where), spec.init_args, spec.class_path)


def state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy: the best state must not follow the live weights (the seed's deepcopy lesson)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Weights and the spec as plain types only, so `torch.load(weights_only=True)` can read it back."""
    torch.save({"state_dict": state_to_cpu(state), "model_spec": spec.to_dict()}, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, ModelSpec]:
    """(the checkpoint's payload, its ModelSpec), read with torch.load(weights_only=True) and importing nothing;
    anything but a sweeplab checkpoint is a ValueError naming the file."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code; a truncated file fails to unzip
        text = str(exc)
        if "Weights only load failed" in text:  # not torch's advice to load it with weights_only=False
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)|Unsupported operand \d+|(\w+Error: [^\n]+)", text)
            why = f": {found.group(0)}" if found else ""
            raise ValueError(
                f"{Path(path).name}: holds pickled objects, not only tensors and plain values{why}; refused "
                "(sweeplab reads checkpoints with weights_only=True and never runs their code)"
            ) from None
        first = (text.strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{Path(path).name}: not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_spec" not in payload:
        raise ValueError(f"{Path(path).name}: not a sweeplab checkpoint (needs state_dict and model_spec)")
    try:
        spec = ModelSpec.from_dict(payload["model_spec"])
        if spec.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {spec.activation!r}")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{Path(path).name}: not a sweeplab model spec ({first[:200]})") from None
    return payload, spec


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", code_dir: str | None = None
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from a checkpoint file; tensors saved on a GPU land on `map_location`. Anything but a
    sweeplab checkpoint (truncated, tampered with, a pickle carrying code) is a ValueError naming the file. A
    user's class is imported from `code_dir` or sys.path, and only when it is an nn.Module subclass."""
    payload, spec = read_checkpoint(path, map_location)
    try:
        model = build_model(spec, code_dir, where="in this folder")
    except ConfigError as exc:  # the user's class cannot be imported or built here
        raise ValueError(
            f"{Path(path).name}: the run trained {spec.class_path}; {str(exc).split(': ', 1)[-1]} "
            "(run from the folder that holds its module, or put it on PYTHONPATH)"
        ) from None
    try:
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # wrong shapes or names, a spec that is not one
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{Path(path).name}: the weights do not fit the model spec ({first[:200]})") from None
    model.to(map_location)
    model.eval()
    return model, spec


def spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.to_dict(), indent=2, sort_keys=True)


def architecture(state: dict[str, torch.Tensor]) -> tuple:
    """What decides whether members stack (stacked.epochs.group_members): every parameter's and buffer's name, shape
    and dtype, whatever init args made them."""
    return tuple((name, tuple(t.shape), str(t.dtype)) for name, t in state.items())


# init args that may differ inside one stacked group when they only set nn.Dropout rates (stacked.epochs.model_key)
DROPOUT_ARG = re.compile(r"drop", re.IGNORECASE)
_NOT_BEHAVIOUR = {"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"}


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Each nn.Dropout's rate by module name (exactly nn.Dropout: the layers the stacked engine draws for)."""
    return {name: float(m.p) for name, m in model.named_modules() if type(m) is nn.Dropout}


def behaviour(model: nn.Module) -> tuple | None:
    """What a built module computes besides its parameters and buffers (`architecture`): every submodule's type and
    its own attributes (an activation chosen, a flag, a scale, a plain tensor by its values), nn.Dropout's rate
    left out. Two members with equal behaviour and architecture compute alike but for their weights and dropout
    rates, whatever init args built them. None when an attribute is not a value it can compare (a function, a
    hook, another object): then nothing is known beyond the init args."""
    try:
        return tuple(
            (name, f"{type(m).__module__}.{type(m).__qualname__}", _encoded(_own_attributes(m)))
            for name, m in model.named_modules()
        )
    except _Opaque:
        return None


class _Opaque(Exception):
    """An attribute `behaviour` cannot compare by value."""


def _own_attributes(module: nn.Module) -> dict[str, Any]:
    rate = type(module) is nn.Dropout
    return {k: v for k, v in vars(module).items() if k not in _NOT_BEHAVIOUR and not (rate and k == "p")}


def _encoded(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)  # repr: 1 and 1.0 and True stay apart
    if isinstance(value, (torch.dtype, torch.device, enum.Enum)):
        return (type(value).__name__, str(value))
    if isinstance(value, nn.Parameter):  # an alias of a registered one (an RNN's _flat_weights): its shape
        return ("parameter", str(value.dtype), tuple(value.shape))
    if isinstance(value, torch.Tensor):  # by its values' digest (any dtype; a sparse or odd tensor: opaque)
        try:
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        except Exception:
            raise _Opaque from None
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(data).hexdigest())
    if isinstance(value, (list, tuple)) and depth < 4:
        return (type(value).__name__, tuple(_encoded(v, depth + 1) for v in value))
    if isinstance(value, dict) and depth < 4:
        return ("dict", tuple(sorted((repr(k), _encoded(v, depth + 1)) for k, v in value.items())))
    if isinstance(value, nn.Module):  # held twice (an alias): its own entry in named_modules says what it does
        return ("module", type(value).__qualname__)
    raise _Opaque


def classes_from_model(config: ExperimentConfig, inputs, input_shape: tuple[int, ...]) -> int:
    """The number of classes when neither the data (labels, `targets`) nor the file (data.n_classes) says it:
    the width of the user's model's output on the example batch, as plain PyTorch and Lightning users never give
    it (their head says it). Built and run as check_model does, leaving torch's RNG as it was; a constructor that
    needs the count itself (n_classes, num_classes, out_features, n_outputs with no default, not in init_args) is
    one line asking for it."""
    model = config.model
    where = f"model.class_path: {model.class_path}"
    cls = model_class(model.class_path, config.code_dir)
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        parameters = {}
    needs = [
        name
        for name in ("n_classes", "num_classes", "out_features", "n_outputs")
        if name in parameters and parameters[name].default is inspect.Parameter.empty and name not in model.init_args
    ]
    if needs:
        raise ConfigError(
            f"data.n_classes: {where}() takes {needs[0]}, and nothing says how many classes there are (the Dataset "
            f"has no `targets`): give data.n_classes, or model.init_args.{needs[0]}"
        )
    args = data_args(cls, model.init_args, input_shape, 0, None)
    for name in ("out_features", "n_outputs"):  # the width is what is asked: the constructor's own default
        if name not in model.init_args:
            args.pop(name, None)
    with torch.random.fork_rng(devices=[]):
        net = instantiate(cls, args, model.class_path)
        net.eval()
        with torch.no_grad():
            out = call_users(
                lambda: batch.call(net, inputs), f"{where}: forward", f" on a batch of {batch.describe(inputs)}"
            )
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] >= 2):
        shown = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{where}: forward gave {shown} for a batch of {batch.describe(inputs)}; task multiclass needs [batch, "
            "classes] (one logit per class), from which the number of classes is read"
        )
    return int(out.shape[1])
