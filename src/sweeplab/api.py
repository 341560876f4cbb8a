"""sweeplab from Python: `sweeplab.sweep(spec)` and `sweeplab.run(experiment)`, the two functions `sweeplab sweep`
and `sweeplab run` call too (cli.py parses, calls, prints), so a sweep starts one way whoever starts it.

From Python a spec or an experiment may be a dict of the file's form, and wherever a file takes an import path the
dict may take the object itself: a class for `model.class_path`, a function for `data.class_path`, `collate_fn`,
a loss or a scheduler factory. A class defined in a notebook trains (local workers are forked, so they have it),
its source is logged with the run (`inspect.getsource`), and its champion loads without the notebook.

Both leave the interpreter as they found it (process.borrowed): signal handlers, sys.stdout, warning filters,
torch's optimizers and thread counts. Bad input raises `sweeplab.ConfigError` with the line the CLI prints; Ctrl-C
ends the trials in flight as the command line does and raises KeyboardInterrupt here.

Why one module of ~430 lines: both entry points and what they share (objects given in place of import paths,
stores resolved, weights fetched) are one surface, the one the CLI calls too.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeplab.config import ConfigError, apply_overrides, build_experiment, load_experiment
from sweeplab.process import borrowed, configure
from sweeplab.stop import stop_flag
from sweeplab.stores import SettingError, resolve_storage_url, resolve_tracking_uri

# --- objects where the files have import paths ---------------------------------------------------------------------


def with_paths(raw: Any, found: list[str] | None = None) -> Any:
    """A copy of a spec or experiment dict with every class or function in it replaced by the import path that
    stands for it (plugins.path_of); `found` collects those paths."""
    if isinstance(raw, dict):
        return {key: with_paths(value, found) for key, value in raw.items()}
    if isinstance(raw, (list, tuple)):
        return [with_paths(value, found) for value in raw]
    if isinstance(raw, (str, bytes, int, float, bool, Path)) or raw is None:
        return str(raw) if isinstance(raw, Path) else raw
    if isinstance(raw, type) or callable(raw):
        from sweeplab.train.plugins import path_of  # torch: imported only when there are objects

        path = path_of(raw)
        if found is not None:
            found.append(path)
        return path
    return raw


def _raw_of(source: Any, what: str) -> tuple[Any, list[str]]:
    """(a file's path, or a dict with objects as paths; the paths that stand for objects)."""
    if isinstance(source, (str, Path)):
        return source, []
    if not isinstance(source, dict):
        raise ConfigError(f"{what}: a file's path or a dict of its form, not a {type(source).__name__}")
    found: list[str] = []
    return with_paths(source, found), found


def _config_error(exc: Exception) -> ConfigError:
    return exc if isinstance(exc, ConfigError) else ConfigError(str(exc))


# --- sweeps -------------------------------------------------------------------------------------------------------


def start_sweep(
    spec: Any,
    overrides: dict[str, Any],
    tracking_uri: str | None = None,
    storage: str | None = None,
    quiet: bool = False,
    trials_done=None,
):
    """Check, settle and run a sweep: (plan, outcome, tracking URI, storage URL). What `sweeplab sweep` and
    `sweeplab.sweep` both do; the caller has configured the process. `trials_done(study, tracking_uri)` is called
    once every trial is recorded, before the champions register."""
    from sweeplab.console import Progress
    from sweeplab.sweep.probes import settle
    from sweeplab.sweep.spec import load_sweep

    raw, objects = _raw_of(spec, "spec")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    weights_from(tracking_uri)  # model.init_from's runs:/ and models:/ come from this store
    # a bad spec fails here, before any study or run exists, and so does an engine or device it cannot use
    plan = settle(load_sweep(raw, overrides))  # and bad data, a bad model
    sweep = plan.sweep
    from sweeplab.sweep.driver import run_sweep
    from sweeplab.track.tracker import import_store_modules

    storage_url = resolve_storage_url(storage, tracking_uri)
    remote = "://" in storage_url and not storage_url.startswith("sqlite:")  # a path or journal: is this machine's
    if objects and remote:
        print(
            f"sweeplab: {', '.join(objects)} given as objects: workers on other machines (`sweeplab worker`) need "
            "import paths (module.Name in a file they can import); this process and its local helpers have them",
            file=sys.stderr,
        )
    import_store_modules(tracking_uri)  # once, before the helpers are forked
    bar = Progress(
        sweep.spec.study,
        enabled=not quiet,
        header=f"engine: {sweep.spec.engine} ({plan.reason})" if plan.reason else "",
    )
    done = (lambda: trials_done(sweep.spec.study, tracking_uri)) if trials_done is not None else None
    try:
        outcome = run_sweep(
            plan, tracking_uri, storage_url, workers=sweep.spec.workers, progress=bar.update, trials_done=done
        )
    finally:
        bar.close()
    return plan, outcome, tracking_uri, storage_url


@dataclass
class SweepResult:
    """What `sweeplab.sweep` found. `trials`: one row per trial of the study (its number, condition, state, each
    searched parameter under its sweep-file key, best_epoch, the objective's column, best_val_loss, run id);
    `best`: the best completed trial per condition; `champion`: `models:/STUDY@champion`; `champions`: the URI per
    condition (`noise=0.3`; the study's name in a sweep without conditions); `commands`: the shell commands that
    browse its runs, predict with and serve its champions ({"browse", "predict": [...], "serve"}), printed at the
    end unless `quiet`; `report()`: the report's answer in words."""

    study_name: str
    tracking_uri: str
    storage: str
    trials: Any  # pandas.DataFrame
    best: Any  # pandas.DataFrame
    champion: str | None
    champions: dict[str, str] = field(default_factory=dict)
    objective: str = "best_val_loss"
    commands: dict = field(default_factory=dict)

    def report(self, out: str | Path | None = None) -> str:
        """The report's answer, in words; its files (tables, pictures, report.html) in `out` when given (else a
        temporary folder, removed)."""
        import tempfile

        from sweeplab.report import answer_text, build_report

        if out is not None:
            return "\n\n".join(answer_text(build_report(self.study_name, self.tracking_uri, Path(out))))
        with tempfile.TemporaryDirectory(prefix="sweeplab-report-") as tmp:
            return "\n\n".join(answer_text(build_report(self.study_name, self.tracking_uri, Path(tmp), False)))

    def __repr__(self) -> str:
        return (
            f"SweepResult(study_name={self.study_name!r}, trials={len(self.trials)}, champion={self.champion!r}, "
            f"tracking_uri={self.tracking_uri!r})"
        )


def sweep(spec, *, tracking_uri: str | None = None, storage: str | None = None, quiet: bool = False, **overrides):
    """Run a sweep: `spec` is a sweep file's path or a dict of its form (its `experiment` a path or a dict; objects
    where the file has import paths); `overrides` as on the command line (`n_trials=8`, `epochs=20`). Returns a
    SweepResult. Bad input raises sweeplab.ConfigError; Ctrl-C ends the trials in flight and raises
    KeyboardInterrupt."""
    with borrowed():
        configure(library=True)
        try:
            plan, outcome, tracking_uri, storage_url = start_sweep(spec, dict(overrides), tracking_uri, storage, quiet)
        except SettingError as exc:
            raise _config_error(exc) from None
        from sweeplab.console import print_sweep_summary, sweep_commands

        if not quiet:  # what `sweeplab sweep` prints: the counts, the best trials, the champions, the commands
            print_sweep_summary(outcome, plan.sweep, tracking_uri, storage_url)
        result = sweep_result(outcome, tracking_uri, storage_url)
        result.commands = sweep_commands(outcome, plan.sweep, tracking_uri)
        return result


def sweep_result(outcome, tracking_uri: str, storage_url: str) -> SweepResult:
    from sweeplab.report.load import load_runs
    from sweeplab.stores import redact

    study = outcome.parts[0].sweep.spec.study
    data = load_runs(study, tracking_uri)
    frame = data.trials
    goal = data.goal.column
    if data.conditions:
        frame = frame.assign(
            condition=[", ".join(f"{k}={row[k]}" for k in data.conditions) for _, row in frame.iterrows()]
        )
    columns = ["trial", *(["condition", *data.conditions] if data.conditions else []), "state", *data.factors]
    # (once each: with the default objective the goal is best_val_loss itself)
    columns = list(dict.fromkeys([*columns, "best_epoch", goal, "best_val_loss", "run_id"]))
    trials = frame[[c for c in columns if c in frame.columns]].copy()
    completed = trials[trials["state"] == "completed"] if "state" in trials else trials
    best = completed.iloc[0:0]
    if goal in completed and len(completed):
        ascending = data.goal.direction == "minimize"
        ordered = completed.sort_values(goal, ascending=ascending, kind="stable")
        best = ordered.groupby("condition", sort=False).head(1) if data.conditions else ordered.head(1)
    champions = {}
    for part in outcome.parts:
        if part.champion is not None:
            label = ", ".join(f"{k}={v}" for k, v in part.sweep.spec.condition.items()) or study
            champions[label] = part.champion.uri
    champion = f"models:/{study}@champion" if champions else None
    return SweepResult(
        study, tracking_uri, redact(storage_url), trials.reset_index(drop=True), best.reset_index(drop=True),
        champion, champions, goal,
    )  # fmt: skip


# --- one run ------------------------------------------------------------------------------------------------------


def load_run_config(experiment: Any, overrides: dict[str, Any]):
    """The experiment config of a file's path or a dict of its form (objects where the file has import paths)."""
    raw, _ = _raw_of(experiment, "experiment")
    if isinstance(raw, dict):
        return build_experiment(apply_overrides(raw, overrides), "experiment", Path.cwd())
    return load_experiment(raw, overrides)


def train_run(config, source: str, tracking_uri: str | None, track: bool, callbacks: list, checked: bool = False):
    """Check (unless the caller has: `checked`) and train one experiment, tracked in MLflow when `track`:
    (experiment.RunResult, its RunTracker or None). What `sweeplab run` and `sweeplab.run` both do; the caller has
    configured the process."""
    from sweeplab.train.experiment import check_config, run_experiment

    weights_from(tracking_uri)
    if not checked:
        check_config(config, source)  # bad data or a bad model is one line before any store exists
    tracker = None
    if track:  # Ctrl-C or SIGTERM ends the run KILLED at the next epoch, instead of leaving it RUNNING
        from sweeplab.track.recorder import RunTracker

        tracker = RunTracker(resolve_tracking_uri(tracking_uri), config, source)
        callbacks = [*callbacks, tracker.epoch_callback]
    callbacks = [*callbacks, lambda record: stop_flag.check()]
    from sweeplab.train.crossval import is_folded, refit_config

    try:
        if is_folded(config):  # data.folds: the folds' mean is the run; a refit gives the model
            result = train_folds(config, callbacks)
        else:
            result = run_experiment(config, callbacks=callbacks)
    except BaseException as exc:
        if tracker:
            tracker.fail(exc)
        raise
    if is_folded(config):  # the folds' run is written first: the refit names it
        if tracker:
            tracker.finish(result)
        result = refit_run(refit_config(config, result.history.best_epoch or 1), result, source, tracking_uri, tracker)
    else:
        if result.dataset.has_test and result.history.best_epoch:  # data.test_size: the best state, scored once
            from sweeplab.train.experiment import test_scores

            result.test = test_scores(config, result.dataset, result.model)
        if tracker:
            tracker.finish(result)
    return result, tracker


def train_folds(config, callbacks: list):
    """`data.folds` in `sweeplab run`: the folds trained on the reference loop (train/crossval.py); the callbacks
    see their mean curve, which is the run's."""
    from sweeplab.train.crossval import Folded
    from sweeplab.train.engines import Job, ReferenceEngine

    def hook(job, record):
        return next((reason for reason in (callback(record) for callback in callbacks) if reason), None)

    job = Job(None, config)
    Folded(ReferenceEngine()).train([job], hook)
    if job.error is not None:
        raise job.error
    return job.result


def refit_run(config, folds, source: str, tracking_uri: str | None, tracker):
    """After the folds, as a sweep refits its champion: the configuration on the whole training split for the mean
    curve's best epoch, its last epoch kept, tracked as a run tagged `sweeplab.role=refit` and
    `sweeplab.refit_of=<the folds' run>`. Its model and predictions, with the folds' History (the score)."""
    import dataclasses

    from sweeplab.train.experiment import run_experiment

    refit_tracker = None
    if tracker is not None and tracker.run_id is not None:
        from sweeplab.track.recorder import RunTracker

        tags = {"sweeplab.role": "refit", "sweeplab.refit_of": tracker.run_id}
        refit_tracker = RunTracker(resolve_tracking_uri(tracking_uri), config, source, tags=tags)
    try:
        refit = run_experiment(config, keep_last=True)
        if refit.dataset.has_test:  # data.test_size: the refit (the model) scored once
            from sweeplab.train.experiment import test_scores

            refit.test = test_scores(config, refit.dataset, refit.model)
    except BaseException as exc:
        if refit_tracker:
            refit_tracker.fail(exc)
        raise
    if refit_tracker:
        refit_tracker.record(refit)
    return dataclasses.replace(
        refit,
        config=folds.config,
        history=folds.history,
        refit=refit.history,
        refit_run_id=refit_tracker.run_id if refit_tracker else None,
    )


@dataclass
class RunResult:
    """What `sweeplab.run` trained. `history`: a DataFrame per epoch (train_loss, val_loss, every metric, lr);
    `best_epoch`; `best`: the objective's value at it; `model`: the model with its best state restored; `run_id`:
    its MLflow run (None when not tracked)."""

    history: Any  # pandas.DataFrame
    best_epoch: int
    best: float
    metric: str
    model: Any  # torch.nn.Module
    run_id: str | None
    status: str = "completed"
    stop_reason: str | None = None
    rerun: str | None = None  # run(like=...): how far the curves are from the original run's
    refit_run_id: str | None = None  # data.folds: the history is the folds' mean; `model` is this refit run's

    def __repr__(self) -> str:
        return (
            f"RunResult(best_epoch={self.best_epoch}, best {self.metric}={self.best:.6g}, "
            f"epochs={len(self.history)}, run_id={self.run_id!r})"
        )


def run(
    experiment=None, *, like: str | None = None, tracking_uri: str | None = None, track: bool = True, **overrides
) -> RunResult:
    """Train one experiment: a file's path or a dict of its form (objects where the file has import paths),
    `overrides` as on the command line (`epochs=20`). Returns a RunResult. Bad input raises sweeplab.ConfigError;
    Ctrl-C ends the run KILLED and raises KeyboardInterrupt.

    `like=RUN_ID` instead trains a logged run's configuration again, as `sweeplab rerun RUN_ID` does: its
    resolved settings and seed, by the engine that trained it, into a run tagged `sweeplab.rerun_of`; the result's
    `rerun` says how far its curves are from the original's."""
    with borrowed():
        configure(with_optuna=False, library=True)
        try:
            if like is not None:
                if experiment is not None or overrides:
                    raise ConfigError("like: trains the run's own configuration; give no experiment or overrides")
                result, tracker, line, model = rerun(like, tracking_uri, track)
                found = run_result(result, tracker, model)
                found.rerun = line
                return found
            config = load_run_config(experiment, dict(overrides))
            source = str(experiment) if isinstance(experiment, (str, Path)) else "experiment"
            result, tracker = train_run(config, source, tracking_uri, track, [])
        except SettingError as exc:
            raise _config_error(exc) from None
    return run_result(result, tracker)


def rerun(run_id: str, tracking_uri: str | None, track: bool = True):
    """A logged run's configuration trained again (track/rerun.py): (the result, its RunTracker or None, the line
    comparing its curves with the original's, the model with its best state, built while the run's logged code is
    still there). What `sweeplab rerun` and `sweeplab.run(like=...)` both do."""
    from sweeplab.track.recorder import RunTracker
    from sweeplab.track.rerun import TAG_RERUN_OF, compare, read_like, train_like

    uri = resolve_tracking_uri(tracking_uri)
    weights_from(uri)
    like = read_like(run_id, uri)
    try:
        tracker = None
        if track:
            tags = {TAG_RERUN_OF: run_id, "sweeplab.engine": like.engine}
            tracker = RunTracker(uri, like.config, f"rerun of {run_id}", like.experiment_id, tags)
        result = train_like(like)
        if tracker is not None:
            tracker.record(result)
        _, line = compare(like, result.history)
        model = _model_of(result)
    finally:
        like.folder.cleanup()
    return result, tracker, line, model


def _model_of(result):
    """The trained model with its best state: the reference loop's own, or rebuilt for a stacked member."""
    model = getattr(result, "model", None)
    if model is None:
        from sweeplab.train.model import build_model

        model = build_model(result.spec, result.config.code_dir)
        if result.history.best_state is not None:
            model.load_state_dict(result.history.best_state)
    return model


def run_result(result, tracker, model=None) -> RunResult:
    import pandas as pd

    history = result.history
    n = len(history.train_loss)
    columns = {"epoch": list(range(1, n + 1)), "train_loss": history.train_loss, "val_loss": history.val_loss}
    columns.update({name: values[:n] for name, values in history.metrics.items()})
    if history.lr:
        columns["lr"] = history.lr[:n]
    metric = result.config.objective.metric
    return RunResult(
        pd.DataFrame(columns),
        history.best_epoch,
        history.best_value if not math.isnan(history.best_value) else history.best_val_loss,
        metric,
        model if model is not None else _model_of(result),
        tracker.run_id if tracker else None,
        history.status,
        history.stop_reason,
        refit_run_id=getattr(result, "refit_run_id", None),
    )


def weights_from(tracking_uri: str | None) -> None:
    """`model.init_from`'s runs:/ and models:/ URIs are read from this store (train/init.py), from now on."""
    from sweeplab.track.serve import fetch_weights
    from sweeplab.train.init import use_fetcher

    uri = resolve_tracking_uri(tracking_uri)
    use_fetcher(lambda source: fetch_weights(source, uri))
