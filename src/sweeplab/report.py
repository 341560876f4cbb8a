"""pandas reports that compare how trials converged, built from what MLflow recorded (never by re-training).

runs -> tidy frames (`load_runs`: one row per trial, and the curves in long form) -> convergence tables per
factor (`factor_table`) -> CSV, Markdown, a self-contained HTML page and PNG pictures (`write_report`).
Curves are read in bulk (one query per metric for hundreds of runs), so a report over 500 trials takes seconds.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .answer import DEFAULT_GOAL, Goal
from .tracking import TAG_OBJECTIVE, TAG_OUTCOME, TAG_ROLE, TAG_TRIAL, Tracker, condition_label, run_link

FACTORS = ["optimizer", "hidden", "noise"]  # the scientific parameters; lr is tuned per optimizer (a nuisance)
PARAM_COLUMNS = {"train.optimizer": "optimizer", "model.hidden": "hidden", "data.noise": "noise", "train.lr": "lr",
                 "seed": "seed", "task": "task", "train.epochs": "epochs", "train.batch_size": "batch_size",
                 "model.activation": "activation", "model.dropout": "dropout", "train.weight_decay": "weight_decay",
                 "train.momentum": "momentum"}
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


# --- reading MLflow -----------------------------------------------------------------------------------------------

def load_runs(study: str, tracking_uri: str) -> SweepData:
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    client = tracker.client
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise ReportError(f"{study}: no such study (MLflow experiment) in the tracking store")
    runs = _search_all(client, experiment.experiment_id)
    trial_runs = [r for r in runs if r.data.tags.get(TAG_ROLE) in ("trial", "run")]
    if not trial_runs:
        raise ReportError(f"{study}: the study has no trial runs yet")
    parents = sorted((r for r in runs if r.data.tags.get(TAG_ROLE) in ("sweep", "worker")),
                     key=lambda r: r.info.start_time)
    params = parents[-1].data.params if parents else {}
    factors = [k for k in params.get("space", "").split(",") if k]
    conditions = [k for k in params.get("conditions", "").split(",") if k]
    continuous = {k for k in params.get("continuous", "").split(",") if k}
    fields = [k for k in params.get("fields", "").split(",") if k]
    goal = Goal.parse(params.get("objective") or trial_runs[0].data.tags.get(TAG_OBJECTIVE))
    curves = _curves(client, [r.info.run_id for r in trial_runs], None if goal.is_loss else goal.metric)
    keys = factors + conditions
    trials = _trial_frame(trial_runs, curves, keys, dict(zip(keys, fields)) if len(fields) == len(keys) else {},
                          goal)
    if not parents:  # runs of `sweeplab run`: whatever varies among the usual factors
        factors = [f for f in FACTORS + ["lr"] if f in trials.columns and trials[f].nunique() > 1]
    curves = curves.merge(trials[["run_id", "trial"]], on="run_id")[["trial", "run_id", "epoch", "split", "loss"]]
    parent_id = next((r.info.run_id for r in reversed(parents) if r.data.tags.get(TAG_ROLE) == "sweep"), None)
    return SweepData(study, trials, curves.sort_values(["trial", "split", "epoch"], ignore_index=True),
                     parent_id, factors=factors, conditions=conditions, experiment_id=experiment.experiment_id,
                     continuous=continuous, goal=goal)


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
            for run_id, history in zip(run_ids, pool.map(lambda r, key=key: client.get_metric_history(r, key), run_ids)):
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
    try:
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import select

        engine = store.engine
    except (ImportError, AttributeError):
        return None
    frames = []
    with engine.connect() as connection:
        for start in range(0, len(run_ids), BULK_RUNS):
            query = (select(SqlMetric.run_uuid, SqlMetric.step, SqlMetric.key, SqlMetric.value, SqlMetric.is_nan,
                            SqlMetric.timestamp)
                     .where(SqlMetric.key.in_(list(_curve_keys(metric))),
                            SqlMetric.run_uuid.in_(run_ids[start:start + BULK_RUNS])))
            frames.append(pd.DataFrame(connection.execute(query).all(),
                                       columns=["run_id", "epoch", "key", "loss", "is_nan", "timestamp"]))
    frame = pd.concat(frames, ignore_index=True)
    frame["loss"] = frame["loss"].astype(float).where(~frame["is_nan"].astype(bool), math.nan)
    frame["epoch"] = frame["epoch"].astype(int)
    frame["split"] = frame["key"].map(_curve_keys(metric))
    frame = frame.sort_values(["run_id", "split", "epoch", "timestamp"])
    return frame.drop_duplicates(["run_id", "epoch", "split"], keep="last")[["run_id", "epoch", "split", "loss"]]


def _trial_frame(runs, curves: pd.DataFrame, keys: list[str] = (), fields: dict[str, str] | None = None,
                 goal: Goal = DEFAULT_GOAL) -> pd.DataFrame:
    """One row per run; `keys` (the sweep's searched and compared keys, `lr` or `train.lr` or `channels`) become
    columns of their own, named as the sweep file names them; `fields` says which param each key set (the sweep
    logs it: `channels` -> model.init_args.channels)."""
    from .config import ALIASES

    fields = fields or {}
    # a key's own field first: a user model's `dropout` is model.init_args.dropout, not the MLP's model.dropout
    columns = {param: column for param, column in PARAM_COLUMNS.items() if column not in keys}
    columns.update({fields.get(key) or ALIASES.get(key, key): key for key in keys})
    records = []
    by_run = _curve_arrays(curves)
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        record = {"trial": int(tags[TAG_TRIAL]) if TAG_TRIAL in tags else -1, "run_id": run.info.run_id,
                  "run_name": run.info.run_name, "state": tags.get(TAG_OUTCOME, run.info.status.lower()),
                  "reason": tags.get("sweeplab.reason", "")}
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
    at least 0.5); unknown (True) for runs logged without a baseline. A run that never learned has no
    epochs_to_converge: being within 5% of a best that is no better than guessing is not converging."""
    empty = {"learned": False, "best_val_loss": math.nan, "best_epoch": 0, "epochs_run": 0, "final_train_loss": math.nan,
             "final_val_loss": math.nan, "gap_at_best": math.nan, "epochs_to_converge": math.nan,
             "auc_val_loss": math.nan}
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
    learned = not best > LEARNED_BELOW * baseline  # NaN baseline: not known, so not ruled out
    train_at_best = train[train_epochs == best_epoch]
    return {
        "learned": learned,
        "best_val_loss": best,
        "best_epoch": best_epoch,
        "epochs_run": int(val_epochs.max()),
        "final_train_loss": float(train[-1]) if len(train) else math.nan,
        "final_val_loss": float(val[-1]),
        "gap_at_best": best - (float(train_at_best[0]) if len(train_at_best) else math.nan),
        "epochs_to_converge": int(within.min()) if learned else math.nan,
        "auc_val_loss": float(np.trapezoid(finite_val, finite_epochs)) if len(finite_val) > 1 else best,
    }


# --- tables ---------------------------------------------------------------------------------------------------

def factor_table(trials: pd.DataFrame, factors: list[str], goal: Goal = DEFAULT_GOAL) -> pd.DataFrame:
    """One row per value (or pair of values) of the factors: how many trials ended how and how many learned, and
    the quartiles of the objective (best_val_loss unless the sweep names another; never a mean: a few trials
    that never learned would decide it), the median best epoch and epochs-to-converge over the completed ones,
    with the best trial of each."""
    present = [f for f in factors if f in trials.columns]
    if len(present) != len(factors):
        return pd.DataFrame()
    rows = []
    for key, group in trials.groupby(present, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        done = group[group["state"] == "completed"]
        row = dict(zip(present, key))
        row["trials"] = len(group)
        for state in ("completed", "pruned", "diverged", "failed"):
            row[state] = int((group["state"] == state).sum())
        row["learned"] = int(group["learned"].fillna(False).astype(bool).sum()) if "learned" in group else 0
        values = goal.values(done)
        column = goal.column
        row[f"{column}_q1"] = values.quantile(0.25)
        row[f"{column}_median"] = values.median()
        row[f"{column}_q3"] = values.quantile(0.75)
        row[f"{column}_{'min' if goal.minimize else 'max'}"] = values.min() if goal.minimize else values.max()
        row["best_epoch_median"] = done["best_epoch"].astype(float).median()
        row["epochs_to_converge_median"] = done["epochs_to_converge"].astype(float).median()
        finite = values.dropna()
        row["best_trial"] = int(done.loc[goal.best_index(finite), "trial"]) if len(finite) else None
        rows.append(row)
    return pd.DataFrame(rows)


MAX_LEVELS = 12  # a factor with more distinct values (a learning rate) is continuous: plotted, not tabled


def level_factors(trials: pd.DataFrame, factors: list[str], continuous: set[str] = frozenset()) -> list[str]:
    return [f for f in factors
            if f in trials.columns and 1 < trials[f].nunique() and not _continuous(trials[f], continuous)]


def all_factor_tables(trials: pd.DataFrame, factors: list[str] | None = None, conditions: list[str] = (),
                      continuous: set[str] = frozenset(), goal: Goal = DEFAULT_GOAL) -> dict[str, pd.DataFrame]:
    """Every single factor with levels and every pair, within each condition (the condition's columns come
    first), keyed by name ("optimizer", "optimizer x hidden")."""
    levels = level_factors(trials, FACTORS if factors is None else factors, continuous)
    tables = {}
    for size in (1, 2):
        for combo in itertools.combinations(levels, size):
            table = factor_table(trials, [*conditions, *combo], goal)
            if not table.empty:
                tables[" x ".join(combo)] = table
    return tables


def param_importances(trials: pd.DataFrame, factors: list[str] | None = None,
                      continuous: set[str] = frozenset({"lr"}), goal: Goal = DEFAULT_GOAL) -> pd.Series:
    """Optuna's fANOVA importances of the searched factors for the objective, computed on the trials as MLflow
    recorded them (an in-memory study rebuilt from the table). A factor with many distinct positive values that
    span more than a decade (a learning rate) is taken on a log scale."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    factors = ["optimizer", "hidden", "noise", "lr"] if factors is None else factors
    done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
    columns = [c for c in factors if c in done.columns and done[c].nunique() > 1]
    if len(done) < 4 or not columns:
        return pd.Series(dtype=float)
    distributions = {}
    for column in columns:
        values = done[column]
        if _continuous(values, continuous):
            low, high = float(values.min()), float(values.max())
            distributions[column] = optuna.distributions.FloatDistribution(low, high, log=low > 0 and high / low > 10)
        else:
            distributions[column] = optuna.distributions.CategoricalDistribution(_levels(values))
    study = optuna.create_study(direction=goal.direction)
    for _, row in done.iterrows():
        params = {c: (float(row[c]) if isinstance(distributions[c], optuna.distributions.FloatDistribution) else row[c].item() if hasattr(row[c], "item") else row[c])
                  for c in columns}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row[goal.column])))
    # Optuna's defaults (64 trees of depth 64) take ~8 s on 500 trials; 16 shallower trees rank the same handful
    # of parameters in a fraction of that.
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=16, seed=0)
    return pd.Series(optuna.importance.get_param_importances(study, evaluator=evaluator), name="importance")


def _continuous(values: pd.Series, continuous: set[str] = frozenset()) -> bool:
    """A range rather than levels: searched as one (the sweep says so), or a float column of many values."""
    return values.name in continuous or (pd.api.types.is_float_dtype(values) and values.nunique() > MAX_LEVELS)


# --- output ---------------------------------------------------------------------------------------------------

@dataclass
class Report:
    data: SweepData
    tables: dict[str, pd.DataFrame]
    importances: pd.Series  # over all trials (a sweep without conditions), else the first condition's
    files: list[Path]
    answers: list = field(default_factory=list)  # answer.ConditionAnswer, one per condition

    def to_json(self) -> dict:
        return {"study": self.data.study, "experiment_id": self.data.experiment_id, "factors": self.data.factors,
                "conditions": self.data.conditions, "answers": [a.to_json() for a in self.answers]}


def answers_of(data: SweepData) -> list:
    """The answer per condition: its best setting, what comes close, and which factor matters most there."""
    from .answer import answer_for, conditions_of

    answers = []
    for condition, trials in conditions_of(data.trials, data.conditions):
        try:
            importances = param_importances(trials, data.factors, data.continuous, data.goal)
        except Exception as exc:  # fANOVA needs variety; an answer without it is still an answer
            importances = pd.Series(dtype=float)
            data.notes.append(f"parameter importances unavailable for {condition or 'the study'}: {exc}")
        answers.append(answer_for(condition, trials, data.factors, importances, data.goal))
    return answers


def build_report(study: str, tracking_uri: str, out: Path, log_to_mlflow: bool = True,
                 ui_url: str | None = None) -> Report:
    """The report's files in `out`. Its run links open the MLflow UI at `ui_url` (default $SWEEPLAB_UI_URL, else
    where `sweeplab ui` listens by default, http://127.0.0.1:5000)."""
    import os

    ui_url = (ui_url or os.environ.get("SWEEPLAB_UI_URL") or DEFAULT_UI_URL).rstrip("/")
    data = load_runs(study, tracking_uri)
    tables = all_factor_tables(data.trials, data.factors, data.conditions, data.continuous, data.goal)
    answers = answers_of(data)
    importances = pd.Series(dict(answers[0].important), dtype=float) if answers else pd.Series(dtype=float)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    data.trials.to_csv(out / "trials.csv", index=False)
    data.curves.to_csv(out / "curves.csv", index=False)
    files += [out / "trials.csv", out / "curves.csv"]
    for name, table in tables.items():
        path = out / f"by_{name.replace(' x ', '_x_')}.csv"
        table.to_csv(path, index=False)
        files.append(path)
    report = Report(data, tables, importances, files, answers)
    (out / "answer.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    pictures = _pictures(data, answers)
    for name, png in pictures.items():
        (out / f"{name}.png").write_bytes(png)
        files.append(out / f"{name}.png")
    (out / "summary.md").write_text(_markdown(report))
    (out / "report.html").write_text(_html(report, pictures, ui_url))
    files += [out / "answer.json", out / "summary.md", out / "report.html"]
    if log_to_mlflow and data.parent_run_id:
        Tracker(tracking_uri).log_report(data.parent_run_id, out, "\n\n".join(answer_text(report)))
    return report


DEFAULT_UI_URL = "http://127.0.0.1:5000"


def report_for_sweep(study: str, tracking_uri: str, out: str) -> dict:
    """The report `sweeplab sweep` ends with, built in its background process (background.Forked): the files in
    `out`, and what the sweep then prints and logs to the parent run (`Tracker.log_report`)."""
    report = build_report(study, tracking_uri, Path(out), log_to_mlflow=False)
    return {"tables": terminal_tables(report), "note": "\n\n".join(answer_text(report)),
            "parent_run_id": report.data.parent_run_id}


def warm_up() -> None:
    """A report's first-use costs, paid ahead while a sweep trains: fANOVA's imports (scikit-learn), matplotlib's
    fonts and PNG writer (with the store's modules, tracking.import_store_modules: ~3 s of CPU here)."""
    from matplotlib.figure import Figure
    from optuna.importance import FanovaImportanceEvaluator  # optuna's `importance` attribute is a lazy import

    del FanovaImportanceEvaluator

    fig = Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    ax.plot([1, 2], [1, 2], label="a")
    ax.set(xlabel="x", ylabel="y", title="t", yscale="log")
    ax.legend()
    _png(fig)


def shown_columns(goal: Goal = DEFAULT_GOAL) -> list[str]:
    column = goal.column
    return ["trials", "completed", "pruned", "diverged", "failed", "learned", f"{column}_q1", f"{column}_median",
            f"{column}_q3", f"{column}_{'min' if goal.minimize else 'max'}", "best_epoch_median",
            "epochs_to_converge_median", "best_trial"]


SHOWN = shown_columns()


def short_name(goal: Goal = DEFAULT_GOAL) -> str:
    """`bvl` for best_val_loss, `bva` for best_val_accuracy: the terminal table's column prefix."""
    return "".join(word[0] for word in goal.column.split("_"))


def _short(column: str, goal: Goal = DEFAULT_GOAL) -> str:
    short = {f"{goal.column}_": f"{short_name(goal)}_", "epochs_to_converge_median": "conv_med",
             "best_epoch_median": "best_ep_med"}
    for long, abbreviation in short.items():
        column = column.replace(long, abbreviation)
    return column


def answer_text(report: Report) -> list[str]:
    """The answer, first: one paragraph per condition."""
    factors = report.data.factors
    return [answer.sentence(factors, report.data.goal) for answer in report.answers]


def terminal_tables(report: Report) -> str:
    """The answer, then the per-factor tables (within each condition), compact, for the terminal."""
    counts = report.data.trials["state"].value_counts().to_dict()
    lines = [f"report for {report.data.study}: {len(report.data.trials)} trials ("
             + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ")", ""]
    lines += answer_text(report)
    goal = report.data.goal
    order = shown_columns(goal)
    for name, table in report.tables.items():
        if " x " in name:
            continue
        shown = table[[c for c in table.columns if c not in order] + [c for c in order if c in table.columns]]
        shown = shown.rename(columns=lambda c: _short(c, goal))
        lines += ["", shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    lines += ["", f"({short_name(goal)}: {goal.column} over completed trials: quartiles q1, median, q3 and the "
                  f"{'minimum' if goal.minimize else 'maximum'}; learned: best_val_loss at most {LEARNED_BELOW:g} x the "
                  "baseline of a constant prediction)"]
    return "\n".join(lines)


# --- pictures -------------------------------------------------------------------------------------------------

def _pictures(data: SweepData, answers: list) -> dict[str, bytes]:
    """Drawn with matplotlib's Figure API (no global backend or pyplot state): loss against each continuous
    factor, the median validation curve with its quartile band per level of each factor, parallel coordinates
    over the searched factors, and the optimization history. One row of panels per condition."""
    from .answer import conditions_of

    groups = conditions_of(data.trials, data.conditions)
    pictures = {f"{data.goal.column}_vs_lr": _loss_vs_continuous(data, groups),
                "val_curves": _median_curves(data, groups),
                f"{data.goal.metric}_curves": None if data.goal.is_loss else _median_curves(data, groups,
                                                                                           data.goal.metric),
                "parallel_coordinates": _parallel(data, groups),
                "optuna_history_importance": _history(data, groups, answers)}
    return {name: png for name, png in pictures.items() if png is not None}


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _title(condition: dict, what: str) -> str:
    return f"{what} ({condition_label(condition)})" if condition else what


def _colors(levels: list) -> dict:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {level: palette[i % len(palette)] for i, level in enumerate(levels)}


def _loss_vs_continuous(data: SweepData, groups) -> bytes | None:
    """The objective (best_val_loss) against each continuous factor (lr), log-log for a loss, one colour per level
    of the first factor with levels (optimizer): where each setting's good range lies."""
    continuous = [f for f in data.factors if f in data.trials.columns and _continuous(data.trials[f], data.continuous)]
    if not continuous:
        return None
    x_name = continuous[0]
    hue = next(iter(level_factors(data.trials, data.factors, data.continuous)), None)
    goal = data.goal
    fig, axes = _figure(1, len(groups))
    for ax, (condition, trials) in zip(axes[0], groups):
        done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
        levels = _levels(done[hue]) if hue else [None]
        colors = _colors(levels)
        for level in levels:
            subset = done if level is None else done[done[hue] == level]
            ax.scatter(subset[x_name], subset[goal.column], s=18, alpha=0.8, color=colors[level],
                       label=str(level) if level is not None else None)
        ax.set_xscale("log")
        if goal.is_loss:
            ax.set_yscale("log")
        # on a range of a decade or two matplotlib labels the minor ticks too, and they ran into each other
        ax.tick_params(axis="x", which="both", labelrotation=35, labelsize=7)
        ax.set_xlabel(f"{x_name} (log scale)")
        ax.set_ylabel(_value_label(data))
        ax.set_title(_title(condition, f"{goal.column} against {x_name}"))
        ax.grid(True, which="major", alpha=0.3)
        if hue:
            ax.legend(title=hue, fontsize=8)
    return _png(fig)


def _is_mse(data: SweepData) -> bool:
    return "task" not in data.trials.columns or (data.trials["task"] == "regression").all()


def _loss_name(data: SweepData) -> str:
    """What the validation loss is: MSE for regression (the default loss), cross-entropy for classifiers."""
    if _is_mse(data):
        return "MSE"
    return "cross-entropy"


def _value_label(data: SweepData, scale: bool = True) -> str:
    """The objective's axis label: `best validation loss (MSE, log scale)`, `best validation accuracy`."""
    goal = data.goal
    if goal.is_loss:
        return f"best validation loss ({_loss_name(data)}{', log scale' if scale else ''})"
    return f"best {goal.label} (higher is better)"

def _median_curves(data: SweepData, groups, split: str = "val") -> bytes | None:
    """Per level of each factor with levels: the median validation curve (val_loss, log y; or the objective's
    metric, `split`) of its completed trials and the band between their quartiles: how each level converges, not
    a tangle of single curves."""
    factors = level_factors(data.trials, data.factors, data.continuous) or [None]
    fig, axes = _figure(len(groups), len(factors))
    val = data.curves[data.curves["split"] == split]
    loss = split == "val"
    what = "validation loss" if loss else data.goal.label
    for row, (condition, trials) in zip(axes, groups):
        done = trials[trials["state"] == "completed"]
        for ax, factor in zip(row, factors):
            levels = _levels(done[factor]) if factor else [None]
            colors = _colors(levels)
            for level in levels:
                # by run: trial numbers start again in each condition's study
                members = done["run_id"] if level is None else done.loc[done[factor] == level, "run_id"]
                curves = val[val["run_id"].isin(members)].pivot_table(index="epoch", columns="run_id", values="loss")
                if curves.empty:
                    continue
                median = curves.median(axis=1)
                ax.plot(median.index, median.values, color=colors[level],
                        label=f"{level} ({curves.shape[1]})" if level is not None else f"all ({curves.shape[1]})")
                ax.fill_between(median.index, curves.quantile(0.25, axis=1), curves.quantile(0.75, axis=1),
                                color=colors[level], alpha=0.15, linewidth=0)
            if loss:
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"validation {_loss_name(data)} (median, quartiles; log)" if loss else
                          f"{what} (median, quartiles)")
            ax.set_title(_title(condition, f"{what} by {factor}" if factor else what))
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(title=f"{factor} (trials)" if factor else None, fontsize=8)
    return _png(fig)


def _parallel(data: SweepData, groups) -> bytes | None:
    """Parallel coordinates: one line per completed trial across the searched factors (levels in order,
    continuous ones on a log scale, each axis scaled to 0..1), coloured by its objective (a loss on a log scale):
    which combinations the good trials share."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    axes_names = [f for f in data.factors if f in data.trials.columns and data.trials[f].nunique() > 1]
    if len(axes_names) < 2:
        return None
    goal = data.goal
    fig, axes = _figure(1, len(groups), width=6.5)
    for ax, (condition, trials) in zip(axes[0], groups):
        done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
        if done.empty:
            continue
        scaled = {}
        ticks = {}
        for name in axes_names:
            values = done[name]
            if _continuous(data.trials[name], data.continuous):
                logs = np.log10(values.astype(float))
                low, high = logs.min(), logs.max()
                scaled[name] = (logs - low) / ((high - low) or 1)
                ticks[name] = (f"{10 ** low:.2g}", f"{10 ** high:.2g}")
            else:
                levels = _levels(data.trials[name])
                position = {level: i / max(len(levels) - 1, 1) for i, level in enumerate(levels)}
                scaled[name] = values.map(position)
                ticks[name] = (str(levels[0]), str(levels[-1]))
        losses = goal.values(done)
        if goal.is_loss:
            norm = LogNorm(vmin=max(losses.min(), 1e-12), vmax=max(losses.max(), losses.min() * 1.0001, 1e-12))
        else:
            from matplotlib.colors import Normalize

            norm = Normalize(vmin=losses.min(), vmax=max(losses.max(), losses.min() + 1e-9))
        cmap = colormaps["viridis_r" if goal.minimize else "viridis"]
        ranked = losses.to_numpy() if goal.minimize else -losses.to_numpy()
        order = np.argsort(-ranked)  # the best drawn last, on top
        xs = np.arange(len(axes_names))
        for i in order:
            ys = [scaled[name].iloc[i] for name in axes_names]
            ax.plot(xs, ys, color=cmap(norm(losses.iloc[i])), alpha=0.7, linewidth=1.2)
        ax.set_xticks(xs, [f"{name}\n{ticks[name][0]} .. {ticks[name][1]}" for name in axes_names])
        ax.set_yticks([0, 1], ["low", "high"])
        ax.set_ylabel("scaled position (log for ranges)")
        ax.set_title(_title(condition, "parallel coordinates"))
        from matplotlib.cm import ScalarMappable

        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=_value_label(data))
    return _png(fig)


def _history(data: SweepData, groups, answers: list) -> bytes:
    goal = data.goal
    fig, axes = _figure(len(groups), 2)
    for (left, right), (condition, trials), answer in zip(axes, groups, answers):
        done = trials[trials["state"] == "completed"].sort_values("trial")
        left.scatter(done["trial"], goal.values(done), s=12, label="trial")
        left.plot(done["trial"], goal.cumulative_best(goal.values(done)), color="C1", label="best so far")
        if goal.is_loss:
            left.set_yscale("log")
        left.set_xlabel("trial number")
        left.set_ylabel(_value_label(data))
        left.set_title(_title(condition, "optimization history"))
        left.legend()
        if answer.important:
            names = [name for name, _ in answer.important][::-1]
            right.barh(names, [value for _, value in answer.important][::-1])
        right.set_xlabel(f"share of {goal.column} variance explained (fANOVA)")
        right.set_title(_title(condition, "parameter importance"))
    return _png(fig)


def _levels(column: pd.Series) -> list:
    """A factor's values in natural order: numbers numerically, names alphabetically."""
    return sorted(column.dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v))


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


# --- text -----------------------------------------------------------------------------------------------------

def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _top(data: SweepData, n: int = 10) -> pd.DataFrame:
    trials, goal = data.trials, data.goal
    columns = [c for c in ["trial", *data.conditions, *data.factors, *dict.fromkeys([goal.column, "best_val_loss"]),
                           "best_epoch", "epochs_to_converge", "gap_at_best", "run_id"] if c in trials.columns]
    done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
    if data.conditions:  # the best of each condition, then the next best
        done = done.assign(_rank=done.groupby(data.conditions)[goal.column].rank(method="first",
                                                                                   ascending=goal.minimize))
        return done.sort_values(["_rank", goal.column], ascending=[True, goal.minimize])[columns].head(n)
    return done.sort_values(goal.column, ascending=goal.minimize)[columns].head(n)


def _shown(table: pd.DataFrame, goal: Goal = DEFAULT_GOAL) -> pd.DataFrame:
    order = shown_columns(goal)
    return table[[c for c in table.columns if c not in order and not c.startswith((goal.column, "best_epoch",
                                                                                    "epochs_to"))]
                 + [c for c in order if c in table.columns]]


def _markdown(report: Report) -> str:
    data = report.data
    parts = [f"# Sweep report: {data.study}", "", *answer_text(report), "", f"{len(data.trials)} trials: "
             + ", ".join(f"{n} {s}" for s, n in sorted(data.trials['state'].value_counts().items())), "",
             "## Best trials", "", _markdown_table(_top(data))]
    for name, table in report.tables.items():
        parts += ["", f"## By {name}", "", _markdown_table(_shown(table, data.goal))]
    parts += [""] + [f"Note: {note}" for note in data.notes]
    return "\n".join(parts) + "\n"


def _html(report: Report, pictures: dict[str, bytes], ui_url: str) -> str:
    """report.html from templates/report.html.j2 (autoescaped; the tables pandas renders are marked safe)."""
    import jinja2

    data = report.data
    top = _top(data)
    links = top.copy()
    if "run_id" in links.columns and data.experiment_id:
        links["run_id"] = [f'<a href="{html.escape(run_link(ui_url, data.experiment_id, run))}">{run[:8]}</a>'
                           for run in links["run_id"]]
    number = lambda v: f"{v:.4g}"  # noqa: E731
    environment = jinja2.Environment(loader=jinja2.PackageLoader("sweeplab", "templates"), autoescape=True,
                                     keep_trailing_newline=True)
    return environment.get_template("report.html.j2").render(
        study=data.study, answer=answer_text(report), n_trials=len(data.trials),
        counts=", ".join(f"{n} {s}" for s, n in sorted(data.trials["state"].value_counts().items())),
        ui_url=ui_url, best_trials=links.to_html(index=False, escape=False, float_format=number),
        pictures=[(name, base64.b64encode(png).decode()) for name, png in pictures.items()],
        tables=[(name, _shown(table, data.goal).to_html(index=False, float_format=number))
                for name, table in report.tables.items()],
        notes=data.notes, objective=data.goal.column, better="lower" if data.goal.minimize else "higher",
        loss=_loss_name(data))
