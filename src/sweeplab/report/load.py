"""Reading a sweep back from MLflow (never by re-training): `load_runs` gives one row per trial run and the curves
in long form (trial, run_id, epoch, split, loss), read in bulk (one query per metric for hundreds of runs) through
the store's own SQL where it is SQLite or PostgreSQL (`_select_curves`), else MLflow's client. Next: tables.py."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sweeplab.config import ALIASES
from sweeplab.report.answer import DEFAULT_GOAL, Goal
from sweeplab.track.tracker import TAG_CONFIRMS, TAG_OBJECTIVE, TAG_OUTCOME, TAG_ROLE, TAG_TRIAL, Tracker

FACTORS = ["optimizer", "hidden", "noise"]  # the scientific parameters; lr is tuned per optimizer (a nuisance)
PARAM_COLUMNS = {
    "train.optimizer": "optimizer",
    "model.hidden": "hidden",
    "data.noise": "noise",
    "train.lr": "lr",
    "train.loss": "loss",  # a regression's loss by name
    "train.loss.class_path": "loss_class",  # a torch loss by class
    "seed": "seed",
    "task": "task",
    "train.epochs": "epochs",
    "train.batch_size": "batch_size",
    "model.activation": "activation",
    "model.dropout": "dropout",
    "train.weight_decay": "weight_decay",
    "train.momentum": "momentum",
}
CONVERGED_WITHIN = 0.05  # epochs to converge: first epoch within 5% of the trial's own best val loss ...
LEARNED_BELOW = 0.5  # ... counted only for a run that learned: best_val_loss at most half its baseline_val_loss
BULK_RUNS = 500  # run ids per bulk metric query


class ReportError(LookupError):
    pass


@dataclass
class SweepData:
    study: str
    trials: pd.DataFrame  # one row per trial run
    curves: pd.DataFrame  # long: trial, run_id, epoch, split, loss
    parent_run_id: str | None = None
    notes: list[str] = field(default_factory=list)
    factors: list[str] = field(default_factory=list)  # the searched parameters (the sweep's space)
    conditions: list[str] = field(default_factory=list)  # the compared conditions (noise), each its own search
    continuous: set[str] = field(default_factory=set)  # factors searched over a range (lr): plotted, not tabled
    experiment_id: str = ""
    goal: Goal = DEFAULT_GOAL  # the objective: which summary column ranks trials, and which way
    # a confirmation's repeats (`confirm:`): one row per repeat run: confirms (the trial run it repeats), run_id,
    # seed, state and the objective's column
    repeats: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["confirms", "run_id", "seed"]))
    folds: int | None = None  # data.folds: each trial's scores are the mean over that many folds
    # data.test_size: each champion's scores on the test split, as its run logged them once: (trial number, whether
    # it is a refit, {test_loss: ..., test_<metric>: ...})
    tested: list[tuple[int, bool, dict[str, float]]] = field(default_factory=list)


# --- reading MLflow -----------------------------------------------------------------------------------------------


def load_runs(study: str, tracking_uri: str) -> SweepData:
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    client = tracker.client
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise ReportError(f"{study}: no such study (MLflow experiment) in the tracking store")
    runs = _search_all(client, experiment.experiment_id)
    parents = sorted(
        (r for r in runs if r.data.tags.get(TAG_ROLE) in ("sweep", "worker")), key=lambda r: r.info.start_time
    )
    # a study's trials are its trial runs; `sweeplab run` runs in an experiment of the same name are not among
    # them (they are the report's rows only where no sweep ran)
    roles = ("trial",) if parents else ("trial", "run")
    trial_runs = [r for r in runs if r.data.tags.get(TAG_ROLE) in roles]
    if not trial_runs:
        raise ReportError(f"{study}: the study has no trial runs yet")
    params = parents[-1].data.params if parents else {}
    factors = [k for k in params.get("space", "").split(",") if k]
    conditions = [k for k in params.get("conditions", "").split(",") if k]
    continuous = {k for k in params.get("continuous", "").split(",") if k}
    fields = [k for k in params.get("fields", "").split(",") if k]
    goal = Goal.parse(params.get("objective") or trial_runs[0].data.tags.get(TAG_OBJECTIVE))
    curves = _curves(client, [r.info.run_id for r in trial_runs], None if goal.is_loss else goal.metric)
    keys = factors + conditions
    trials = _trial_frame(trial_runs, curves, keys, dict(zip(keys, fields)) if len(fields) == len(keys) else {}, goal)
    if not parents:  # runs of `sweeplab run`: whatever varies among the usual factors
        factors = [f for f in FACTORS + ["lr"] if f in trials.columns and trials[f].nunique() > 1]
    curves = curves.merge(trials[["run_id", "trial"]], on="run_id")[["trial", "run_id", "epoch", "split", "loss"]]
    parent_id = next((r.info.run_id for r in reversed(parents) if r.data.tags.get(TAG_ROLE) == "sweep"), None)
    repeats = _repeat_frame([r for r in runs if r.data.tags.get(TAG_ROLE) == "confirm"], goal)
    return SweepData(
        study,
        trials,
        curves.sort_values(["trial", "split", "epoch"], ignore_index=True),
        parent_id,
        factors=factors,
        conditions=conditions,
        experiment_id=experiment.experiment_id,
        continuous=continuous,
        goal=goal,
        repeats=repeats,
        folds=int(_number(trial_runs[0].data.params.get("data.folds", "nan"))) if _folded(trial_runs[0]) else None,
        tested=[
            (
                int(_number(r.data.tags.get("sweeplab.trial_number", "nan")) or 0),
                r.data.tags.get(TAG_ROLE) == "refit",
                {k: v for k, v in r.data.metrics.items() if k.startswith("test_")},
            )
            for r in runs
            if "test_loss" in r.data.metrics and r.data.tags.get(TAG_ROLE) in ("trial", "refit", "run")
        ],
    )


def _folded(run) -> bool:
    return run.data.params.get("data.folds") not in (None, "None")


def _search_all(client, experiment_id: str):
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _curves(client, run_ids: list[str], metric: str | None = None) -> pd.DataFrame:
    """train_loss and val_loss of every run (and the objective's `metric` when it is not a loss: its split is the
    metric's name), as rows (run_id, epoch, split, loss)."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    fast = _select_curves(store, run_ids, metric)  # a database store: one SELECT per chunk of runs
    if fast is not None:
        return fast
    rows: list[tuple[str, int, str, float]] = []
    for key, split in _curve_keys(metric).items():  # a tracking server: parallel requests
        with ThreadPoolExecutor(max_workers=8) as pool:
            for run_id, history in zip(
                run_ids, pool.map(lambda r, key=key: client.get_metric_history(r, key), run_ids)
            ):
                rows.extend((run_id, m.step, split, m.value) for m in history)
    frame = pd.DataFrame(rows, columns=["run_id", "epoch", "split", "loss"])
    # a metric logged twice for one step (a retried flush) counts once
    return frame.drop_duplicates(["run_id", "epoch", "split"], keep="last")


def _curve_keys(metric: str | None) -> dict[str, str]:
    """MLflow metric -> the curves' split."""
    return {"train_loss": "train", "val_loss": "val", **({metric: metric} if metric else {})}


def _select_curves(store, run_ids: list[str], metric: str | None = None) -> pd.DataFrame | None:
    """For a database-backed store: one plain SELECT on MLflow's metrics table (its ORM model and engine),
    returning rows instead of building a Metric object per value: ~10x faster than get_metric_history_bulk for
    80,000 values. None when the store is not a SQLAlchemy one (a tracking server), or this MLflow lacks them."""
    try:  # a database store's modules: imported only when the store is one (a server needs none)
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import select

        engine = store.engine
    except (ImportError, AttributeError):
        return None
    frames = []
    with engine.connect() as connection:
        for start in range(0, len(run_ids), BULK_RUNS):
            query = select(
                SqlMetric.run_uuid,
                SqlMetric.step,
                SqlMetric.key,
                SqlMetric.value,
                SqlMetric.is_nan,
                SqlMetric.timestamp,
            ).where(
                SqlMetric.key.in_(list(_curve_keys(metric))), SqlMetric.run_uuid.in_(run_ids[start : start + BULK_RUNS])
            )
            frames.append(
                pd.DataFrame(
                    connection.execute(query).all(), columns=["run_id", "epoch", "key", "loss", "is_nan", "timestamp"]
                )
            )
    frame = pd.concat(frames, ignore_index=True)
    frame["loss"] = frame["loss"].astype(float).where(~frame["is_nan"].astype(bool), math.nan)
    frame["epoch"] = frame["epoch"].astype(int)
    frame["split"] = frame["key"].map(_curve_keys(metric))
    frame = frame.sort_values(["run_id", "split", "epoch", "timestamp"])
    return frame.drop_duplicates(["run_id", "epoch", "split"], keep="last")[["run_id", "epoch", "split", "loss"]]


def _trial_frame(
    runs, curves: pd.DataFrame, keys: list[str] = (), fields: dict[str, str] | None = None, goal: Goal = DEFAULT_GOAL
) -> pd.DataFrame:
    """One row per run; `keys` (the sweep's searched and compared keys, `lr` or `train.lr` or `channels`) become
    columns of their own, named as the sweep file names them; `fields` says which param each key set (the sweep
    logs it: `channels` -> model.init_args.channels)."""
    fields = fields or {}
    # a key's own field first: a user model's `dropout` is model.init_args.dropout, not the MLP's model.dropout
    columns = {param: column for param, column in PARAM_COLUMNS.items() if column not in keys}
    columns.update({fields.get(key) or ALIASES.get(key, key): key for key in keys})
    records = []
    by_run = _curve_arrays(curves)
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        record = {
            "trial": int(tags[TAG_TRIAL]) if TAG_TRIAL in tags else -1,
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "state": tags.get(TAG_OUTCOME, run.info.status.lower()),
            "reason": tags.get("sweeplab.reason", ""),
        }
        for param, column in columns.items():
            if param in params:
                record[column] = _number(params[param])
        record["baseline_val_loss"] = metrics.get("baseline_val_loss", math.nan)
        record.update(_curve_stats(by_run.get(run.info.run_id), record["baseline_val_loss"]))
        if "epochs_run" in metrics:  # the curves leave out a diverged run's last, non-finite epoch
            record["epochs_run"] = int(metrics["epochs_run"])
        if "best_val_loss" in metrics and record["state"] == "completed":
            record["best_val_loss"] = metrics["best_val_loss"]  # the logged summary is the system of record
            if "best_epoch" in metrics:  # by the objective, which may not be the lowest val_loss
                record["best_epoch"] = int(metrics["best_epoch"])
        if goal.column != "best_val_loss":
            record[goal.column] = metrics.get(goal.column, math.nan) if record["state"] == "completed" else math.nan
        end = run.info.end_time or run.info.start_time
        record["wall_time_s"] = (end - run.info.start_time) / 1000
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if (frame["trial"] < 0).all():
        frame["trial"] = range(len(frame))
    return frame.sort_values("trial", ignore_index=True)


def _repeat_frame(runs, goal: Goal) -> pd.DataFrame:
    """One row per repeat run of a confirmation: the trial run it repeats, its own run, its seed, how it ended and
    its objective (the logged summary metric, NaN unless it completed)."""
    records = []
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        state = tags.get(TAG_OUTCOME, run.info.status.lower())
        value = metrics.get(goal.column, math.nan) if state == "completed" else math.nan
        seed = _number(run.data.params.get("seed", "nan"))
        records.append(
            {
                "confirms": tags.get(TAG_CONFIRMS),
                "run_id": run.info.run_id,
                "seed": seed,
                "state": state,
                goal.column: value,
            }
        )
    frame = pd.DataFrame.from_records(records, columns=["confirms", "run_id", "seed", "state", goal.column])
    return frame.sort_values(["confirms", "seed"], ignore_index=True)


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _curve_arrays(curves: pd.DataFrame) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """run id -> split -> (epochs, losses) sorted by epoch: numpy slices of one sorted frame, so the per-run
    statistics below cost microseconds, not a pandas filter each (2 s over 1,000 runs)."""
    ordered = curves.sort_values(["run_id", "split", "epoch"], kind="stable")
    keys = (ordered["run_id"] + "\0" + ordered["split"]).to_numpy()
    epochs, losses = ordered["epoch"].to_numpy(), ordered["loss"].to_numpy(dtype=float)
    unique, starts = np.unique(keys, return_index=True)
    arrays: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for key, start, end in zip(unique, starts, [*starts[1:], len(keys)]):
        run_id, split = key.split("\0")
        arrays.setdefault(run_id, {})[split] = (epochs[start:end], losses[start:end])
    return arrays


def _curve_stats(curve: dict[str, tuple[np.ndarray, np.ndarray]] | None, baseline: float = math.nan) -> dict:
    """Per-trial convergence numbers, computed from the logged curves. `learned`: the best validation loss is at
    most LEARNED_BELOW times the baseline (a constant prediction fitted on the training labels; for MSE, R^2 of
    at least 0.5); unknown (None) for runs logged without a baseline (a lazy data set without `targets`), which
    the tables leave blank rather than count either way. A run that never learned has no epochs_to_converge:
    being within 5% of a best that is no better than guessing is not converging."""
    empty = {
        "learned": False,
        "best_val_loss": math.nan,
        "best_epoch": 0,
        "epochs_run": 0,
        "final_train_loss": math.nan,
        "final_val_loss": math.nan,
        "gap_at_best": math.nan,
        "epochs_to_converge": math.nan,
        "auc_val_loss": math.nan,
    }
    if not curve or "val" not in curve:
        return empty
    val_epochs, val = curve["val"]
    train_epochs, train = curve.get("train", (np.empty(0, dtype=int), np.empty(0)))
    finite = np.isfinite(val)
    if not finite.any():
        return {**empty, "epochs_run": int(val_epochs.max())}
    finite_epochs, finite_val = val_epochs[finite], val[finite]
    at_best = int(np.argmin(finite_val))  # the first epoch of the minimum, as the loop keeps the first best
    best_epoch, best = int(finite_epochs[at_best]), float(finite_val[at_best])
    within = finite_epochs[finite_val <= best + CONVERGED_WITHIN * abs(best)]
    learned = None if math.isnan(baseline) else bool(best <= LEARNED_BELOW * baseline)
    train_at_best = train[train_epochs == best_epoch]
    return {
        "learned": learned,
        "best_val_loss": best,
        "best_epoch": best_epoch,
        "epochs_run": int(val_epochs.max()),
        "final_train_loss": float(train[-1]) if len(train) else math.nan,
        "final_val_loss": float(val[-1]),
        "gap_at_best": best - (float(train_at_best[0]) if len(train_at_best) else math.nan),
        "epochs_to_converge": int(within.min()) if learned is not False else math.nan,  # unknown: not ruled out
        "auc_val_loss": float(np.trapezoid(finite_val, finite_epochs)) if len(finite_val) > 1 else best,
    }
