"""Validated, frozen configuration: what one training run is (ExperimentConfig) and how to load it.

Every YAML file is checked here, at the edge, so a typo fails before anything trains or anything is
written to MLflow or Optuna. Errors are ConfigError with one line that names the file and the field.
The override language (`key=value`) is here too; the sweep file's schema is sweep/spec.py. A user's own
model or data loader is named here by import path (`class_path` + `init_args`) and only imported by train/plugins.py.
Schema only: this module imports no torch, MLflow or Optuna; which engine a sweep runs on, and whether its device
exists, is sweep.probes.settle's to decide. Why one module of ~900 lines: the schema is one document (the reference
page is generated from it), and each section's cross-field rules sit beside its fields.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

Task = Literal["regression", "binary", "multiclass"]
OptimizerName = Literal["Adam", "AdamW", "SGD", "RMSprop"]
Activation = Literal["relu", "tanh", "gelu", "silu"]


class ConfigError(ValueError):
    """A bad configuration or input: the message is one line naming the file and the field."""


class _Frozen(BaseModel):
    # inf and nan are refused everywhere (lr=inf, noise=.inf, a range bound of .inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data: Any) -> Any:
        """`n_trials=True` is not 1: pydantic's lax mode takes a bool for an int (YAML reads `yes` as one too)."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if isinstance(data.get(name), bool) and _takes_a_number(field.annotation):
                    raise ValueError(f"{name}: {str(data[name]).lower()} is not a number")
        return data


def _takes_a_number(annotation: Any) -> bool:
    """int or float (or Optional of one), and not bool."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,)
    return bool not in options and any(option in (int, float) for option in options)


SEED = dict(ge=-(2**63), lt=2**64)  # what torch.manual_seed and torch.Generator accept
# Bounds on sizes, so a typo (hidden=1000000000, epochs=1e12) fails here instead of running until the machine
# runs out of memory or the user gives up.
MAX_SAMPLES = 10_000_000
MAX_HIDDEN = 65_536
MAX_PARAMETERS = 100_000_000  # 400 MB of float32 weights, before the optimizer's state
MAX_EPOCHS = 1_000_000
SEED_POINTS = [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]]  # the seed's three test points
IMPORT_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"  # module.name (module may be dotted)
SKLEARN_TASKS = {
    "digits": "multiclass",
    "iris": "multiclass",
    "wine": "multiclass",
    "breast_cancer": "binary",
    "diabetes": "regression",
}
# The validation metrics each task logs per epoch: what an objective can be
METRICS = {
    "regression": ("val_loss", "val_mae", "val_rmse", "val_r2"),
    "binary": (
        "val_loss",
        "val_accuracy",
        "val_precision",
        "val_recall",
        "val_f1",
        "val_auroc",
        "val_average_precision",
    ),
    "multiclass": ("val_loss", "val_accuracy", "val_macro_f1"),
}
# Each metric's direction, declared (not guessed from its name): what `objective.direction` defaults to and must be
DIRECTIONS = {
    "val_loss": "minimize",
    "val_mae": "minimize",
    "val_rmse": "minimize",
    "val_r2": "maximize",
    "val_accuracy": "maximize",
    "val_precision": "maximize",
    "val_recall": "maximize",
    "val_f1": "maximize",
    "val_macro_f1": "maximize",
    "val_auroc": "maximize",
    "val_average_precision": "maximize",
}
# train.loss by name: the regression losses, and each classification task's own (the default for its task)
# train.loss by name, the one table: the task it serves, torch's class, and how a picture's axis names it
LOSSES = {
    "mse": ("regression", "MSELoss", "MSE"),
    "l1": ("regression", "L1Loss", "L1"),
    "huber": ("regression", "HuberLoss", "Huber"),
    "smooth_l1": ("regression", "SmoothL1Loss", "smooth L1"),
    "bce": ("binary", "BCEWithLogitsLoss", "BCE"),
    "cross_entropy": ("multiclass", "CrossEntropyLoss", "cross-entropy"),
}
LOSS_NAMES = {name: task for name, (task, _, _) in LOSSES.items()}


def loss_class_name(loss: str, task: str) -> str:
    """torch's class of a loss given by name: the task's own for a classifier (`mse` is then its default)."""
    return LOSSES[LOSS_NAMES_OF[task]][1] if task != "regression" else LOSSES[loss][1]


LOSS_NAMES_OF = {"binary": "bce", "multiclass": "cross_entropy"}
# The metrics every run of a task logs per epoch; the others of METRICS are logged when named in `metrics`, as the
# objective or as a schedule's monitor (each is one more curve per run for MLflow to store: the default sweep
# would write 2.3x the metric rows for three regression curves nobody asked for)
DEFAULT_METRICS = {
    "regression": (),
    "binary": ("val_accuracy", "val_precision", "val_recall", "val_f1"),
    "multiclass": ("val_accuracy", "val_macro_f1"),
}


def metric_direction(metric: str) -> str:
    """Whether a validation metric is better lower ("minimize") or higher ("maximize")."""
    return DIRECTIONS.get(metric, "maximize")


def _import_path(value: str | None, example: str) -> str | None:
    if value is not None and not re.fullmatch(IMPORT_PATH, value):
        raise ValueError(f"an import path, {example} (the module beside the experiment file or on sys.path)")
    return value


def _plain_args(value: dict[str, Any]) -> dict[str, Any]:
    """init_args are stored as JSON beside the weights: plain values only (numbers, text, lists, maps)."""

    def plain(item: Any) -> bool:
        if isinstance(item, dict):
            return all(isinstance(k, str) and plain(v) for k, v in item.items())
        if isinstance(item, list):
            return all(plain(v) for v in item)
        return item is None or isinstance(item, (bool, int, float, str))

    for key, item in value.items():
        if not plain(item):
            raise ValueError(f"{key}: {type(item).__name__} is not a plain value (number, text, list or map)")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{key}: not a finite number")
    return value


# init_args (of the user's model or data loader): plain values only; a class_path: an import path
InitArgs = Annotated[dict[str, Any], AfterValidator(_plain_args)]
ModelPath = Annotated[Union[str, None], AfterValidator(lambda value: _import_path(value, "module.ClassName"))]
LoaderPath = Annotated[Union[str, None], AfterValidator(lambda value: _import_path(value, "module.load_function"))]


class ObjectiveConfig(_Frozen):
    """What a trial is judged by: a per-epoch validation metric (METRICS) and whether more or less is better
    (default, and the only one allowed: the metric's own direction, DIRECTIONS). best_epoch, the best state, pruning,
    the champion and the report all follow it."""

    metric: str = Field("val_loss", description="the validation metric a trial is judged by (its best epoch's)")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="default: the metric's own")

    @model_validator(mode="after")
    def _default_direction(self) -> "ObjectiveConfig":
        if self.metric not in DIRECTIONS:  # a metric of the user's: its own `direction` (ExperimentConfig checks)
            return self
        natural = metric_direction(self.metric)
        if self.direction is None:
            object.__setattr__(self, "direction", natural)
        elif self.direction != natural:  # the champion would be the worst model
            raise ValueError(
                f"direction {self.direction} contradicts {self.metric}, which is better when "
                f"{'lower' if natural == 'minimize' else 'higher'}: give direction {natural} or leave it out"
            )
        return self

    column = property(lambda self: objective_column(self.metric), doc="the run's summary metric: best_val_accuracy")
    minimize = property(lambda self: self.direction == "minimize")


def objective_column(metric: str) -> str:
    """The run's summary metric of an objective: `best_val_accuracy`, its value at the best epoch."""
    return f"best_{metric}"


class DataConfig(_Frozen):
    """Where the samples come from and how they are split.

    `synthetic` is the seed's generator: X ~ N(0, 1) of shape [n_samples, 2], y = 3*x1 + 2*x2 + 5 + noise*N(0, 1);
    binary labels are y > 5, multi-class labels cut y at the quantiles of the noiseless target.
    `csv` reads feature columns and a target column with pandas. `sklearn` is one of scikit-learn's bundled data
    sets by `name` (no download; digits as [N, 1, 8, 8] images). `python` calls the user's loader (`class_path` +
    `init_args`), which returns tensors (X, y), {"train": (X, y), "val": (X, y)}, or a map-style torch Dataset.
    X may be a tuple or dict of arrays (several inputs: `model(*X)`, `model(**X)`); a Dataset's items are (inputs,
    target) and are read lazily, through a DataLoader with `num_workers` workers; `collate_fn` makes every batch.
    """

    source: Literal["synthetic", "csv", "sklearn", "python"] = Field(
        "synthetic", description="the seed's generator, a CSV file, a bundled scikit-learn set, or your loader"
    )
    n_samples: int = Field(240, gt=1, le=MAX_SAMPLES, description="synthetic only: samples drawn")
    noise: float = Field(0.3, ge=0, description="synthetic only: the noise's standard deviation")
    n_classes: int = Field(3, ge=2, description="multiclass only")
    path: str | None = Field(None, description="csv only: the file, relative to the experiment file")
    features: list[str] | None = Field(None, description="csv only: feature columns (default: all but target)")
    target: str | None = Field(None, description="csv only: the target column")
    name: Literal["digits", "iris", "wine", "breast_cancer", "diabetes"] | None = Field(
        None, description="sklearn only: which bundled data set"
    )
    class_path: LoaderPath = Field(None, description="python only: module.function (or class)")
    init_args: InitArgs = Field(default_factory=dict, description="python only: keyword arguments of the loader")
    val_size: Union[int, float] = Field(48, gt=0, description="validation samples, or a fraction < 1")
    split_seed: int = Field(42, **SEED, description="random_split's generator seed (train / validation)")
    train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description=("share of the training split kept (the first of its shuffled order): a condition of the data"),
    )
    collate_fn: LoaderPath = Field(
        None, description="module.function that makes a batch of items (padding, packing), wherever batches are made"
    )
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader workers, where batches come from a DataLoader")
    pin_memory: bool = Field(False, description="DataLoader's pin_memory (CUDA only)")
    persistent_workers: bool = Field(False, description="DataLoader's persistent_workers (with num_workers)")
    stratify: bool = Field(
        False, description="keep the class proportions in every split (scikit-learn's stratified split); classification"
    )
    test_size: Union[int, float, None] = Field(
        None,
        gt=0,
        description=(
            "a test split, set aside first (a fraction < 1 or a count; or a loader's `test` entry): the search never "
            "sees it; each champion, and a run's best state, is scored on it once (test_loss, test_<metric>)"
        ),
    )
    test_seed: int = Field(0, **SEED, description="the test split's own generator seed")
    classes: Union[list[str], None] = Field(
        None,
        description=(
            "the classes' names, in label order (default: a Dataset's `classes`, as torchvision's have): the champion "
            "answers them, and its probabilities are named by them"
        ),
    )
    folds: Union[int, None] = Field(
        None,
        ge=2,
        le=100,
        description=(
            "k-fold cross-validation on the training split (stratified for classification): each trial trains one "
            "member per fold, validated on its held-out fold; its curves, best epoch and objective are the mean over "
            "folds; a sweep's champion is refit on the whole training split for that many epochs"
        ),
    )
    fold: Union[int, None] = Field(None, ge=0, description="set by sweeplab: the fold a fold member holds out")

    @model_validator(mode="after")
    def _csv_needs_path(self) -> "DataConfig":
        if self.source == "csv" and (self.path is None or self.target is None):
            missing = "path" if self.path is None else "target"
            raise ValueError(f"{missing}: required when source is csv")
        if self.source == "sklearn" and self.name is None:
            raise ValueError("name: required when source is sklearn (digits, iris, wine, breast_cancer or diabetes)")
        if self.source == "python" and self.class_path is None:
            raise ValueError(
                "class_path: required when source is python (module.function, found beside the "
                "experiment file or on sys.path)"
            )
        given = {"name": "sklearn", "class_path": "python", "path": "csv", "target": "csv", "features": "csv"}
        for key, source in given.items():
            if key in self.model_fields_set and getattr(self, key) is not None and self.source != source:
                raise ValueError(f"{key}: only for source {source} (source is {self.source})")
        if self.init_args and self.source != "python":
            raise ValueError(f"init_args: only for source python (source is {self.source})")
        if isinstance(self.val_size, float) and not self.val_size < 1:
            raise ValueError("val_size: a fraction must be below 1 (or give a whole number of samples)")
        if isinstance(self.test_size, float) and not self.test_size < 1:
            raise ValueError("test_size: a fraction must be below 1 (or give a whole number of samples)")
        if self.fold is not None and (self.folds is None or self.fold >= self.folds):
            raise ValueError(f"fold: {self.fold} is not one of the {self.folds or 0} folds (sweeplab sets it)")
        return self


class InitFromConfig(_Frozen):
    """Weights to start from, and the names to keep fresh (a new head)."""

    uri: str = Field(description="runs:/RUN_ID, models:/NAME@ALIAS, models:/NAME/VERSION, or a .pt state_dict file")
    exclude: Globs = Field(default_factory=list, description="glob(s) of state_dict keys left as initialised")


class ModelConfig(_Frozen):
    """The built-in MLP (in_features -> hidden... -> out_features, out_features from the task), or the user's own
    nn.Module by import path: `class_path: my_nets.SmallCNN` + `init_args` (LightningCLI's convention). Constructor
    parameters the data decides (in_features, in_channels, input_shape, n_classes, num_classes, out_features,
    n_outputs) are filled from the data when init_args leaves them out (plugins.DATA_ARGS)."""

    hidden: Union[int, list[int]] = Field(16, description="the built-in MLP's hidden sizes: one layer, or a list")
    activation: Activation = Field("relu", description="the built-in MLP's activation")
    dropout: float = Field(0.0, ge=0, lt=1, description="the built-in MLP's dropout after each hidden layer")
    class_path: ModelPath = Field(None, description="module.Class of the user's nn.Module")
    init_args: InitArgs = Field(default_factory=dict, description="keyword arguments of the class")
    init_from: Union[str, InitFromConfig, None] = Field(
        None,
        description=(
            "start from other weights: runs:/RUN_ID (its best state), models:/NAME@ALIAS or models:/NAME/VERSION, or "
            "a local .pt state_dict; or {uri, exclude: [glob]} to keep fresh weights for some names (a new head)"
        ),
    )

    @property
    def init_source(self) -> InitFromConfig | None:
        if self.init_from is None or isinstance(self.init_from, InitFromConfig):
            return self.init_from
        return InitFromConfig(uri=self.init_from)

    @model_validator(mode="after")
    def _one_model(self) -> "ModelConfig":
        if self.class_path is None:
            if self.init_args:
                raise ValueError("init_args: needs class_path (the built-in MLP takes hidden, activation, dropout)")
            return self
        mlp = sorted({"hidden", "activation", "dropout"} & self.model_fields_set)
        if mlp:
            raise ValueError(f"{mlp[0]}: a field of the built-in MLP; with class_path give it in init_args")
        return self

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: int | list[int]) -> int | list[int]:
        sizes = [value] if isinstance(value, int) else value
        if not sizes or any(size <= 0 for size in sizes):
            raise ValueError("hidden sizes must be positive integers")
        if any(size > MAX_HIDDEN for size in sizes) or len(sizes) > 64:
            raise ValueError(f"at most 64 hidden layers of at most {MAX_HIDDEN} units")
        widths = [2, *sizes, 1]
        if sum(a * b for a, b in zip(widths, widths[1:])) > MAX_PARAMETERS:
            raise ValueError(f"more than {MAX_PARAMETERS:,} weights")
        return value

    @property
    def hidden_sizes(self) -> list[int]:
        return [self.hidden] if isinstance(self.hidden, int) else list(self.hidden)


def _short_or_import_path(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) and not re.fullmatch(IMPORT_PATH, value):
        raise ValueError("a class of torch's by its name (CosineAnnealingLR) or an import path (module.Name)")
    return value


class ClassSpec(_Frozen):
    """A class (or a function that builds one) named as LightningCLI names it: `class_path` (torch's own by short
    name: `CosineAnnealingLR`, `CrossEntropyLoss`, `NAdam`; the user's by import path) and its `init_args`."""

    class_path: Annotated[str, AfterValidator(_short_or_import_path)]
    init_args: InitArgs = Field(default_factory=dict)


class SchedulerConfig(ClassSpec):
    """A learning-rate schedule: any torch.optim.lr_scheduler class or the user's class or function that takes the
    optimizer first. Stepped after each optimizer step (`interval: step`) or after each epoch, as torch's own loop
    steps it; ReduceLROnPlateau is told `monitor` (default: the objective's metric) after each validation."""

    interval: Literal["epoch", "step"] = "epoch"
    monitor: str | None = None


class EarlyStoppingConfig(_Frozen):
    """Stop after `patience` epochs in a row whose objective does not beat the best by more than `min_delta`
    (Keras' and Lightning's EarlyStopping). The trial completes; its best epoch is its best as always."""

    patience: int = Field(gt=0)
    min_delta: float = Field(0.0, ge=0)


class MetricSpec(ClassSpec):
    """A validation metric of the user's: a function `(outputs, targets, **init_args) -> number` over the whole
    validation split (the model's outputs and the labels, as the loss gets them), by import path, its name and its
    direction declared. Logged per epoch and usable as the objective; its trials train on the reference loop."""

    name: str = Field(pattern=r"^val_[a-z0-9_]+$")
    direction: Literal["minimize", "maximize"]

    @field_validator("class_path")
    @classmethod
    def _import_path_only(cls, value: str) -> str:
        if not re.fullmatch(IMPORT_PATH, value):
            raise ValueError("an import path, module.function (the module beside the experiment file or on sys.path)")
        return value


Globs = Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


class ParamGroupConfig(_Frozen):
    """A parameter group of the optimizer (torch's param_groups): the parameters whose names (`named_parameters()`)
    match one of the `params` globs (fnmatch: `features.*`), the first group that matches winning; the rest train
    in the default group. Its lr is `train.lr * lr_scale`, and schedulers act on every group as torch's do."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="logged as lr_<name>")
    params: Globs = Field(description="glob(s) over the model's parameter names")
    lr_scale: float = Field(1.0, gt=0, description="the group's lr is train.lr times this")
    weight_decay: float | None = Field(None, ge=0, description="default: train.weight_decay (or the optimizer's own)")


class FreezeConfig(_Frozen):
    """Parameters trained not at all for the first `epochs` (Lightning's BaseFinetuning): no gradient, no update, no
    weight decay, no optimizer state; a BatchNorm whose parameters are all frozen keeps its running statistics."""

    params: Globs = Field(description="glob(s) over the model's parameter names")
    epochs: int = Field(gt=0, le=MAX_EPOCHS, description="frozen for epochs 1..N, trained from N + 1")


class TrainConfig(_Frozen):
    optimizer: Union[OptimizerName, ClassSpec] = Field(
        "Adam", description="a name, or any torch.optim class (or yours) by class_path with init_args"
    )
    lr: float = Field(0.03, gt=0, description="the learning rate (of the default parameter group)")
    weight_decay: float | None = Field(None, ge=0, description="default: the optimizer's own (AdamW 0.01, others 0)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD and RMSprop only")
    epochs: int = Field(80, gt=0, le=MAX_EPOCHS, description="epochs at most (early stopping may end sooner)")
    batch_size: int = Field(32, gt=0, le=MAX_SAMPLES, description="training batch size")
    val_batch_size: int | None = Field(
        None, gt=0, description="default: the whole validation set (batch_size for a Dataset read lazily)"
    )
    shuffle: bool = Field(True, description="shuffle the training split each epoch")
    shuffle_seed: int | None = Field(7, **SEED, description="the train loader's generator seed (none: the global RNG)")
    loss: Union[Literal["mse", "l1", "huber", "smooth_l1", "bce", "cross_entropy"], ClassSpec] = Field(
        "mse", description="a name (regression: mse, l1, huber, smooth_l1; the task's own for a classifier) or a class"
    )
    loader: Literal["tensor", "dataloader"] = Field(
        "tensor", description="tensor: batch in-memory tensors by indexing (same numbers, ~5x faster)"
    )
    scheduler: SchedulerConfig | None = Field(
        None, description="a learning-rate schedule (any torch scheduler, or yours)"
    )
    early_stopping: EarlyStoppingConfig | None = Field(None, description="patience and min_delta on the objective")
    clip_grad_norm: float | None = Field(None, gt=0, description="max norm of all gradients (clip_grad_norm_)")
    clip_grad_value: float | None = Field(None, gt=0, description="clamp every gradient to +-value")
    accumulate_grad_batches: int = Field(1, ge=1, le=MAX_SAMPLES, description="batches whose gradients one step takes")
    precision: Literal["32", "bf16", "16"] = Field("32", description="bf16: autocast; 16: CUDA only, with a GradScaler")
    param_groups: list[ParamGroupConfig] = Field(
        default_factory=list,
        description="optimizer parameter groups by name globs, each its own lr_scale (lr_<name> logged per epoch)",
    )
    freeze: list[FreezeConfig] = Field(
        default_factory=list, description="parameters by name globs kept frozen for their first epochs (fine-tuning)"
    )

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_spellings(cls, value: Any) -> Any:
        """32 and 16 as YAML numbers, and Lightning's names for the same: 32-true, 16-mixed, bf16-mixed (autocast,
        float32 weights, as here). Its 16-true and bf16-true (half-precision weights) are another thing: refused."""
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (32, 16):
            return str(int(value))
        if value in ("16-true", "bf16-true"):
            raise ValueError(
                f"{value} trains half-precision weights; sweeplab autocasts over float32 weights: give bf16 "
                "(bf16-mixed) or 16 (16-mixed)"
            )
        return {"32-true": "32", "16-mixed": "16", "bf16-mixed": "bf16"}.get(value, value)

    @field_validator("optimizer", "loss", mode="before")
    @classmethod
    def _class_by_name(cls, value: Any, info) -> Any:
        """`optimizer: NAdam` or `loss: HuberLoss`: a torch class by its short name, as {class_path: NAdam}."""
        names = ("Adam", "AdamW", "SGD", "RMSprop") if info.field_name == "optimizer" else tuple(LOSS_NAMES)
        if isinstance(value, str) and value not in names:
            return {"class_path": value}
        return value

    @model_validator(mode="after")
    def _one_clipping(self) -> "TrainConfig":
        if self.clip_grad_norm is not None and self.clip_grad_value is not None:
            raise ValueError("clip_grad_norm and clip_grad_value: give one of them, not both")
        if isinstance(self.optimizer, ClassSpec) and self.momentum:
            raise ValueError("momentum: with optimizer.class_path, give momentum in optimizer.init_args")
        names = [group.name for group in self.param_groups]
        if len(set(names)) < len(names) or "default" in names:
            raise ValueError("param_groups: each group needs a name of its own (and `default` is the rest's)")
        return self


class ExperimentConfig(_Frozen):
    """One training run, fully described."""

    # the name becomes an MLflow experiment and a folder of artifacts: a plain name, never a path
    name: str = Field(
        "experiment",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$",
        description="the MLflow experiment of `sweeplab run`",
    )
    task: Task = Field("regression", description="what the model predicts: its loss, metrics and outputs")
    seed: int = Field(42, **SEED, description="torch.manual_seed before the data and the model are drawn")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    predict_x: list[list[float]] = Field(
        None,
        description="points to predict after training (default: the seed's three for its synthetic data, "
        "none for other data)",
    )
    print_every: int = Field(20, gt=0, description="sweeplab run: print a line every this many epochs")
    metrics: list[Union[str, MetricSpec]] = Field(
        default_factory=list,
        description="validation metrics logged per epoch beyond the task's defaults: names, or your own functions",
    )
    # where `class_path` modules are looked for first: the experiment file's folder (set by build_experiment; not
    # a setting, so not dumped, compared or logged)
    _code_dir: str | None = PrivateAttr(None)

    @property
    def code_dir(self) -> str | None:
        return self._code_dir

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_points(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("predict_x") is None:
            data = raw.get("data")
            source = data.get("source", "synthetic") if isinstance(data, dict) else getattr(data, "source", "synthetic")
            raw = {**raw, "predict_x": SEED_POINTS if source == "synthetic" else []}
        if (
            isinstance(raw, dict)
            and "task" not in raw
            and isinstance(raw.get("data"), dict)
            and raw["data"].get("source") == "sklearn"
            and raw["data"].get("name") in SKLEARN_TASKS
        ):
            raw = {**raw, "task": SKLEARN_TASKS[raw["data"]["name"]]}  # digits is a classification set
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if self.data.source == "synthetic":
            bad = [i for i, row in enumerate(self.predict_x) if len(row) != 2]
            if bad:
                raise ValueError(
                    f"predict_x: row {bad[0]} has {len(self.predict_x[bad[0]])} values, the data has 2 features"
                )
        own = {m.name: m for m in self.metrics if isinstance(m, MetricSpec)}
        clash = sorted(set(own) & set(DIRECTIONS))
        if clash:
            raise ValueError(f"metrics: {clash[0]} is a built-in metric's name; give yours another")
        if self.objective.metric in own:  # the user's metric: its declared direction
            declared = own[self.objective.metric].direction
            if self.objective.direction is None:
                object.__setattr__(self.objective, "direction", declared)
            elif self.objective.direction != declared:
                raise ValueError(
                    f"objective.direction: {self.objective.direction} contradicts {self.objective.metric}, "
                    f"declared {declared} in metrics"
                )
        elif self.objective.metric not in METRICS[self.task]:
            raise ValueError(
                f"objective.metric: {self.objective.metric!r} is not logged for task {self.task}; "
                f"choose one of {', '.join([*METRICS[self.task], *own])}"
            )
        unknown = [name for name in self.metrics if isinstance(name, str) and name not in METRICS[self.task]]
        if unknown:
            raise ValueError(
                f"metrics: {unknown[0]!r} is not a metric of task {self.task}; choose from {', '.join(METRICS[self.task])}"
            )
        loss = self.train.loss
        if isinstance(loss, str) and loss != "mse" and LOSS_NAMES[loss] != self.task:
            own = "mse, l1, huber or smooth_l1" if self.task == "regression" else LOSS_NAMES_OF[self.task]
            raise ValueError(f"train.loss: {loss} is a {LOSS_NAMES[loss]} loss; task {self.task} takes {own}")
        schedule = self.train.scheduler
        if (
            schedule is not None
            and schedule.monitor is not None
            and schedule.monitor not in METRICS[self.task]
            and schedule.monitor not in own
        ):
            raise ValueError(
                f"train.scheduler.monitor: {schedule.monitor!r} is not logged for task {self.task}; "
                f"choose one of {', '.join(METRICS[self.task])}"
            )
        if self.data.classes is not None and self.task == "regression":
            raise ValueError("data.classes: task regression has no classes to name")
        if self.data.stratify and self.task == "regression":
            raise ValueError("data.stratify: task regression has no classes to keep in proportion")
        if (
            self.data.source == "sklearn"
            and SKLEARN_TASKS[self.data.name] == "regression"
            and self.task != "regression"
        ):
            raise ValueError(f"task: {self.data.name} has a continuous target; its task is regression")
        return self


# Flat override keys (`optimizer=SGD lr=0.05`) and the field each one sets. Any dotted path works too.
ALIASES: dict[str, str] = {
    "optimizer": "train.optimizer",
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "momentum": "train.momentum",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "val_batch_size": "train.val_batch_size",
    "loader": "train.loader",
    "loss": "train.loss",
    "scheduler": "train.scheduler",
    "early_stopping": "train.early_stopping",
    "patience": "train.early_stopping.patience",
    "clip_grad_norm": "train.clip_grad_norm",
    "clip_grad_value": "train.clip_grad_value",
    "accumulate_grad_batches": "train.accumulate_grad_batches",
    "precision": "train.precision",
    "hidden": "model.hidden",
    "activation": "model.activation",
    "dropout": "model.dropout",
    "noise": "data.noise",
    "n_samples": "data.n_samples",
    "n_classes": "data.n_classes",
    "val_size": "data.val_size",
    "split_seed": "data.split_seed",
    "shuffle_seed": "train.shuffle_seed",
    "train_fraction": "data.train_fraction",
    "collate_fn": "data.collate_fn",
    "num_workers": "data.num_workers",
    "metric": "objective.metric",
    "direction": "objective.direction",
}
TOP_LEVEL = {"name", "task", "seed", "device", "data", "model", "train", "objective", "predict_x", "print_every"}


def resolve_key(key: str, raw: dict[str, Any]) -> str:
    """The dotted field a key sets: an alias (`lr` -> train.lr), a dotted path as given, or a flat name of the
    user's init_args (`channels` -> model.init_args.channels) where the model (or the data loader) has a
    class_path and exactly one of them names it. A name in both init_args is ambiguous: give the dotted path."""
    model = raw.get("model") if isinstance(raw, dict) else None
    user_model = isinstance(model, dict) and bool(model.get("class_path"))
    if key in ALIASES and not (user_model and ALIASES[key].startswith("model.")):
        return ALIASES[key]  # (with a class_path, `dropout` is the user's own argument)
    if "." in key or key in TOP_LEVEL:
        return key
    owners = []
    for part in ("model", "data"):
        node = raw.get(part) if isinstance(raw, dict) else None
        if isinstance(node, dict) and node.get("class_path"):
            args = node.get("init_args") if isinstance(node.get("init_args"), dict) else {}
            owners.append((part, key in args))
    named = [part for part, has in owners if has]
    if len(named) > 1:
        raise ConfigError(
            f"{key}: both model.init_args and data.init_args have it; give model.init_args.{key} or "
            f"data.init_args.{key}"
        )
    if named:
        return f"{named[0]}.init_args.{key}"
    if owners and owners[0][0] == "model":  # a constructor argument left at its default in the file
        return f"model.init_args.{key}"
    return key


def parse_overrides(pairs: list[str], source: str = "command line") -> dict[str, Any]:
    """`key=value` strings -> {dotted.key: value}; values are parsed as YAML scalars (`0.05`, `true`, `[8, 8]`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override {pair!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw (nested) dict with each dotted or flat key set."""
    result = _deep_copy(raw)
    for key, value in overrides.items():
        path = resolve_key(key, result).split(".")
        node = result
        for part in path[:-1]:
            child = _item(node, part) if isinstance(node, list) else node.get(part)
            if not isinstance(child, (dict, list)):
                if isinstance(node, list):
                    raise ConfigError(f"{key}: no item {part!r} in the list it names")
                child = {}
                node[part] = child
            node = child
        if isinstance(node, list):
            index = node.index(_item(node, path[-1]))
            node[index] = value
        else:
            node[path[-1]] = value
    return result


def _item(items: list, part: str):
    """A list's item by its index (`train.freeze.0.epochs`) or by its `name` (`train.param_groups.head.lr_scale`)."""
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    return None


def merge(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with `changes` merged in, section by section: a nested map changes only the keys it names."""
    result = _deep_copy(raw)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = _deep_copy(value)
    return result


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def format_validation_error(source: str, error: ValidationError) -> str:
    """The first problem, as `source: field.path: message (got value)` on one line. Of a union's branches (a name or
    a class), the one the input took: a map is a class, so its error is about the class's fields, not that it is
    not one of the names."""
    errors = error.errors()
    first = errors[0]
    if len(errors) > 1 and first["type"] == "literal_error" and isinstance(first.get("input"), dict):
        first = next((e for e in errors[1:] if e["loc"][: len(first["loc"]) - 1] == first["loc"][:-1]), first)
        errors = [first]
    branch = re.compile(r"^(function-after|literal\[|[A-Z][A-Za-z]+$)")
    loc = ".".join(str(part) for part in first["loc"] if not branch.match(str(part)))
    message = first["msg"].replace("Value error, ", "")
    got = first.get("input")
    detail = ""
    if first["type"] not in ("missing", "model_type") and not isinstance(got, (dict, BaseModel)):
        detail = f" (got {got!r})"
    where = f"{source}: {loc}: " if loc else f"{source}: "
    more = len(errors) - 1
    suffix = f" [and {more} more]" if more else ""
    return f"{where}{message}{detail}{suffix}"


MAX_FILE_BYTES = 1_000_000  # a sweep or experiment file is a page of YAML; a 50 MB one is a mistake


class _TooManyAliases(Exception):
    pass


MAX_EXPANDED_NODES = 100_000  # a page of YAML is a few hundred; a "billion laughs" file is billions, once expanded


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice is an error (YAML keeps the last one silently), and a file
    whose aliases (*name) would expand past MAX_EXPANDED_NODES is refused before anything expands them: 1 KB of
    nested aliases is gigabytes once the config is copied and validated."""

    def get_single_node(self):
        node = super().get_single_node()
        sizes: dict[int, int] = {}

        def size(item) -> int:  # nodes once every alias is expanded; each distinct node is counted once
            if id(item) not in sizes:
                sizes[id(item)] = 1
                children = item.value if isinstance(item.value, list) else []
                flat = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
                sizes[id(item)] = 1 + sum(size(child) for child in flat)
            return sizes[id(item)]

        if node is not None and size(node) > MAX_EXPANDED_NODES:
            raise _TooManyAliases()
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(
                f"{path}: {size / 1e6:.1f} MB; a sweep or experiment file is at most "
                f"{MAX_FILE_BYTES // 1_000_000} MB of YAML"
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    except OSError as exc:  # a symlink loop, a folder, no permission
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{where} not valid YAML: {getattr(exc, 'problem', None) or 'cannot be parsed'}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a sweep or experiment file") from None
    except _TooManyAliases:
        raise ConfigError(
            f"{path}: its aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values; a sweep "
            "or experiment file is a page of YAML"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    where = _nul_byte(raw)
    if where is not None:  # no path, name or URI can hold one ("embedded null byte" deep inside otherwise)
        raise ConfigError(f"{path}: {where or 'a key'}: holds a NUL byte (\\0)")
    return raw


def _nul_byte(value: Any, where: str = "") -> str | None:
    """The dotted key of the first string (or key) holding a NUL byte, or None."""
    if isinstance(value, str):
        return where if "\0" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and "\0" in key:
            return where
        found = _nul_byte(item, here)
        if found is not None:
            return found
    return None


def build_experiment(raw: dict[str, Any], source: str, base_dir: Path | None = None) -> ExperimentConfig:
    """Validate a raw dict; csv paths are made relative to base_dir (the experiment file's folder)."""
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    if config.data.source == "csv" and base_dir is not None:
        path = Path(config.data.path)  # type: ignore[arg-type]
        if not path.is_absolute():
            path = base_dir / path
        data = config.data.model_copy(update={"path": str(path)})
        config = config.model_copy(update={"data": data})
    if base_dir is not None:
        config._code_dir = str(Path(base_dir).resolve())
    return config


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment file."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or {})
    return build_experiment(raw, str(path), base_dir=path.parent)


def logged_metrics(config: ExperimentConfig) -> tuple[str, ...]:
    """The validation metrics a run computes and logs per epoch (besides val_loss): its task's defaults, those it
    names in `metrics`, its objective's and its schedule's monitor."""
    names = [m for m in config.metrics if isinstance(m, str)]
    named = [*DEFAULT_METRICS[config.task], *names, config.objective.metric]
    schedule = config.train.scheduler
    if schedule is not None and schedule.monitor:
        named.append(schedule.monitor)
    return tuple(name for name in METRICS[config.task] if name in named and name != "val_loss")


def own_metrics(config: ExperimentConfig) -> list["MetricSpec"]:
    """The user's metrics of a config (its `metrics` given by class_path)."""
    return [m for m in config.metrics if isinstance(m, MetricSpec)]


def flat_fields(config: ExperimentConfig) -> dict[str, Any]:
    """Every field of a config, defaults included, as {dotted key (`train.lr`): JSON-able value}."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):  # param_groups by name, freeze by index (as apply_overrides finds them)
                walk(f"{prefix}{item.get('name', i)}.", item)
        else:
            flat[prefix[:-1]] = value

    walk("", config.model_dump(mode="json"))
    return flat


def override_key(dotted: str) -> str:
    """The flat override key people type for a dotted field (`epochs` for train.epochs), else the dotted one."""
    return next((flat for flat, path in ALIASES.items() if path == dotted), dotted)


def value_at(config: ExperimentConfig, key: str) -> Any:
    """A config's value for an override key (`lr`) or dotted path (`train.lr`)."""
    node: Any = config.model_dump()
    for part in resolve_key(key, node).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
