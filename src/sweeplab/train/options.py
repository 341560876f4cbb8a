"""The loop's options, built from a config: the optimizer, the learning-rate schedule, the loss, the metrics.

Each is named in the experiment file by a short name (`Adam`, `CosineAnnealingLR`, `huber`, `CrossEntropyLoss`) or
by `class_path` + `init_args` (torch's own classes by short name, or the user's by import path), and built here,
so the reference loop (loop.py) and the checks before any store (experiment.py) build them the same way. The
stacked engine applies the same options to K members at once (stacked/epochs.py) or, for what it cannot apply
exactly, sends the trial to the reference loop (stacked/epochs.check_supported says which and why).

The epoch decisions both engines share (`improves`, `out_of_patience`) are in epoch.py. Parameter groups and
frozen parameters (`train.param_groups`, `train.freeze`: fine-tuning) are chosen here by their names' globs.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from sweeplab.config import ClassSpec, ConfigError, ExperimentConfig, loss_class_name, metric_direction, own_metrics
from sweeplab.train.plugins import error_text, import_object, user_code

# --- where short names resolve -----------------------------------------------------------------------------------


def resolve(spec: ClassSpec, modules: tuple, field: str, code_dir: str | None) -> Any:
    """The class (or function) a `class_path` names: a short name in torch's own module(s), else an import path."""
    path = spec.class_path
    if "." not in path:
        for module in modules:
            found = getattr(module, path, None)
            if found is not None and not path.startswith("_"):
                return found
        names = ", ".join(m.__name__ for m in modules)
        raise ConfigError(f"{field}.class_path: {path!r} is not in {names}; give its import path (module.Name)")
    return import_object(path, code_dir, f"{field}.class_path")


def tensor_args(init_args: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """init_args with the numbers given for tensor arguments (a loss's `weight`, `pos_weight`) as float32 tensors."""
    return {
        key: torch.as_tensor(value, dtype=torch.float32) if key in names and not isinstance(value, str) else value
        for key, value in init_args.items()
    }


def _built(build: Callable[[], Any], field: str, what: str) -> Any:
    """Build a user's or torch's object; what it raises is one ConfigError naming the field."""
    try:
        with user_code():
            return build()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{field}: {what} raised {error_text(exc)}") from None


# --- the optimizer -------------------------------------------------------------------------------------------------


def build_optimizer(config: ExperimentConfig, params) -> torch.optim.Optimizer:
    """The trial's optimizer: one of the four names with `lr`, `weight_decay`, `momentum` (as always), or any
    torch.optim class or the user's by `class_path`, given `lr` (and `weight_decay` when set) before its own
    init_args."""
    train = config.train
    decay = {} if train.weight_decay is None else {"weight_decay": train.weight_decay}
    if isinstance(train.optimizer, str):
        if train.optimizer == "SGD":
            return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, **decay)
        if train.optimizer == "RMSprop":
            return torch.optim.RMSprop(params, lr=train.lr, momentum=train.momentum, **decay)
        optimizer = torch.optim.AdamW if train.optimizer == "AdamW" else torch.optim.Adam
        return optimizer(params, lr=train.lr, **decay)
    cls = resolve(train.optimizer, (torch.optim,), "train.optimizer", config.code_dir)
    args = {"lr": train.lr, **decay, **train.optimizer.init_args}
    return _built(lambda: cls(params, **args), "train.optimizer", cls.__name__)


def group_of(config: ExperimentConfig, name: str):
    """The parameter group a parameter's name falls in (the first whose globs match), or None: the default group.
    The one rule both engines apply (the stacked optimizer per column block)."""
    return next((g for g in config.train.param_groups if any(fnmatch.fnmatchcase(name, p) for p in g.params)), None)


def frozen_until(config: ExperimentConfig, name: str) -> int:
    """The epochs a parameter stays frozen (`train.freeze`: the last entry whose globs match it), 0 if none."""
    epochs = 0
    for entry in config.train.freeze:
        if any(fnmatch.fnmatchcase(name, glob) for glob in entry.params):
            epochs = entry.epochs
    return epochs


def optimizer_params(config: ExperimentConfig, model: torch.nn.Module):
    """What the optimizer is built over: the model's parameters, or with `train.param_groups` torch's param groups,
    the default group (every parameter no group's globs match) first, then each named group with `lr * lr_scale`
    (and its weight_decay); each group carries its `name`. A glob that matches no parameter is one line."""
    groups = config.train.param_groups
    if not groups:
        return model.parameters()
    named = list(model.named_parameters())
    members: dict[str, list] = {group.name: [] for group in groups}
    rest = []
    for name, parameter in named:
        owner = group_of(config, name)
        (members[owner.name] if owner else rest).append(parameter)
    for group in groups:
        if not members[group.name]:
            raise ConfigError(
                f"train.param_groups.{group.name}.params: {group.params} match no parameter of the model "
                f"(its parameters: {_names(named)})"
            )
    out = [{"params": rest, "name": "default"}] if rest else []
    for group in groups:
        extra = {} if group.weight_decay is None else {"weight_decay": group.weight_decay}
        out.append({"params": members[group.name], "name": group.name, "lr": config.train.lr * group.lr_scale, **extra})
    return out


def frozen_parameters(config: ExperimentConfig, model: torch.nn.Module) -> list[tuple[list, list, int]]:
    """`train.freeze`: (parameters, the BatchNorm modules all of whose parameters are among them, epochs) per length
    of freeze (frozen_until). A glob that matches no parameter is one line."""
    named = list(model.named_parameters())
    for i, entry in enumerate(config.train.freeze):
        if not any(fnmatch.fnmatchcase(n, glob) for n, _ in named for glob in entry.params):
            raise ConfigError(
                f"train.freeze.{i}.params: {entry.params} match no parameter of the model (its parameters: "
                f"{_names(named)})"
            )
    until = {id(p): frozen_until(config, n) for n, p in named}
    plan = []
    for epochs in sorted({e for e in until.values() if e}):
        chosen = [p for _, p in named if until[id(p)] == epochs]
        ids = {id(p) for p in chosen}
        norms = [
            module
            for module in model.modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and any(True for _ in module.parameters(recurse=False))
            and all(id(p) in ids for p in module.parameters(recurse=False))
        ]
        plan.append((chosen, norms, epochs))
    return plan


def _names(named: list) -> str:
    names = [name for name, _ in named]
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


# --- the schedule --------------------------------------------------------------------------------------------------

PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau


def build_scheduler(config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """The trial's learning-rate scheduler, or None: a torch.optim.lr_scheduler class by short name, or the user's
    class or function taking the optimizer first. `total_steps` / `steps_per_epoch` / `epochs` are filled in when
    the class takes them and the file does not give them (OneCycleLR), from the trial's own epochs and batches;
    ReduceLROnPlateau's `mode` follows the monitored metric's direction unless given."""
    schedule = config.train.scheduler
    if schedule is None:
        return None
    factory = resolve(schedule, (torch.optim.lr_scheduler,), "train.scheduler", config.code_dir)
    args = dict(schedule.init_args)
    steps = math.ceil(steps_per_epoch / config.train.accumulate_grad_batches)
    try:
        takes = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes = {}
    if "total_steps" in takes and not {"total_steps", "epochs", "steps_per_epoch"} & set(args):
        # OneCycleLR: as many steps as the scheduler will be stepped
        args["total_steps"] = config.train.epochs * (steps if schedule.interval == "step" else 1)
    if factory is PLATEAU and "mode" not in args:
        args["mode"] = "min" if direction_of(config, monitor_of(config)) == "minimize" else "max"
    scheduler = _built(lambda: factory(optimizer, **args), "train.scheduler", getattr(factory, "__name__", "it"))
    if not callable(getattr(scheduler, "step", None)):
        raise ConfigError(
            f"train.scheduler: {schedule.class_path} returned {type(scheduler).__name__}, not a scheduler"
        )
    return scheduler


def direction_of(config: ExperimentConfig, metric: str) -> str:
    """A metric's direction: a built-in's own (config.DIRECTIONS), or the one a user's metric declares."""
    own = {m.name: m.direction for m in own_metrics(config)}
    return own.get(metric) or metric_direction(metric)


def monitor_of(config: ExperimentConfig) -> str:
    """The validation metric a ReduceLROnPlateau schedule watches: `monitor`, else the objective's."""
    schedule = config.train.scheduler
    return (schedule.monitor if schedule is not None and schedule.monitor else None) or config.objective.metric


# --- the loss ------------------------------------------------------------------------------------------------------

TENSOR_ARGS = ("weight", "pos_weight")


def build_loss(config: ExperimentConfig, y_train: torch.Tensor | None = None, n_classes: int = 0) -> nn.Module:
    """The trial's loss module: the task's own (as always), a name (LOSS_NAMES), or a torch.nn loss by short name or
    the user's module or function `(output, target) -> scalar`. `weight: balanced` is scikit-learn's
    class_weight="balanced" over the training labels: n_samples / (n_classes * count of each class)."""
    loss = config.train.loss
    task = config.task
    if isinstance(loss, str):
        return named_loss(loss, task)
    cls = resolve(loss, (nn,), "train.loss", config.code_dir)
    args = dict(loss.init_args)
    if args.get("weight") == "balanced" or args.get("pos_weight") == "balanced":
        if y_train is None:
            raise ConfigError(
                "train.loss.init_args: `balanced` needs the training labels; a lazy Dataset gives them by a `targets` "
                "attribute (one label per item), or give the weights as numbers"
            )
        key = "pos_weight" if args.get("pos_weight") == "balanced" else "weight"
        args[key] = balanced_weights(y_train, task, n_classes, key)
    args = tensor_args(args, TENSOR_ARGS)
    if inspect.isclass(cls):
        built = _built(lambda: cls(**args), "train.loss", cls.__name__)
    else:  # a function (output, target) -> scalar; its init_args are keyword arguments
        built = FunctionLoss(cls, args)
    return built


class FunctionLoss(nn.Module):
    """A user's loss function `(output, target, **init_args) -> scalar` as a module."""

    def __init__(self, function: Callable, kwargs: dict[str, Any]):
        super().__init__()
        self.function, self.kwargs = function, kwargs

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.function(output, target, **self.kwargs)


def named_loss(name: str, task: str) -> nn.Module:
    return getattr(nn, loss_class_name(name, task))()


def balanced_weights(y_train: torch.Tensor, task: str, n_classes: int, key: str) -> torch.Tensor:
    """scikit-learn's compute_class_weight("balanced"): n_samples / (n_classes * bincount(y)). For a binary
    `pos_weight`, the ratio of negatives to positives (what makes the two classes weigh the same)."""
    labels = y_train.reshape(-1).long()
    counts = torch.bincount(labels, minlength=max(n_classes, 2)).double()
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:  # its weight would be infinite: every loss after the first batch with it is inf, "diverged"
        raise ConfigError(
            f"train.loss.init_args.{key}: balanced weighs each class by 1 / its count in the training split, and "
            f"class {missing[0]} has no sample there ({labels.numel()} samples, counts "
            f"{', '.join(str(int(c)) for c in counts.tolist()[:10])}); give the weights, or a split with every class"
        )
    if task == "binary" and key == "pos_weight":
        return torch.tensor([counts[0] / counts[1]], dtype=torch.float32)
    return (labels.numel() / (len(counts) * counts)).float()


# --- what "learned nothing" means under any loss ---------------------------------------------------------------------


def fitted_constant_loss(
    loss_fn: Callable, y_train: torch.Tensor, y_val: torch.Tensor, task: str, n_outputs: int
) -> float | None:
    """The validation loss, under the trial's own loss (label smoothing, pos_weight, Huber, the user's), of the
    best constant prediction fitted on the training labels: one output row, the same for every sample, found by
    LBFGS from the closed-form start (the mean; the log of each class's frequency). A run that does not get well
    below it learned nothing about x. None when the loss cannot be fitted so (it raises, or is not finite)."""
    from sweeplab.train.items import target_for_task

    y_train, y_val = y_train.detach().cpu(), y_val.detach().cpu()
    target, val_target = target_for_task(y_train, task), target_for_task(y_val, task)
    if task == "multiclass":
        counts = torch.bincount(target, minlength=n_outputs).double()
        start = (counts.clamp(min=0.5) / counts.sum()).log()
    elif task == "binary":
        rate = float(target.double().mean().clamp(1e-6, 1 - 1e-6))
        start = torch.full((n_outputs,), math.log(rate / (1 - rate)), dtype=torch.float64)
    else:
        start = target.double().reshape(len(target), -1).mean(dim=0)
    row = start.float().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([row], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def loss_at(value: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with user_code():
            return loss_fn(value.unsqueeze(0).expand(len(labels), -1), labels)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_at(row, target)
        loss.backward()
        return loss

    try:
        optimizer.step(closure)
        with torch.no_grad():
            value = float(loss_at(row.detach(), val_target))
    except Exception:
        return None
    return value if math.isfinite(value) else None


# --- the user's metrics ----------------------------------------------------------------------------------------------


def build_metrics(config: ExperimentConfig) -> dict[str, Callable]:
    """{name: outputs, targets -> float} for the config's own metrics (config.own_metrics), imported by path."""
    out = {}
    for spec in own_metrics(config):
        function = import_object(spec.class_path, config.code_dir, f"metrics.{spec.name}.class_path")
        out[spec.name] = UserMetric(spec.name, function, dict(spec.init_args))
    return out


class UserMetric:
    """A user's metric function, contained: its prints go to stderr, its result must be a finite or NaN number."""

    def __init__(self, name: str, function: Callable, kwargs: dict[str, Any]):
        self.name, self.function, self.kwargs = name, function, kwargs

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        try:
            with user_code():
                value = self.function(outputs, targets, **self.kwargs)
            return float(value)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"metrics.{self.name}: raised {error_text(exc)}; it must return a number") from None
