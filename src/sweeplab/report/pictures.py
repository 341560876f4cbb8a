"""The report's pictures (PNG bytes, every axis labelled): the objective against each continuous factor (lr), the
median curves per level, a parallel-coordinates view and Optuna-style history with importances."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from sweeplab.config import LOSSES
from sweeplab.report.answer import conditions_of
from sweeplab.report.load import SweepData
from sweeplab.report.tables import is_continuous, level_factors, levels_of
from sweeplab.track.tracker import condition_label


def draw(data: SweepData, answers: list, confirmed: list = ()) -> dict[str, bytes]:
    """Drawn with matplotlib's Figure API (no global backend or pyplot state): loss against each continuous
    factor, the median validation curve with its quartile band per level of each factor, parallel coordinates
    over the searched factors, and the optimization history. One row of panels per condition."""
    groups = conditions_of(data.trials, data.conditions)
    pictures = {
        f"{data.goal.column}_vs_lr": _loss_vs_continuous(data, groups),
        "val_curves": _median_curves(data, groups),
        f"{data.goal.metric}_curves": None if data.goal.is_loss else _median_curves(data, groups, data.goal.metric),
        "parallel_coordinates": _parallel(data, groups),
        "optuna_history_importance": _history(data, groups, answers),
        "confirmed_over_seeds": _seeds(data, confirmed) if confirmed else None,
    }
    return {name: png for name, png in pictures.items() if png is not None}


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.8):
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _title(condition: dict, what: str) -> str:
    return f"{what} ({condition_label(condition)})" if condition else what


def _colors(levels: list) -> dict:
    palette = colormaps["tab10"].colors
    return {level: palette[i % len(palette)] for i, level in enumerate(levels)}


def _loss_vs_continuous(data: SweepData, groups) -> bytes | None:
    """The objective (best_val_loss) against each continuous factor (lr), log-log for a loss, one colour per level
    of the first factor with levels (optimizer): where each setting's good range lies."""
    continuous = [
        f for f in data.factors if f in data.trials.columns and is_continuous(data.trials[f], data.continuous)
    ]
    if not continuous:
        return None
    x_name = continuous[0]
    hue = next(iter(level_factors(data.trials, data.factors, data.continuous)), None)
    goal = data.goal
    fig, axes = _figure(1, len(groups))
    for ax, (condition, trials) in zip(axes[0], groups):
        done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
        levels = levels_of(done[hue]) if hue else [None]
        colors = _colors(levels)
        for level in levels:
            subset = done if level is None else done[done[hue] == level]
            ax.scatter(
                subset[x_name],
                subset[goal.column],
                s=18,
                alpha=0.8,
                color=colors[level],
                label=str(level) if level is not None else None,
            )
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


NAMED_LOSSES = {name: label for name, (task, _, label) in LOSSES.items() if task == "regression"}


def loss_name(data: SweepData) -> str:
    """What the validation loss is: the trials' loss (a class by its name: `BCEWithLogitsLoss`), or by default MSE
    for regression and cross-entropy for classifiers; "loss" when the trials' losses differ."""
    trials = data.trials
    names = set()
    for _, row in trials.iterrows():
        given = row.get("loss_class") if "loss_class" in trials.columns else None
        if isinstance(given, str):
            names.add(given)
        elif _is_mse(data):
            names.add(NAMED_LOSSES.get(row.get("loss") if "loss" in trials.columns else "mse", "MSE"))
        else:
            names.add("cross-entropy")
    return names.pop() if len(names) == 1 else "loss"


def _value_label(data: SweepData, scale: bool = True) -> str:
    """The objective's axis label: `best validation loss (MSE, log scale)`, `best validation accuracy`."""
    goal = data.goal
    if goal.is_loss:
        return f"best validation loss ({loss_name(data)}{', log scale' if scale else ''})"
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
            levels = levels_of(done[factor]) if factor else [None]
            colors = _colors(levels)
            for level in levels:
                # by run: trial numbers start again in each condition's study
                members = done["run_id"] if level is None else done.loc[done[factor] == level, "run_id"]
                curves = val[val["run_id"].isin(members)].pivot_table(index="epoch", columns="run_id", values="loss")
                if curves.empty:
                    continue
                median = curves.median(axis=1)
                ax.plot(
                    median.index,
                    median.values,
                    color=colors[level],
                    label=f"{level} ({curves.shape[1]})" if level is not None else f"all ({curves.shape[1]})",
                )
                ax.fill_between(
                    median.index,
                    curves.quantile(0.25, axis=1),
                    curves.quantile(0.75, axis=1),
                    color=colors[level],
                    alpha=0.15,
                    linewidth=0,
                )
            if loss:
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            label = f"validation {loss_name(data)} (median, quartiles; log)" if loss else f"{what} (median, quartiles)"
            ax.set_ylabel(textwrap.fill(label, 36))  # a long loss name (BCEWithLogitsLoss) on two lines, not cut
            ax.set_title(textwrap.fill(_title(condition, f"{what} by {factor}" if factor else what), 48))
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(title=f"{factor} (trials)" if factor else None, fontsize=8)
    return _png(fig)


def _parallel(data: SweepData, groups) -> bytes | None:
    """Parallel coordinates: one line per completed trial across the searched factors (levels in order,
    continuous ones on a log scale, each axis scaled to 0..1), coloured by its objective (a loss on a log scale):
    which combinations the good trials share."""
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
            if is_continuous(data.trials[name], data.continuous):
                logs = np.log10(values.astype(float))
                low, high = logs.min(), logs.max()
                scaled[name] = (logs - low) / ((high - low) or 1)
                ticks[name] = (f"{10**low:.2g}", f"{10**high:.2g}")
            else:
                levels = levels_of(data.trials[name])
                position = {level: i / max(len(levels) - 1, 1) for i, level in enumerate(levels)}
                scaled[name] = values.map(position)
                ticks[name] = (str(levels[0]), str(levels[-1]))
        losses = goal.values(done)
        if goal.is_loss:
            norm = LogNorm(vmin=max(losses.min(), 1e-12), vmax=max(losses.max(), losses.min() * 1.0001, 1e-12))
        else:
            norm = Normalize(vmin=losses.min(), vmax=max(losses.max(), losses.min() + 1e-9))
        cmap = colormaps["viridis_r" if goal.minimize else "viridis"]
        ranked = losses.to_numpy() if goal.minimize else -losses.to_numpy()
        order = np.argsort(-ranked)  # the best drawn last, on top
        xs = np.arange(len(axes_names))
        for i in order:
            ys = [scaled[name].iloc[i] for name in axes_names]
            ax.plot(xs, ys, color=cmap(norm(losses.iloc[i])), alpha=0.7, linewidth=1.2)
        ax.set_xticks(xs, [f"{name}\n{ticks[name][0]} .. {ticks[name][1]}" for name in axes_names])
        if max(map(len, axes_names)) * len(axes_names) > 48:  # long dotted keys would run into each other
            for label in ax.get_xticklabels():
                label.set(rotation=25, horizontalalignment="right", rotation_mode="anchor")
        ax.set_yticks([0, 1], ["low", "high"])
        ax.set_ylabel("scaled position (log for ranges)")
        ax.set_title(_title(condition, "parallel coordinates"))

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


def _seeds(data: SweepData, confirmed: list) -> bytes:
    """Per condition: each repeated configuration (best mean first, left) with every seed's value as a dot, its
    mean as a bar and ± one std as a line: whether the leader's lead is larger than the seeds' spread."""
    fig, axes = _figure(1, len(confirmed), width=max(5.0, 1.2 * max(len(c.values) for c in confirmed) + 2))
    for ax, found in zip(axes[0], confirmed):
        for x, row in enumerate(found.table.itertuples(index=False)):
            values = found.values[row.trial]
            ax.scatter([x] * len(values), values, s=18, color="C0", alpha=0.7, label="one seed" if x == 0 else None)
            ax.errorbar(
                x,
                row.mean,
                yerr=row.std,
                fmt="_",
                markersize=22,
                color="C1",
                capsize=6,
                label="mean ± std" if x == 0 else None,
            )
        ax.set_xticks(range(len(found.table)), [f"#{int(t)}" for t in found.table["trial"]])
        ax.set_xlabel("configuration (search trial), best mean first")
        ax.set_ylabel(_value_label(data, scale=False).replace("best ", "", 1) + " at the best epoch")
        ax.set_title(_title(found.condition, "confirmed over seeds"))
        ax.legend()
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def warm_up() -> None:
    """A report's first-use costs, paid ahead while a sweep trains: fANOVA's imports (scikit-learn), matplotlib's
    fonts and PNG writer (with the store's modules, tracking.import_store_modules: ~3 s of CPU here)."""
    from optuna.importance import FanovaImportanceEvaluator  # optuna's `importance` attribute is a lazy import

    del FanovaImportanceEvaluator

    fig = Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    ax.plot([1, 2], [1, 2], label="a")
    ax.set(xlabel="x", ylabel="y", title="t", yscale="log")
    ax.legend()
    _png(fig)
