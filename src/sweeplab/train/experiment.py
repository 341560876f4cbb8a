"""One experiment, from config to trained model: seed, data, model (the MLP or the user's), optimizer, batches, fit.

The order of random draws is the seed's (torch.manual_seed, data X and noise, then the model's initial weights),
so the lab config reproduces the seed's numbers. cli.py (`sweeplab run`) and engines.ReferenceEngine (each trial
of a sweep) call `run_experiment`; the loop itself is in loop.py. `check_config` / `check_probes` read the data and
run the model on one batch before any store exists, so bad data or a bad plugin is one line, not a failed trial.

Why one module of ~480 lines: the checks before any store are `run_experiment`'s first steps done ahead (the
same data, model and options built the same way), kept beside it so they cannot drift from what a run does.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

from sweeplab.config import ConfigError, ExperimentConfig, logged_metrics, own_metrics
from sweeplab.train import batch
from sweeplab.train.data import Dataset, check_data, check_predict_x, drawn, seeded_dataset
from sweeplab.train.epoch import Callback, History
from sweeplab.train.init import initial_model
from sweeplab.train.items import CheckedCollate
from sweeplab.train.loop import (
    LoaderBatches,
    ShapeError,
    Step,
    TensorBatches,
    check_batch,
    evaluate,
    fit,
    predict,
)
from sweeplab.train.model import ModelSpec, build_model
from sweeplab.train.options import (
    build_loss,
    build_metrics,
    build_optimizer,
    build_scheduler,
    frozen_parameters,
    monitor_of,
    optimizer_params,
)
from sweeplab.train.plugins import call_users, data_args, error_text, model_class


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not there is a config error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name} requested but MPS is not available on this machine")
    return device


def model_spec_for(config: ExperimentConfig, dataset: Dataset) -> ModelSpec:
    """What builds the trial's model: the MLP's sizes, or the user's class with its init args and the data's
    shape filled in where its constructor asks for it (plugins.DATA_ARGS)."""
    model = config.model
    init_args: dict = {}
    if model.class_path is not None:
        cls = model_class(model.class_path, config.code_dir)
        init_args = data_args(cls, model.init_args, dataset.input_shape, dataset.n_outputs, dataset.n_classes)
    return ModelSpec(
        in_features=dataset.n_features,
        hidden=() if model.class_path else tuple(model.hidden_sizes),
        out_features=dataset.n_outputs,
        activation=model.activation,
        dropout=model.dropout,
        task=config.task,
        feature_names=dataset.feature_names,
        class_path=model.class_path,
        init_args=init_args,
        input_shape=dataset.input_shape,
        inputs=inputs_spec(dataset, cls if model.class_path is not None else None),
        classes=dataset.class_names,
    )


def inputs_spec(dataset: Dataset, cls: type | None) -> dict:
    """The forward's inputs by name, dtype and shape, for data of several inputs (or of one a collate_fn shapes):
    what the champion's signature and `sweeplab predict` take. A collate_fn decides the sizes between the batch
    and the last dimension (a padded length), so they are -1; {} for one tensor of features."""
    if dataset.input_shape:
        return {}
    inputs = dataset.inputs
    names = batch.input_names(cls, inputs) if cls is not None else ["x"]
    if isinstance(inputs, dict):
        kind, values = "kwargs", list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        kind, values = "args", list(inputs)
    else:
        kind, values = "tensor", [inputs]
    specs = []
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):  # nested deeper: described, not named (the pyfunc refuses it)
            specs.append({"name": name, "dtype": "nested", "shape": []})
            continue
        shape = [-1, *value.shape[1:]]
        if dataset.collate_fn is not None:
            shape = [-1 if 0 < i < len(shape) - 1 else size for i, size in enumerate(shape)]
        specs.append({"name": name, "dtype": str(value.dtype).replace("torch.", ""), "shape": shape})
    return {"kind": kind, "inputs": specs}


def check_model(config: ExperimentConfig, dataset: Dataset) -> None:
    """Build the trial's model and run one training batch through it, on the CPU, without touching torch's RNG:
    a class that cannot be built, has nothing to train, or gives outputs that do not fit the task and the data is
    one line naming model.class_path (or model.init_args) before any study or run exists."""
    spec = model_spec_for(config, dataset)
    state = torch.get_rng_state()
    try:
        model = build_model(spec, config.code_dir)
        where = f"model.class_path: {spec.class_path}"
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"{where} has no trainable parameters: there is nothing to train")
        if spec.class_path is None and not dataset.input_shape:
            if dataset.collate_fn is not None and not dataset.structured:
                raise ConfigError(
                    f"model: the built-in MLP needs a fixed number of features, and data.collate_fn decides each "
                    f"batch's shape (the first gives {batch.describe(dataset.inputs)}): give model.class_path "
                    "(your nn.Module)"
                )
            raise ConfigError(
                f"model: the built-in MLP takes one tensor of features; the data gives {batch.describe(dataset.inputs)}"
                ": give model.class_path (your nn.Module, whose forward takes them)"
            )
        batch_x, batch_y = dataset.first_batch(2)
        size = int(batch_y.shape[0])
        model.train()
        out = call_users(
            lambda: batch.call(model, batch_x), f"{where}: forward", f" on a batch of {batch.describe(batch_x)}"
        )
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"{where}: forward returned {type(out).__name__}; it must return a tensor")
        wanted = [size, dataset.n_outputs]
        if list(out.shape) != wanted:
            raise ConfigError(
                f"{where}: forward gave {list(out.shape)} for a batch of {batch.describe(batch_x)}; task "
                f"{config.task} needs {wanted} ({_outputs_text(config.task, dataset.n_outputs)})"
            )
        if not bool(torch.isfinite(out.detach()).all()):
            raise ConfigError(f"{where}: forward gave NaN or infinite outputs on a batch of {batch.describe(batch_x)}")
        try:
            check_batch(out, batch_y, build_loss(config, dataset.y_train, dataset.n_classes))
        except ShapeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    finally:
        torch.set_rng_state(state)


def _outputs_text(task: str, n_outputs: int) -> str:
    if task == "multiclass":
        return f"one logit per class, {n_outputs} classes"
    if task == "binary":
        return "one logit per sample"
    return f"{n_outputs} value(s) per sample"


@dataclass
class Trained:
    """What training leaves for the recorder, whichever engine trained: the config, the data it trained on, what
    rebuilds its model (the spec) and its History, the best state included."""

    config: ExperimentConfig
    dataset: Dataset
    spec: ModelSpec
    history: History


@dataclass
class RunResult(Trained):
    """A run of the reference loop, which also leaves its model (best state restored) and its predictions."""

    model: torch.nn.Module
    device: torch.device
    predictions: torch.Tensor  # model outputs for config.predict_x, best state restored
    refit: History | None = None  # data.folds: the refit's History (its model is `model`; `history` the folds' mean)
    refit_run_id: str | None = None
    test: dict[str, float] | None = None  # data.test_size: the best state's scores on the test split (test_scores)


def make_batches(
    dataset: Dataset,
    split: str,
    batch_size: int,
    loader: str = "tensor",
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
):
    """A split's batches: in-memory tensors indexed directly (TensorBatches, the fast path), or a real DataLoader
    (LoaderBatches) for a lazy Dataset, the user's collate_fn, or `train.loader: dataloader`."""
    if dataset.lazy or dataset.collate_fn is not None or loader == "dataloader":
        items = dataset.train_set if split == "train" else dataset.val_set
        collate = CheckedCollate(
            dataset.collate_fn,
            f"{dataset.where} ({'training' if split == 'train' else 'validation'} split)",
            dataset.n_classes if dataset.task != "regression" else None,
        )
        if items is None:
            x, y = (dataset.x_train, dataset.y_train) if split == "train" else (dataset.x_val, dataset.y_val)
            return LoaderBatches(x, y, batch_size, shuffle, generator, device, collate, None, **dataset.loader_args)
        return LoaderBatches(
            items, None, batch_size, shuffle, generator, device, collate, dataset.task, **dataset.loader_args
        )
    x, y = (dataset.x_train, dataset.y_train) if split == "train" else (dataset.x_val, dataset.y_val)
    return TensorBatches(x, y, batch_size, shuffle=shuffle, generator=generator, device=device)


def val_batch_size(train, dataset: Dataset) -> int:
    """A validation batch's size, whichever engine: `train.val_batch_size`, else the whole split as one batch (the
    seed's), except from a lazy Dataset: batch_size there, or the batch alone would hold the split in memory."""
    return train.val_batch_size or (train.batch_size if dataset.lazy else dataset.n_val)


def run_experiment(config: ExperimentConfig, callbacks: Iterable[Callback] = (), keep_last: bool = False) -> RunResult:
    """Train `config` on the reference loop: its best epoch's state (`keep_last`: its last epoch's, a refit's)."""
    device = resolve_device(config.device)
    dataset, after_data = drawn(config, {})  # torch's RNG seeded by config.seed, then the data (the seed's order)
    torch.set_rng_state(after_data)  # the model's initial weights draw from here
    check_predict_x(config, dataset)
    spec = model_spec_for(config, dataset)
    model = initial_model(config, spec).to(device)
    optimizer = build_optimizer(config, optimizer_params(config, model))
    train = config.train
    loss_fn = build_loss(config, dataset.y_train, dataset.n_classes).to(device)
    shuffle_gen = torch.Generator().manual_seed(train.shuffle_seed) if train.shuffle_seed is not None else None
    train_batches = make_batches(dataset, "train", train.batch_size, train.loader, train.shuffle, shuffle_gen, device)
    val_batches = make_batches(dataset, "val", val_batch_size(train, dataset), train.loader, device=device)
    scheduler = build_scheduler(config, optimizer, math.ceil(dataset.n_train / train.batch_size))
    step = Step(
        optimizer,
        train.clip_grad_norm,
        train.clip_grad_value,
        train.accumulate_grad_batches,
        train.precision,
        device.type,
        scheduler,
        train.scheduler.interval if train.scheduler else "epoch",
        frozen_parameters(config, model),
    )
    stopping = train.early_stopping
    history = fit(
        model,
        optimizer,
        loss_fn,
        train_batches,
        val_batches,
        train.epochs,
        task=config.task,
        callbacks=callbacks,
        objective=(config.objective.metric, config.objective.direction),
        step=step,
        early_stopping=(stopping.patience, stopping.min_delta) if stopping else None,
        monitor=monitor_of(config),
        metrics=logged_metrics(config),
        own_metrics=build_metrics(config),
        keep_last=keep_last,
    )
    if config.predict_x and dataset.input_shape:
        x = torch.tensor(config.predict_x, dtype=torch.float32).reshape(-1, *dataset.input_shape)
        predictions = predict(model, x)
    else:  # a user's model need not take an empty batch
        predictions = torch.empty(0, dataset.n_outputs)
    return RunResult(config, dataset, spec, history, model, device, predictions)


def test_scores(config: ExperimentConfig, dataset: Dataset, model: torch.nn.Module) -> dict[str, float]:
    """The model's scores on the test split, evaluated as validation evaluates: `test_loss` and `test_<metric>` for
    every metric the run logs (`val_accuracy` -> `test_accuracy`). Called once per champion and per `sweeplab run`,
    never during the search."""
    view = dataset.test_view()
    device = next(model.parameters()).device
    train = config.train
    loss_fn = build_loss(config, dataset.y_train, dataset.n_classes).to(device)
    batches = make_batches(view, "val", val_batch_size(train, view), train.loader, device=device)
    loss, values, _ = evaluate(
        model, batches, loss_fn, config.task, None, logged_metrics(config), build_metrics(config)
    )
    return {"test_loss": loss, **{"test_" + name.removeprefix("val_"): value for name, value in values.items()}}


# --- checks before any store exists (`sweeplab run`, `sweeplab sweep`) ---------------------------------------


def check_config(config, source: str = "") -> None:
    """A config's data read and checked (data.check_data), and its model built and run on one batch
    (experiment.check_model) when the data or the model is the user's: each is one line, before any store exists."""
    try:
        _check(config, {})
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _check(config, seen: dict) -> None:
    # the seed matters only to a user's loader, which may draw from torch's RNG
    key = (config.data.model_dump_json(), config.task, config.seed if config.data.source == "python" else None)
    if key not in seen:
        seen[key] = check_data(config)

    def dataset() -> Dataset:  # built once, when a check needs it (check_data reads CSV and the seed's without)
        if seen[key] is None:
            seen[key] = seeded_dataset(config)
        return seen[key]

    options_key = (key, config.train.model_dump_json(), config.objective.model_dump_json())
    if options_key not in seen and _has_options(config):
        seen[options_key] = True
        check_options(config, dataset())
    objective_key = (key, config.objective.metric)
    if config.objective.metric in NEEDS_SPREAD and objective_key not in seen:
        seen[objective_key] = True
        check_objective(config, dataset())
    train = config.train
    if train.param_groups or train.freeze or config.model.init_from:  # names and shapes against the model's, now
        groups_key = (key, config.model.model_dump_json(), train.model_dump_json(include={"param_groups", "freeze"}))
        if groups_key not in seen:
            seen[groups_key] = True
            state = torch.get_rng_state()
            try:
                model = initial_model(config, model_spec_for(config, dataset()))
                build_optimizer(config, optimizer_params(config, model))
                frozen_parameters(config, model)
            finally:
                torch.set_rng_state(state)
    user_model = config.model.class_path is not None
    if user_model or config.data.source == "python":
        model_key = (key, config.model.model_dump_json(), config.train.model_dump_json(include={"loss"}))
        if model_key not in seen:
            seen[model_key] = True
            check_model(config, dataset())


# Objectives that the validation targets alone can leave undefined, whatever the model predicts
NEEDS_SPREAD = ("val_auroc", "val_average_precision", "val_r2")


def check_objective(config: ExperimentConfig, dataset: Dataset) -> None:
    """An objective the validation split makes undefined at every epoch is bad input, not a sweep of trials that
    each fail: AUROC or average precision over one class (no ranking to judge), R2 of a constant target (its
    denominator is zero: 0 or 1 whatever the model). Lazy data without `targets` is not read here; its trials
    fail with the reason (epoch.Curves.histories)."""
    metric, y = config.objective.metric, dataset.y_val
    if y is None or metric not in NEEDS_SPREAD:
        return
    where = f"objective.metric: {metric} is undefined on the validation split"
    if metric == "val_r2" and config.task == "regression":
        targets = y.reshape(len(y), -1).double()
        constant = [i for i in range(targets.shape[1]) if bool((targets[:, i] == targets[0, i]).all())]
        if constant:
            output = f"output {constant[0]}'s" if targets.shape[1] > 1 else "its"
            raise ConfigError(
                f"{where}: {output} {len(y)} targets all equal {float(targets[0, constant[0]]):g} "
                "(R2 divides by their spread); give a validation split whose targets vary (data.val_size, "
                "data.split_seed) or another objective"
            )
    elif metric != "val_r2" and config.task == "binary":
        classes = torch.unique(y.reshape(-1)).tolist()
        if len(classes) < 2:
            raise ConfigError(
                f"{where}: its {len(y)} samples are all class {classes[0]:g} (it ranks class 1 against class 0); "
                "give a validation split with both classes (data.val_size, data.split_seed) or another objective"
            )


def _has_options(config) -> bool:
    train = config.train
    return (
        not isinstance(train.optimizer, str)
        or not isinstance(train.loss, str)
        or train.scheduler is not None
        or train.precision != "32"
        or bool(own_metrics(config))
    )


def check_options(config: ExperimentConfig, dataset: Dataset) -> None:
    """The optimizer, the schedule and the loss built as a trial builds them (over one scalar parameter, and the
    loss on outputs of the task's shape for two training samples): an unknown class, init args it refuses, a
    scheduler missing an argument, or a loss that does not return a scalar is one line naming the field."""
    if config.train.precision == "16" and resolve_device(config.device).type != "cuda":
        raise ConfigError("train.precision: 16 needs a CUDA device (float16 with a GradScaler); give bf16 here")
    state = torch.get_rng_state()
    try:
        optimizer = build_optimizer(config, [torch.zeros(1, requires_grad=True)])
        check_step(config, optimizer)
        steps_per_epoch = math.ceil(dataset.n_train / config.train.batch_size)
        check_schedule(config, optimizer, build_scheduler(config, optimizer, steps_per_epoch), steps_per_epoch)
        loss_fn = build_loss(config, dataset.y_train, dataset.n_classes)
        target = dataset.first_batch(2)[1]
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.train.precision == "bf16"):
                value = loss_fn(torch.zeros(target.shape[0], dataset.n_outputs), target)
        except Exception as exc:
            raise ConfigError(f"train.loss: on a batch of 2 it raised {error_text(exc)}") from None
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(f"train.loss: returned {shape} on a batch of 2; a loss must return a scalar")
        outputs = torch.randn(target.shape[0], dataset.n_outputs)
        for metric in build_metrics(config).values():  # each user metric once, on outputs of the task's shape
            metric(outputs, target)
    finally:
        torch.set_rng_state(state)


MAX_CHECKED_STEPS = 10_000  # a schedule is stepped this far before any run (~10 us a step)


def check_step(config: ExperimentConfig, optimizer) -> None:
    """An optimizer whose step() needs a closure (LBFGS re-evaluates the loss several times a step) does not fit a
    loop that takes one step per batch: refused here, not as a TypeError in the first batch."""
    try:
        parameters = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        return
    closure = parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        name = type(optimizer).__name__
        raise ConfigError(
            f"train.optimizer: {name}.step() needs a closure that re-evaluates the loss; sweeplab's loop takes one "
            "step per batch (the seed's zero_grad, backward, step): give an optimizer whose closure is optional"
        )


def check_schedule(config: ExperimentConfig, optimizer, scheduler, steps_per_epoch: int) -> None:
    """The schedule stepped over a shadow optimizer as far as a run steps it (at most MAX_CHECKED_STEPS): an init
    arg of the wrong type (`step_size: abc`), a scheduler that raises at some step, or a learning rate that is not
    a finite number is one line naming train.scheduler, before any store, and before `engine: auto` probes it."""
    if scheduler is None:
        return
    schedule = config.train.scheduler
    per_epoch = math.ceil(steps_per_epoch / config.train.accumulate_grad_batches) if schedule.interval == "step" else 1
    steps = min(config.train.epochs * per_epoch, MAX_CHECKED_STEPS)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": the shadow never steps
        for step in range(1, steps + 1):
            call_users(
                lambda: scheduler.step(1.0) if plateau else scheduler.step(),
                f"train.scheduler: {schedule.class_path}.step()",
                f" at step {step}",
            )
            rates = [group["lr"] for group in optimizer.param_groups]
            bad = next((r for r in rates if not (isinstance(r, (int, float)) and math.isfinite(r))), None)
            if bad is not None:
                raise ConfigError(
                    f"train.scheduler: {schedule.class_path} sets the learning rate to {bad!r} at step {step}"
                )


def check_probes(probes, source: str) -> None:
    """Each distinct data source of a sweep's probe configs ((field, config) pairs: both ends of every range, each
    choice), read and checked once (data.check_data), and each distinct model built and run on one batch: a bad CSV
    value or a bad plugin is one line naming `source` before any study or run exists, not a failure in every
    trial."""
    seen: dict = {}
    for field, config in probes:
        try:
            _check(config, seen)
        except ConfigError as exc:
            message = str(exc)
            if field and not message.startswith(("model.", "data.")):
                message = f"{field}: {message}"
            raise ConfigError(f"{source}: {message}") from None
