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
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .tracking import TAG_OUTCOME, TAG_ROLE, TAG_TRIAL, Tracker

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
    parents = sorted((r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"), key=lambda r: r.info.start_time)
    curves = _curves(client, [r.info.run_id for r in trial_runs])
    trials = _trial_frame(trial_runs, curves)
    curves = curves.merge(trials[["run_id", "trial"]], on="run_id")[["trial", "run_id", "epoch", "split", "loss"]]
    return SweepData(study, trials, curves.sort_values(["trial", "split", "epoch"], ignore_index=True),
                     parents[-1].info.run_id if parents else None)


def _search_all(client, experiment_id: str):
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _curves(client, run_ids: list[str]) -> pd.DataFrame:
    """train_loss and val_loss of every run, as rows (run_id, epoch, split, loss)."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    fast = _select_curves(store, run_ids)  # a database store: one SELECT per chunk of runs
    if fast is not None:
        return fast
    rows: list[tuple[str, int, str, float]] = []
    for key, split in (("train_loss", "train"), ("val_loss", "val")):  # a tracking server: parallel requests
        with ThreadPoolExecutor(max_workers=8) as pool:
            for run_id, history in zip(run_ids, pool.map(lambda r: client.get_metric_history(r, key), run_ids)):
                rows.extend((run_id, m.step, split, m.value) for m in history)
    frame = pd.DataFrame(rows, columns=["run_id", "epoch", "split", "loss"])
    # a metric logged twice for one step (a retried flush) counts once
    return frame.drop_duplicates(["run_id", "epoch", "split"], keep="last")


def _select_curves(store, run_ids: list[str]) -> pd.DataFrame | None:
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
                     .where(SqlMetric.key.in_(["train_loss", "val_loss"]),
                            SqlMetric.run_uuid.in_(run_ids[start:start + BULK_RUNS])))
            frames.append(pd.DataFrame(connection.execute(query).all(),
                                       columns=["run_id", "epoch", "key", "loss", "is_nan", "timestamp"]))
    frame = pd.concat(frames, ignore_index=True)
    frame["loss"] = frame["loss"].astype(float).where(~frame["is_nan"].astype(bool), math.nan)
    frame["epoch"] = frame["epoch"].astype(int)
    frame["split"] = frame["key"].map({"train_loss": "train", "val_loss": "val"})
    frame = frame.sort_values(["run_id", "split", "epoch", "timestamp"])
    return frame.drop_duplicates(["run_id", "epoch", "split"], keep="last")[["run_id", "epoch", "split", "loss"]]


def _trial_frame(runs, curves: pd.DataFrame) -> pd.DataFrame:
    records = []
    by_run = {run_id: group for run_id, group in curves.groupby("run_id")}
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        record = {"trial": int(tags[TAG_TRIAL]) if TAG_TRIAL in tags else -1, "run_id": run.info.run_id,
                  "run_name": run.info.run_name, "state": tags.get(TAG_OUTCOME, run.info.status.lower()),
                  "reason": tags.get("sweeplab.reason", "")}
        for param, column in PARAM_COLUMNS.items():
            if param in params:
                record[column] = _number(params[param])
        record["baseline_val_loss"] = metrics.get("baseline_val_loss", math.nan)
        record.update(_curve_stats(by_run.get(run.info.run_id), record["baseline_val_loss"]))
        if "epochs_run" in metrics:  # the curves leave out a diverged run's last, non-finite epoch
            record["epochs_run"] = int(metrics["epochs_run"])
        if "best_val_loss" in metrics and record["state"] == "completed":
            record["best_val_loss"] = metrics["best_val_loss"]  # the logged summary is the system of record
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


def _curve_stats(curve: pd.DataFrame | None, baseline: float = math.nan) -> dict:
    """Per-trial convergence numbers, computed from the logged curves. `learned`: the best validation loss is at
    most LEARNED_BELOW times the baseline (a constant prediction fitted on the training labels; for MSE, R^2 of
    at least 0.5); unknown (True) for runs logged without a baseline. A run that never learned has no
    epochs_to_converge: being within 5% of a best that is no better than guessing is not converging."""
    empty = {"learned": False, "best_val_loss": math.nan, "best_epoch": 0, "epochs_run": 0, "final_train_loss": math.nan,
             "final_val_loss": math.nan, "gap_at_best": math.nan, "epochs_to_converge": math.nan,
             "auc_val_loss": math.nan}
    if curve is None or curve.empty:
        return empty
    val = curve[curve["split"] == "val"].set_index("epoch")["loss"].sort_index()
    train = curve[curve["split"] == "train"].set_index("epoch")["loss"].sort_index()
    finite = val[np.isfinite(val)]
    if finite.empty:
        return {**empty, "epochs_run": int(val.index.max())}
    best_epoch = int(finite.idxmin())  # first epoch of the minimum, as the loop keeps the first best
    best = float(finite.min())
    within = finite[finite <= best + CONVERGED_WITHIN * abs(best)]
    learned = not best > LEARNED_BELOW * baseline  # NaN baseline: not known, so not ruled out
    return {
        "learned": learned,
        "best_val_loss": best,
        "best_epoch": best_epoch,
        "epochs_run": int(val.index.max()),
        "final_train_loss": float(train.iloc[-1]) if len(train) else math.nan,
        "final_val_loss": float(val.iloc[-1]),
        "gap_at_best": best - float(train.get(best_epoch, math.nan)),
        "epochs_to_converge": int(within.index.min()) if learned else math.nan,
        "auc_val_loss": float(np.trapezoid(finite.to_numpy(), finite.index.to_numpy())) if len(finite) > 1 else best,
    }


# --- tables ---------------------------------------------------------------------------------------------------

def factor_table(trials: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """One row per value (or pair of values) of the factors: how many trials ended how, and the spread of
    best_val_loss, best_epoch and epochs-to-converge over the completed ones, with the best trial of each."""
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
        for metric in ("best_val_loss", "best_epoch", "epochs_to_converge"):
            values = done[metric].astype(float)
            row[f"{metric}_mean"] = values.mean()
            row[f"{metric}_median"] = values.median()
            row[f"{metric}_std"] = values.std()
            row[f"{metric}_min"] = values.min()
        row["best_trial"] = int(done.loc[done["best_val_loss"].idxmin(), "trial"]) if len(done) else None
        rows.append(row)
    return pd.DataFrame(rows)


def all_factor_tables(trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every single factor and every pair, keyed by name ("optimizer", "optimizer x hidden")."""
    tables = {}
    for size in (1, 2):
        for combo in itertools.combinations(FACTORS, size):
            table = factor_table(trials, list(combo))
            if not table.empty:
                tables[" x ".join(combo)] = table
    return tables


def param_importances(trials: pd.DataFrame) -> pd.Series:
    """Optuna's fANOVA importances of optimizer, hidden, noise and lr for best_val_loss, computed on the trials
    as MLflow recorded them (an in-memory study rebuilt from the table)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = trials[trials["state"] == "completed"].dropna(subset=["best_val_loss"])
    columns = [c for c in ["optimizer", "hidden", "noise", "lr"] if c in done.columns and done[c].nunique() > 1]
    if len(done) < 4 or not columns:
        return pd.Series(dtype=float)
    distributions = {}
    for column in columns:
        if column == "lr":
            distributions[column] = optuna.distributions.FloatDistribution(float(done[column].min()),
                                                                           float(done[column].max()), log=True)
        else:
            distributions[column] = optuna.distributions.CategoricalDistribution(sorted(done[column].unique().tolist()))
    study = optuna.create_study(direction="minimize")
    for _, row in done.iterrows():
        params = {c: (float(row[c]) if c == "lr" else row[c].item() if hasattr(row[c], "item") else row[c])
                  for c in columns}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row["best_val_loss"])))
    # Optuna's defaults (64 trees of depth 64) take ~8 s on 500 trials; 16 shallower trees rank the same handful
    # of parameters in a fraction of that.
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=16, seed=0)
    return pd.Series(optuna.importance.get_param_importances(study, evaluator=evaluator), name="importance")


# --- output ---------------------------------------------------------------------------------------------------

@dataclass
class Report:
    data: SweepData
    tables: dict[str, pd.DataFrame]
    importances: pd.Series
    files: list[Path]


def build_report(study: str, tracking_uri: str, out: Path, log_to_mlflow: bool = True) -> Report:
    data = load_runs(study, tracking_uri)
    tables = all_factor_tables(data.trials)
    try:
        importances = param_importances(data.trials)
    except Exception as exc:  # fANOVA needs variety; a report without it is still a report
        importances = pd.Series(dtype=float)
        data.notes.append(f"parameter importances unavailable: {exc}")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    data.trials.to_csv(out / "trials.csv", index=False)
    data.curves.to_csv(out / "curves.csv", index=False)
    files += [out / "trials.csv", out / "curves.csv"]
    for name, table in tables.items():
        path = out / f"by_{name.replace(' x ', '_x_')}.csv"
        table.to_csv(path, index=False)
        files.append(path)
    pictures = _pictures(data, importances)
    for name, png in pictures.items():
        (out / f"{name}.png").write_bytes(png)
        files.append(out / f"{name}.png")
    (out / "summary.md").write_text(_markdown(data, tables, importances))
    (out / "report.html").write_text(_html(data, tables, importances, pictures))
    files += [out / "summary.md", out / "report.html"]
    if log_to_mlflow and data.parent_run_id:
        Tracker(tracking_uri).client.log_artifacts(data.parent_run_id, str(out), "report")
    return Report(data, tables, importances, files)


SHOWN = ["trials", "completed", "pruned", "diverged", "failed", "best_val_loss_mean", "best_val_loss_median",
         "best_val_loss_std", "best_val_loss_min", "best_epoch_median", "epochs_to_converge_median", "best_trial"]


def terminal_tables(report: Report) -> str:
    """The per-factor tables, compact, for the terminal."""
    counts = report.data.trials["state"].value_counts().to_dict()
    lines = [f"report for {report.data.study}: {len(report.data.trials)} trials ("
             + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ")"]
    for name in FACTORS:
        table = report.tables.get(name)
        if table is None:
            continue
        shown = table[[name] + [c for c in SHOWN if c in table.columns]].copy()
        shown.columns = [c.replace("best_val_loss", "bvl").replace("epochs_to_converge", "conv")
                         .replace("best_epoch", "best_ep") for c in shown.columns]
        lines += ["", shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    if len(report.importances):
        lines += ["", "parameter importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in report.importances.items())]
    return "\n".join(lines)


def _pictures(data: SweepData, importances: pd.Series) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    trials, curves = data.trials, data.curves
    factors = [f for f in FACTORS if f in trials.columns]
    pictures = {}
    val = curves[curves["split"] == "val"]
    fig, axes = plt.subplots(1, max(len(factors), 1), figsize=(5 * max(len(factors), 1), 4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        levels = _levels(trials[factor])
        colors = dict(zip(levels, plt.cm.tab10.colors))
        level_of = dict(zip(trials["trial"], trials[factor]))
        segments, segment_colors = [], []
        for trial, curve in val.groupby("trial"):
            finite = curve[np.isfinite(curve["loss"]) & (curve["loss"] > 0)]
            segments.append(np.column_stack([finite["epoch"].to_numpy(), finite["loss"].to_numpy()]))
            segment_colors.append(colors.get(level_of.get(trial), "grey"))
        # one LineCollection draws hundreds of curves far faster than one plot() each
        ax.add_collection(LineCollection(segments, colors=segment_colors, alpha=0.5, linewidths=0.8))
        ax.autoscale()
        for level in levels:
            ax.plot([], [], color=colors[level], label=str(level))
        ax.set_yscale("log")
        ax.set_title(f"validation loss by {factor}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    pictures["val_curves"] = _png(fig)
    done = trials[trials["state"] == "completed"]
    fig, axes = plt.subplots(1, max(len(factors), 1), figsize=(5 * max(len(factors), 1), 4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        levels = _levels(done[factor])
        groups = [done.loc[done[factor] == level, "best_val_loss"].dropna().to_numpy() for level in levels]
        if any(len(g) for g in groups):
            ax.boxplot(groups, showfliers=False)
            for i, group in enumerate(groups, start=1):
                ax.scatter(np.full(len(group), i) + np.linspace(-0.15, 0.15, len(group)), group, s=10, alpha=0.7)
            ax.set_xticks(range(1, len(levels) + 1), [str(level) for level in levels])
            ax.set_yscale("log")
        ax.set_title(f"best_val_loss by {factor}")
    pictures["best_val_loss_by_factor"] = _png(fig)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ordered = done.sort_values("trial")
    left.scatter(ordered["trial"], ordered["best_val_loss"], s=10, label="trial")
    left.plot(ordered["trial"], ordered["best_val_loss"].cummin(), color="C1", label="best so far")
    left.set_yscale("log")
    left.set_title("optimization history")
    left.set_xlabel("trial")
    left.legend()
    if len(importances):
        right.barh(list(importances.index)[::-1], list(importances.values)[::-1])
    right.set_title("parameter importance (fANOVA)")
    pictures["optuna_history_importance"] = _png(fig)
    return pictures


def _levels(column: pd.Series) -> list:
    """A factor's values in natural order: numbers numerically, names alphabetically."""
    return sorted(column.dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v))


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _top(trials: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    columns = [c for c in ["trial", "state", "optimizer", "hidden", "noise", "lr", "best_val_loss", "best_epoch",
                           "epochs_to_converge", "gap_at_best", "run_id"] if c in trials.columns]
    return trials[trials["state"] == "completed"].sort_values("best_val_loss")[columns].head(n)


def _markdown(data: SweepData, tables: dict[str, pd.DataFrame], importances: pd.Series) -> str:
    parts = [f"# Sweep report: {data.study}", "", f"{len(data.trials)} trials: "
             + ", ".join(f"{n} {s}" for s, n in sorted(data.trials['state'].value_counts().items())), "",
             "## Best trials", "", _markdown_table(_top(data.trials))]
    for name, table in tables.items():
        parts += ["", f"## By {name}", "", _markdown_table(table[[c for c in table.columns
                                                                   if c in name.split(' x ') or c in SHOWN]])]
    if len(importances):
        parts += ["", "## Parameter importance (fANOVA)", "",
                  _markdown_table(importances.rename_axis("parameter").reset_index())]
    parts += [""] + [f"Note: {note}" for note in data.notes]
    return "\n".join(parts) + "\n"


def _html(data: SweepData, tables: dict[str, pd.DataFrame], importances: pd.Series, pictures: dict[str, bytes]) -> str:
    body = [f"<h1>Sweep report: {html.escape(data.study)}</h1>",
            f"<p>{len(data.trials)} trials: " + ", ".join(
                f"{n} {html.escape(str(s))}" for s, n in sorted(data.trials['state'].value_counts().items())) + "</p>"]
    for name, png in pictures.items():
        body.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    body += ["<h2>Best trials</h2>", _top(data.trials).to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    for name, table in tables.items():
        body += [f"<h2>By {html.escape(name)}</h2>", table.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    if len(importances):
        body += ["<h2>Parameter importance (fANOVA)</h2>", importances.to_frame().to_html(float_format=lambda v: f"{v:.3f}")]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%;display:block}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.study)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
