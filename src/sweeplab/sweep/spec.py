"""The sweep file's schema: a search over experiments (SweepSpec, ParamSpec) and the Sweep it loads into.

A sweep file names a base experiment (config.ExperimentConfig), a search space, the conditions compared, a
sampler, a pruner and a budget; `load_sweep` validates all of it, and builds the trials at the space's edges
(`probes`) once, so a bad sweep fails before any study or run exists. What the probes are then checked against
(the engine, the device, the data) is probes.py; Optuna's side of the space is search.py.

Why one module of ~430 lines: the sweep file is one document (its reference page is generated from these
classes), and `load_sweep` builds what every later step reads from it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, ValidationError, model_validator

from sweeplab.config import (
    ALIASES,
    ConfigError,
    ExperimentConfig,
    ObjectiveConfig,
    _Frozen,
    apply_overrides,
    build_experiment,
    flat_fields,
    format_validation_error,
    merge,
    read_yaml,
    resolve_key,
    value_at,
)


class ParamSpec(_Frozen):
    """One searched parameter. `choices` makes it categorical; `low`/`high` make it int or float (`log`, `step`);
    `by` + `cases` make it conditional on another parameter (each optimizer its own learning-rate range)."""

    choices: list[Any] | None = None
    low: Union[int, float, None] = None
    high: Union[int, float, None] = None
    log: bool = False
    step: Union[int, float, None] = Field(None, gt=0)
    type: Literal["categorical", "int", "float"] | None = None
    by: str | None = None
    cases: dict[str, "ParamSpec"] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ParamSpec":
        if self.by is not None or self.cases is not None:
            if self.by is None or not self.cases:
                raise ValueError("a conditional parameter needs both `by` and `cases`")
            if self.choices is not None or self.low is not None or self.high is not None:
                raise ValueError("a conditional parameter gives its choices or range per case, under `cases`")
            return self
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices: give at least one value")
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give choices, or low and high")
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def kind(self) -> str:
        if self.cases is not None:
            return "conditional"
        if self.choices is not None:
            return "categorical"
        if self.type is not None:
            return self.type
        ints = all(isinstance(v, int) for v in (self.low, self.high)) and isinstance(self.step, (int, type(None)))
        return "int" if ints else "float"


class SamplerSpec(_Frozen):
    type: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="Optuna's sampler: TPE, random, or every combination of `choices` (grid)"
    )
    seed: int | None = Field(0, ge=0, lt=2**32, description="numpy's RandomState takes 0 .. 2**32 - 1")
    n_startup_trials: int = Field(10, ge=0, description="tpe: random trials before the model kicks in")
    batch: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=(
            "tpe: trials asked at once in each round after the start-up (constant liar: the running ones count as "
            "the worst), so they stack; default: sweep.batching.TPE_BATCH, measured by benchmarks/bench_tpe_batch.py"
        ),
    )


class PrunerSpec(_Frozen):
    type: Literal["none", "median", "successive_halving", "hyperband"] = Field(
        "none",
        description="Optuna's pruner, told the objective every `report_every` epochs; successive_halving and "
        "hyperband also prune inside a stacked group (its members leave the stack)",
    )
    n_startup_trials: int = Field(5, ge=0, description="median: trials that are never pruned")
    n_warmup_steps: int = Field(10, ge=0, description="median: epochs before a trial can be pruned")
    min_resource: int = Field(5, ge=1, description="successive_halving, hyperband: epochs the shortest rung trains")
    reduction_factor: int = Field(
        3, ge=2, description="successive_halving, hyperband: the share of trials each rung keeps is 1 / this"
    )
    report_every: int | None = Field(
        None,
        gt=0,
        description="epochs between pruning checks (default: epochs // 20; successive_halving, hyperband: at the rungs only)",
    )


class ConfirmSpec(_Frozen):
    """After the search, each condition's `top` configurations trained again with `seeds` more seeds."""

    top: int = Field(3, ge=1, description="the best configurations of each condition trained again")
    seeds: int = Field(4, ge=1, description="more seeds for each: seed+1 ... seed+seeds (the data split keeps its own)")


class SweepSpec(_Frozen):
    """A search: a base experiment, fixed overrides, a search space, a sampler, a pruner and a budget."""

    # the study names an MLflow experiment, its artifact folder and a registered model: a plain, bounded name
    study: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="the Optuna study, the MLflow experiment and the registered model's name; re-running resumes it",
    )
    experiment: str | None = Field(None, description="base experiment file, relative to the sweep file")
    base: dict[str, Any] = Field(
        default_factory=dict, description="inline base experiment (or changes to `experiment`)"
    )
    space: dict[str, ParamSpec] = Field(
        min_length=1, description="the searched keys (any experiment key, by its dotted path or short name)"
    )
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    n_trials: int = Field(40, gt=0, description="finished trials in total, across runs and workers")
    workers: int = Field(
        1, gt=0, description="processes on this machine working on the study (more: `sweeplab worker`)"
    )
    repeats: int = Field(1, gt=0, description="grid only: seeds per configuration (seed, seed+1, ...)")
    engine: Literal["auto", "reference", "vectorized"] = Field(
        "auto", description=("auto: vectorized when every trial of the sweep is one it supports, else reference")
    )
    batch_trials: int = Field(256, gt=0, description="vectorized engine: trials trained together at most")
    conditions: dict[str, list[Any]] = Field(
        default_factory=dict,
        description=(
            "factors compared, not optimised (noise: the data): each combination of values gets its own search (its "
            "own Optuna study) and an equal share of n_trials; results are compared within a condition"
        ),
    )
    condition: dict[str, Any] = Field(
        default_factory=dict, description="set by sweeplab: the one condition a part of the sweep runs"
    )
    confirm: ConfirmSpec | None = Field(
        None,
        description=(
            "after the search, the `top` configurations of each condition trained again with `seeds` more seeds "
            "(stacked); the champion is the best mean over seeds, and the report says whether it beats seed noise"
        ),
    )
    phase: Literal["search", "confirm"] = Field(
        "search", description="set by sweeplab: the search, or the confirmation's repeats (their own Optuna study)"
    )
    objective: ObjectiveConfig | None = Field(
        None, description="what trials are judged by, where W&B and Optuna users give it: wins over the experiment's"
    )

    @property
    def optuna_study(self) -> str:
        """The Optuna study of this part: `study` itself, or `study[noise=0.3]` for one condition; its confirmation's
        repeats are `study:confirm` (a name no sweep file can give: `:` is not allowed in `study`)."""
        name = self.study + "".join(f"[{key}={value}]" for key, value in self.condition.items())
        return name + (":confirm" if self.phase == "confirm" else "")

    @model_validator(mode="after")
    def _conditions_exist(self) -> "SweepSpec":
        for name, param in self.space.items():
            if param.by is not None:
                parent = self.space.get(param.by)
                if parent is None or parent.kind != "categorical":
                    raise ValueError(f"space.{name}.by: {param.by!r} must be a categorical parameter of the space")
                unknown = sorted(set(param.cases or {}) - {str(c) for c in parent.choices or []})
                missing = sorted({str(c) for c in parent.choices or []} - set(param.cases or {}))
                if unknown or missing:
                    raise ValueError(
                        f"space.{name}.cases: must have one case per {param.by} choice"
                        + (f"; unknown {unknown}" if unknown else "")
                        + (f"; missing {missing}" if missing else "")
                    )
        for name, values in self.conditions.items():
            if not values or len({repr(v) for v in values}) != len(values):
                raise ValueError(f"conditions.{name}: give two or more distinct values")
            if name in self.space or ALIASES.get(name, name) in {ALIASES.get(k, k) for k in self.space}:
                raise ValueError(f"conditions.{name}: also in the space; a factor is either compared or searched")
        if self.conditions and self.n_trials < math.prod(len(v) for v in self.conditions.values()):
            raise ValueError("n_trials: fewer than the conditions; each condition needs at least one trial")
        if self.repeats > 1 and self.sampler.type != "grid":
            raise ValueError(
                "repeats: needs sampler grid (every configuration with each seed); with tpe or "
                "random, put seed in the space instead"
            )
        if self.repeats > 1 and "seed" in self.space:
            raise ValueError("repeats: seed is already in the space")
        if self.confirm is not None and self.phase == "search" and ("seed" in self.space or self.repeats > 1):
            raise ValueError(
                "confirm: repeats the top configurations over seeds itself; take seed out of the space (and repeats)"
            )
        if self.sampler.type == "grid":
            for name, param in self.space.items():
                cases = param.cases.values() if param.cases else [param]
                for case in cases:
                    if case.kind != "categorical":
                        raise ValueError(f"space.{name}: the grid sampler needs choices for every parameter")
                if param.cases and any(len(case.choices or []) != 1 for case in cases):
                    raise ValueError(
                        f"space.{name}: with the grid sampler, give one value per case "
                        "(a conditional grid would repeat the same configuration)"
                    )
        return self


# sweep-level override keys; any other key=value given to `sweeplab sweep` changes the base experiment
SWEEP_KEYS = {"study", "n_trials", "workers", "repeats", "engine", "batch_trials", "sampler", "pruner", "confirm"}


def split_sweep_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sweep-level, base-experiment) overrides: `n_trials=10 sampler=random` vs `epochs=20`."""
    sweep, experiment = {}, {}
    for key, value in overrides.items():
        head = key.split(".")[0]
        if head in SWEEP_KEYS:
            sweep[f"{key}.type" if key in ("sampler", "pruner") else key] = value
        else:
            experiment[key] = value
    return sweep, experiment


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the spec, the raw base experiment it varies, and where it came from."""

    spec: SweepSpec
    base: dict[str, Any]
    source: str
    base_dir: Path
    own_setting: bool = True  # a part whose condition is the base experiment's own (its champion is `champion`)
    # (field, config) of the trials at the space's edges, each built and validated once by load_sweep, the base
    # experiment first; what probes.settle checks the engine, the device and the data against
    probes: tuple = dataclasses.field(default=(), repr=False, compare=False)

    def field_of(self, key: str) -> str:
        """The dotted field a space or condition key sets (`lr` -> train.lr, `channels` -> model.init_args.channels)."""
        return resolve_key(key, self.base)

    def config_for(self, params: dict[str, Any]) -> ExperimentConfig:
        """The experiment for one point of the space (params keyed as in `space`)."""
        return build_experiment(apply_overrides(self.base, params), self.source, self.base_dir)

    @functools.cached_property
    def base_config(self) -> ExperimentConfig:
        """The base experiment (no searched value applied), built once: its objective, epochs and settings are the
        sweep's."""
        if self.probes and self.probes[0][0] == "" and not self.spec.condition:
            return self.probes[0][1]  # load_sweep built it first among the probes
        return self.config_for({})

    def parts(self) -> list["Sweep"]:
        """The sweep as it runs: one part per condition (its values fixed in the base experiment, its own study,
        an equal share of n_trials, the first parts one more when it does not divide), or itself. Made once."""
        return self._parts

    @functools.cached_property
    def _parts(self) -> list["Sweep"]:
        conditions = self.spec.conditions
        if not conditions or self.spec.condition:
            return [self]
        combos = [dict(zip(conditions, values)) for values in itertools.product(*conditions.values())]
        share, extra = divmod(self.spec.n_trials, len(combos))
        own = {key: value_at(self.base_config, key) for key in conditions}
        mine = combos.index(own) if own in combos else 0  # none is the base's own: the first stands for it
        return [
            Sweep(
                self.spec.model_copy(update={"condition": combo, "n_trials": share + (i < extra)}),
                apply_overrides(self.base, combo),
                self.source,
                self.base_dir,
                own_setting=i == mine,
            )
            for i, combo in enumerate(combos)
        ]


# Settings that do not change what a trial finds: a study resumed with other values of these goes on.
NOT_RESULTS = ("name", "device", "predict_x", "print_every", "train.loader", "metrics")


def result_settings(part: Sweep) -> dict[str, Any]:
    """What a trial's result depends on beyond its searched values: every field of the part's base experiment
    (task, data, epochs, loss, the model, the seed...) as {dotted key: value}, less the searched keys and
    NOT_RESULTS. A study records it when created; a resume that gives other values is refused (`search`)."""
    searched = {resolve_key(key, part.base) for key in part.spec.space}
    flat = flat_fields(part.base_config)
    return {
        key: value
        for key, value in flat.items()
        if key not in searched and key not in NOT_RESULTS and not key.startswith(tuple(f"{k}." for k in searched))
    }


def load_sweep(path: str | Path | dict, overrides: dict[str, Any] | None = None, folder: Path | None = None) -> Sweep:
    """Read and validate a sweep file, its base experiment and every parameter of its space, so that a bad
    sweep fails here, before any study or run exists. `path` may be the sweep file's content as a dict (from
    Python: sweeplab.sweep), whose `experiment` is a file (relative to `folder`, default the current folder) or
    the experiment itself as a dict; its messages then name `sweep` where they would name the file."""
    inline_experiment: dict[str, Any] = {}
    if isinstance(path, dict):
        raw = dict(path)
        if isinstance(raw.get("experiment"), dict):
            inline_experiment = raw.pop("experiment")
        path = Path(folder or Path.cwd()) / "sweep"
    else:
        path = Path(path)
        raw = read_yaml(path)
    sweep_overrides, experiment_overrides = split_sweep_overrides(overrides or {})
    raw = apply_overrides(raw, sweep_overrides)
    space = raw.get("space")
    if isinstance(space, dict):  # pinning a searched key on the command line takes it out of the space
        pinned = {k for k in experiment_overrides if k in space or ALIASES.get(k) in space}
        raw["space"] = {k: v for k, v in space.items() if k not in pinned and ALIASES.get(k, k) not in pinned}
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None
    base: dict[str, Any] = {}
    base_dir = path.parent
    if spec.experiment:
        try:
            experiment_path = (path.parent / spec.experiment).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            raise ConfigError(f"{path}: experiment: {spec.experiment} cannot be resolved (a symlink loop?)") from None
        if not experiment_path.is_file():
            raise ConfigError(f"{path}: experiment: no such file {spec.experiment}")
        base = read_yaml(experiment_path)
        base_dir = experiment_path.parent
    base = merge(
        merge(base, inline_experiment), spec.base
    )  # `base:` changes the experiment: `train: {epochs: 5}` keeps its lr
    if spec.objective is not None:  # the sweep's objective wins over its experiment's
        base = {**base, "objective": spec.objective.model_dump(exclude_none=True)}
    base = apply_overrides(base, experiment_overrides)
    if spec.repeats > 1:  # each configuration once per seed: seed becomes one more grid dimension
        first = int(base.get("seed", ExperimentConfig.model_fields["seed"].default))
        seeds = ParamSpec(choices=list(range(first, first + spec.repeats)))
        spec = spec.model_copy(update={"space": {**spec.space, "seed": seeds}})
    sweep = Sweep(spec, base, str(path), base_dir)
    _check_loss_not_judged_by_itself(sweep, path)
    for where, keys in (("space", spec.space), ("conditions", spec.conditions)):
        for key in keys:
            if sweep.field_of(key) in ("data.folds", "data.fold"):
                raise ConfigError(
                    f"{path}: {where}.{key}: the folds are how every trial is scored, not a setting to compare; "
                    "give data.folds in the experiment"
                )
    probes = []
    for field, point in probe_points(spec):  # every config is built (and so validated) once
        try:
            probes.append((field, sweep.config_for(point)))
        except ConfigError as exc:  # `FILE: train.lr: ...`, said of the field that led to it
            raise ConfigError(f"{path}: {field}: {str(exc).split(': ', 1)[1]}" if field else str(exc)) from None
    return dataclasses.replace(sweep, probes=tuple(probes))


def _check_loss_not_judged_by_itself(sweep: Sweep, path: Path) -> None:
    """A sweep that searches (or compares) the loss while its objective is that loss ranks MSE against MAE: refused
    in one line; another objective (val_mae) makes the losses comparable."""
    metric = (
        sweep.base.get("objective", {}).get("metric", "val_loss")
        if isinstance(sweep.base.get("objective"), dict)
        else "val_loss"
    )
    if metric != "val_loss":
        return
    for where, keys in (("space", sweep.spec.space), ("conditions", sweep.spec.conditions)):
        for key in keys:
            if sweep.field_of(key) == "train.loss" or sweep.field_of(key).startswith("train.loss."):
                raise ConfigError(
                    f"{path}: {where}.{key}: searching the loss while the objective is val_loss compares one loss's "
                    "values with another's; judge the trials by a metric (objective: {metric: val_mae}, say)"
                )


def probe_points(spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """The trials a sweep can ask for, at their edges, each with the field it comes from: the base experiment
    (""), each condition's values, and both ends of every parameter of the space (per case)."""
    return [
        ("", {}),
        *((f"conditions.{name}", {name: value}) for name, values in spec.conditions.items() for value in values),
        *(
            (f"space.{name}", probe)
            for name, param in spec.space.items()
            for probe in _probe_values(name, param, spec.space)
        ),
    ]


def _probe_values(name: str, param: ParamSpec, space: dict[str, ParamSpec]) -> list[dict[str, Any]]:
    """Points that exercise each end of a parameter's range (per case for a conditional one)."""
    if param.cases:
        parent = param.by
        return [
            {parent: _choice_value(space[parent], case), **probe}
            for case, sub in param.cases.items()
            for probe in _probe_values(name, sub, space)
        ]
    values = list(param.choices) if param.choices is not None else [param.low, param.high]
    if param.kind == "int":
        values = [int(v) for v in values]
    return [{name: v} for v in values]


def _choice_value(param: ParamSpec, case: str) -> Any:
    return next(c for c in param.choices or [] if str(c) == case)
