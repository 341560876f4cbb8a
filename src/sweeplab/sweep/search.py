"""Optuna's side of a sweep file: storage, study, sampler, pruner, and turning a trial into parameter values.

The search space is data (SweepSpec.space in spec.py); `suggest` is the only place that sees a `trial`, and only
the ledger (ledger.py) calls it. The driver that ties this to training and MLflow is driver.py.

Why one module of ~410 lines: everything of Optuna's a sweep sets up (storage with its retries, study,
sampler, pruner, the suggest that turns a trial into values) is here, beside no training code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from sweeplab.config import ConfigError, override_key
from sweeplab.stores import env_number, redact, refused, retry_lost_races, transient_errors, with_retries
from sweeplab.sweep.spec import ParamSpec, SweepSpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Trials that hold a place in the budget: finished, running, or queued to run again.
ALIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
# A worker records its running trial's heartbeat this often; one silent for the grace period is declared lost.
HEARTBEAT_INTERVAL_S = env_number("SWEEPLAB_HEARTBEAT_INTERVAL", 10, int, low=1)
GRACE_PERIOD_S = env_number("SWEEPLAB_GRACE_PERIOD", 30, int, low=1)


def optuna_name(name: str, case: str | None = None) -> str:
    """Optuna parameter name: each case of a conditional parameter is its own (`lr_Adam`, `lr_SGD`), so the
    sampler never mixes Adam's learning rates with SGD's."""
    return f"{name}_{case}" if case is not None else name


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ask the trial for a value of every parameter, in the file's order except that a condition's parent is
    asked before the parameter that depends on it; returns {override key: value}."""
    values: dict[str, Any] = {}

    def take(name: str) -> None:
        if name in values:
            return
        param, case = space[name], None
        if param.cases is not None:
            take(param.by)
            case = str(values[param.by])
            param = param.cases[case]
        values[name] = _suggest_one(trial, optuna_name(name, case), param)

    for name in space:
        take(name)
    return values


def values_of(params: dict[str, Any], space: dict[str, ParamSpec]) -> dict[str, Any]:
    """The inverse of `suggest`: a trial's Optuna parameters ({`lr_Adam`: ...}) as the sweep file names them."""
    values: dict[str, Any] = {}
    for name, param in sorted(space.items(), key=lambda item: item[1].cases is not None):  # parents first
        key = optuna_name(name, str(values.get(param.by))) if param.cases else name
        if key in params:
            values[name] = params[key]
    return values


def _suggest_one(trial: optuna.Trial, name: str, param: ParamSpec) -> Any:
    kind = param.kind
    if kind == "categorical":
        return trial.suggest_categorical(name, param.choices)
    if kind == "int":
        return trial.suggest_int(name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(name, float(param.low), float(param.high), step=param.step, log=param.log)


def grid_space(space: dict[str, ParamSpec]) -> dict[str, list[Any]]:
    """GridSampler's space: every categorical parameter; a conditional one contributes one fixed value per case
    (config validation made sure of that), so no two grid points are the same configuration."""
    grid: dict[str, list[Any]] = {}
    for name, param in space.items():
        if param.cases is not None:
            for case, sub in param.cases.items():
                grid[optuna_name(name, case)] = list(sub.choices or [])
        else:
            grid[name] = list(param.choices or [])
    return grid


def grid_size(space: dict[str, ParamSpec]) -> int:
    size = 1
    for param in space.values():
        if param.cases is None:
            size *= len(param.choices or [])
    return size


class BudgetGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its own stop: it calls `study.stop()` once the grid is used up, which only works
    inside `study.optimize`; with ask-and-tell the budget (capped at the grid's size) stops the workers."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


RESUME_SEED_STRIDE = 7919  # a prime, so a resumed worker's seed does not land on another worker's


def make_sampler(spec: SweepSpec, worker_index: int = 0, resumed_at: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded samplers; each worker gets its own seed (seed + index) or they would all propose the same
    points, and TPE uses the constant liar so parallel workers do not pile onto one region. A study resumed
    with `resumed_at` trials already in it gets another seed again: the same seed would replay the same random
    draws, proposing the points the first run already tried."""
    seed = None if spec.sampler.seed is None else spec.sampler.seed + worker_index + RESUME_SEED_STRIDE * resumed_at
    if spec.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler.type == "grid":
        return BudgetGridSampler(grid_space(spec.space), seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.sampler.n_startup_trials, multivariate=True, group=True, constant_liar=True
    )


def make_pruner(spec: SweepSpec, epochs: int) -> optuna.pruners.BasePruner:
    pruner = spec.pruner
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps
        )
    if pruner.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min(pruner.min_resource, epochs), reduction_factor=pruner.reduction_factor
        )
    if pruner.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min(pruner.min_resource, epochs), max_resource=epochs, reduction_factor=pruner.reduction_factor
        )
    return optuna.pruners.NopPruner()


def budget(spec: SweepSpec) -> int:
    """n_trials, capped at the number of grid points for the grid sampler."""
    return min(spec.n_trials, grid_size(spec.space)) if spec.sampler.type == "grid" else spec.n_trials


# --- storage ----------------------------------------------------------------------------------------------------

SCHEMA_RACE_ATTEMPTS = 5  # workers started together on a fresh database all create Optuna's tables at once


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB URLs (postgresql, mysql, sqlite) get heartbeats so a killed worker's trial is failed and retried;
    anything else is a journal file path."""
    if "://" in url:

        def connect() -> optuna.storages.RDBStorage:
            try:  # workers started together on a fresh database all create the tables: a loser finds them made
                return retry_lost_races(
                    optuna.storages.RDBStorage,
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                    attempts=SCHEMA_RACE_ATTEMPTS,
                )
            except Exception as exc:
                if isinstance(exc, transient_errors()) and not refused(exc):
                    raise  # a restart or an outage: with_retries tries again
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(
                    f"--storage {redact(url)}: cannot open the Optuna storage: {message.replace(url, redact(url))}"
                ) from None

        return with_retries(connect, what=f"the Optuna storage {redact(url)}")

    path = Path(url.removeprefix("journal:"))
    path.parent.mkdir(parents=True, exist_ok=True)
    repaired = repair_journal(path)
    if repaired:
        print(repaired, file=sys.stderr)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(
    spec: SweepSpec,
    storage: optuna.storages.BaseStorage,
    worker_index: int = 0,
    epochs: int = 80,
    direction: str = "minimize",
) -> optuna.Study:
    try:  # loaded first: create_study(load_if_exists=True) appends a refused create to a journal every time
        study = optuna.load_study(
            storage=storage,
            study_name=spec.optuna_study,
            sampler=make_sampler(spec, worker_index),
            pruner=make_pruner(spec, epochs),
        )
    except KeyError:
        study = optuna.create_study(
            storage=storage,
            study_name=spec.optuna_study,
            direction=direction,
            sampler=make_sampler(spec, worker_index),
            pruner=make_pruner(spec, epochs),
            load_if_exists=True,
        )
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = make_sampler(spec, worker_index, resumed_at=existing)
    return study


def distributions(space: dict[str, ParamSpec]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every parameter name the space can suggest."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, param in space.items():
        cases = param.cases.items() if param.cases is not None else [(None, param)]
        for case, sub in cases:
            kind = sub.kind
            if kind == "categorical":
                dist = optuna.distributions.CategoricalDistribution(sub.choices)
            elif kind == "int":
                dist = optuna.distributions.IntDistribution(
                    int(sub.low), int(sub.high), log=sub.log, step=int(sub.step or 1)
                )
            else:
                dist = optuna.distributions.FloatDistribution(
                    float(sub.low), float(sub.high), log=sub.log, step=sub.step
                )
            out[optuna_name(name, case)] = dist
    return out


SETTINGS_ATTR = "sweeplab.settings"  # the study's user attribute: config.result_settings when it was created


def check_compatible(study: optuna.Study, spec: SweepSpec, source: str, settings: dict[str, Any] | None = None) -> None:
    """A study resumed with a changed space must fail before it runs, not on every trial: Optuna refuses
    other choices for a categorical parameter, or another kind of distribution, under the same name. So must one
    resumed with other settings that decide a trial's result (`settings`, config.result_settings): its trials
    would be ranked against trials of another task, data or length."""
    if settings is not None:
        check_settings(study, spec, source, settings)
    wanted = distributions(spec.space)
    seen: set[tuple[str, str]] = set()
    for trial in study.get_trials(deepcopy=False):  # every distribution any trial used: each case is its own name
        for name, old in trial.distributions.items():
            new = wanted.get(name)
            key = (name, optuna.distributions.distribution_to_json(old))
            if key in seen:
                continue
            if new is None:  # pinned (lr=0.01) or dropped: the next trials would have no value for it
                raise ConfigError(
                    f"{source}: space: study {spec.optuna_study!r} already searched {name} over {_show(old)}; "
                    f"this sweep does not search it (a searched key pinned, or left out of the space), and its "
                    "trials would not compare. Use another study name (study=NAME) to change it"
                )
            seen.add(key)
            try:
                optuna.distributions.check_distribution_compatibility(old, new)
            except ValueError:
                raise ConfigError(
                    f"{source}: space: study {spec.optuna_study!r} already searched {name} over {_show(old)}; "
                    f"this file gives {_show(new)}. Use another study name (study=NAME) to change it"
                ) from None


CODE_KEY = "code:"  # a result setting `code:<module>`: the sha256 of one module of the user's (driver.code_settings)


def _related(key: str, keys) -> bool:
    """Whether another form of the same setting is among `keys`: `train.scheduler` (none) and
    `train.scheduler.class_path` (one given), or `train.loss` (by name) and `train.loss.class_path` (a class)."""
    return key in keys or any(k.startswith(f"{key}.") or key.startswith(f"{k}.") for k in keys)


def changed_settings(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings a resume changes. A key only one side has is a change when the other side has the same
    setting in another form (none -> a scheduler; a loss by name -> by class), or when it is code (a module
    added to or dropped from what the trials import); otherwise it is a field one sweeplab version has and the
    other has not, which is not a change."""
    code = any(key.startswith(CODE_KEY) for key in recorded)
    changed = [key for key in recorded if key in now and recorded[key] != now[key]]
    for key in [*recorded, *now]:
        if key in recorded and key in now:
            continue
        other = now if key in recorded else recorded
        if (code and key.startswith(CODE_KEY)) or (not key.startswith(CODE_KEY) and _related(key, other)):
            changed.append(key)
    changed = list(dict.fromkeys(changed))
    return [key for key in changed if not any(key.startswith(f"{other}.") for other in changed)]  # the setting once


def check_settings(study: optuna.Study, spec: SweepSpec, source: str, settings: dict[str, Any]) -> None:
    """Refuse, in one line, a resume whose settings differ from those the study recorded: a value changed, a
    setting given in another form (a scheduler or early stopping added, a loss given by class), a module of the
    user's code changed, added or dropped."""
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if not isinstance(recorded, dict):
        return
    now = json.loads(json.dumps(settings))
    changed = changed_settings(recorded, now)
    if not changed:
        return
    modules = [key[len(CODE_KEY) :] for key in changed if key.startswith(CODE_KEY)]
    if modules:
        raise ConfigError(
            f"{source}: study {spec.optuna_study!r} ran its trials with other code: module "
            f"{', '.join(modules[:4])} changed since (its sha256 is not the one the study recorded), and the "
            "trials would not compare. Start a new study (study=NAME), or put the old code back"
        )

    def show(values: dict[str, Any]) -> str:
        def text(key: str) -> str:
            if key in values:
                value = values[key]
                return value if isinstance(value, str) else json.dumps(value)
            nested = {k[len(key) + 1 :]: v for k, v in values.items() if k.startswith(f"{key}.")}
            if nested:
                return json.dumps(nested)
            parent = next((k for k in values if key.startswith(f"{k}.")), None)
            return json.dumps(values[parent]) if parent else "(not given)"

        return ", ".join(f"{override_key(key)}={text(key)}" for key in changed[:4]) + (
            f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        )

    raise ConfigError(
        f"{source}: study {spec.optuna_study!r} ran its trials with {show(recorded)}; this sweep gives "
        f"{show(now)}, and its trials would not compare with them. Start a new study (study=NAME), "
        "or give the old settings back"
    )


OBJECTIVE_NAME = "best_val_loss"  # a trial's value by default (its intermediate values: the val_loss per epoch)


def label_study(study: optuna.Study, settings: dict[str, Any], metric_name: str = OBJECTIVE_NAME) -> None:
    """What Optuna's own tools and a later resume read from the study: the name of its objective (optuna-dashboard
    and `optuna.visualization` show it instead of "Objective 0") and the result settings it runs with (an older
    study, which sweeplab did not label, is labelled on its first resume)."""
    if study.metric_names is None:
        study.set_metric_names([metric_name])
    if SETTINGS_ATTR not in study.user_attrs:
        study.set_user_attr(SETTINGS_ATTR, json.loads(json.dumps(settings)))


def _show(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    return f"[{dist.low}, {dist.high}]" + (" log" if getattr(dist, "log", False) else "")


def repair_journal(path: Path) -> str | None:
    """Make a journal whose last write was cut short (a full disk, a killed writer) readable again; None when it
    was whole, else one line saying what was done.

    A cut write leaves a partial last line. Optuna then appends the next operation onto it, and that line (and
    every read after it) fails to parse. The cut operation was never acknowledged to anyone, so it is dropped: a
    torn tail is cut off, and a torn prefix glued to a complete operation is cut from its front (the operation,
    which was acknowledged, stays). The original is kept beside the journal. Runs under the journal's own lock."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalFileOpenLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        kept, dropped = [], len(tail)
        for line in lines:
            start = _last_whole_operation(line)
            if start is None:
                dropped += len(line) + 1
                continue
            kept.append(line[start:])
            dropped += start
        if dropped == 0:
            return None
        copy = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, copy)
        temporary = path.with_name(f".{path.name}.repair-{os.getpid()}")
        temporary.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(temporary, path)
        return (
            f"note: {path}: dropped {dropped} bytes of an interrupted write (the operation was never "
            f"acknowledged); the journal as it was is kept in {copy.name}"
        )
    finally:
        lock.release()


def _last_whole_operation(line: bytes) -> int | None:
    """Where the line's complete JSON operation starts: 0 for a whole line, later for one glued onto a torn
    prefix, None when nothing in it parses."""
    start = 0
    while start != -1:
        try:
            if isinstance(json.loads(line[start:]), dict):
                return start
        except ValueError:
            pass
        start = line.find(b'{"op_code"', start + 1)
    return None
