"""The sweep's answer, per condition: which setting wins, what else comes close, which factor matters most.

Built on the report's tidy frame of trials (report/load.py) (one row per run, read back from MLflow). Statistics are robust: a
level's median and quartiles of best_val_loss, never a mean that a few non-learners decide; diverged and failed
trials are counted, not dropped. A trial "learned" when its best_val_loss is at most half its baseline (the loss
of a constant prediction fitted on the training labels: report.load.LEARNED_BELOW). The report's tables and pictures are report/; this module is what they conclude.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sweeplab.config import objective_column
from sweeplab.track.tracker import condition_label, value_text

NEAR_BEST = 0.10  # "close to the best": a loss within 10% of the condition's best (an accuracy: its error rate)
OUTCOMES = ("completed", "pruned", "diverged", "failed", "killed")
LABELS = {
    "val_loss": "validation loss",
    "val_accuracy": "validation accuracy",
    "val_f1": "validation F1",
    "val_macro_f1": "validation macro-F1",
    "val_precision": "validation precision",
    "val_recall": "validation recall",
}


@dataclass(frozen=True)
class Goal:
    """The sweep's objective as the report reads it: which summary column ranks the trials, and which way."""

    metric: str = "val_loss"
    direction: str = "minimize"

    @classmethod
    def parse(cls, text: str | None) -> "Goal":
        """From the `val_accuracy maximize` the sweep logs (parent param `objective`, trial tag)."""
        parts = (text or "").split()
        return cls(parts[0], parts[1]) if len(parts) == 2 else cls()

    column = property(lambda self: objective_column(self.metric))
    minimize = property(lambda self: self.direction == "minimize")

    @property
    def label(self) -> str:
        return LABELS.get(self.metric, self.metric)

    @property
    def is_loss(self) -> bool:
        return self.metric.endswith("loss")

    def values(self, frame: pd.DataFrame) -> pd.Series:
        return frame[self.column].astype(float) if self.column in frame else pd.Series(np.nan, index=frame.index)

    def best_index(self, values: pd.Series):
        return values.idxmin() if self.minimize else values.idxmax()

    def near(self, values: pd.Series, best: float) -> pd.Series:
        """Within NEAR_BEST of the best: of the loss, or, for a score of at most 1 (accuracy, F1), of its error."""
        if self.minimize:
            return values <= best * (1 + NEAR_BEST) if best >= 0 else values <= best * (1 - NEAR_BEST)
        return (1 - values) <= (1 - best) * (1 + NEAR_BEST) + 1e-12

    def cumulative_best(self, values: pd.Series) -> pd.Series:
        return values.cummin() if self.minimize else values.cummax()


DEFAULT_GOAL = Goal()


@dataclass
class ConditionAnswer:
    condition: dict  # {"noise": 0.3}, {} without conditions
    counts: dict[str, int]
    best: dict | None  # trial, run_id, params, best_val_loss, best_epoch
    near: dict[str, list]  # factor -> the values seen among trials within NEAR_BEST of the best
    n_near: int
    important: list[tuple[str, float]] = field(default_factory=list)  # (factor, fANOVA importance), largest first
    any_value: list[str] = field(default_factory=list)  # factors whose every level tried comes close to the best

    @property
    def label(self) -> str:
        return condition_label(self.condition)

    def sentence(self, factors: list[str], goal: Goal = DEFAULT_GOAL) -> str:
        where = f"{self.label}: " if self.condition else ""
        if self.best is None:
            return f"{where}no trial completed ({_counts_text(self.counts)})."
        setting = ", ".join(
            f"{f} {value_text(self.best['params'].get(f))}" for f in factors if f in self.best["params"]
        )
        value = self.best.get(goal.column, self.best.get("best_val_loss"))
        text = (
            f"{where}best is {setting}: {goal.label} {value:.4g} "
            f"(trial #{self.best['trial']}, epoch {self.best['best_epoch']})."
        )
        spread = "; ".join(
            f"any {f}" if f in self.any_value else f"{f} {_range_text(values)}"
            for f, values in self.near.items()
            if values
        )
        if self.n_near > 1 and spread:
            text += f" Within {NEAR_BEST:.0%} of it ({self.n_near} trials): {spread}."
        if self.important:
            name, share = self.important[0]
            text += f" {name} matters most (fANOVA importance {share:.2f})."
        return f"{text} {_counts_text(self.counts).capitalize()}."

    def to_json(self) -> dict:
        return {
            "condition": self.condition,
            "best": self.best,
            "near_best": {"within": NEAR_BEST, "trials": self.n_near, "values": self.near},
            "importance": dict(self.important),
            "trials": self.counts,
        }


def _range_text(values: list) -> str:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(values) > 2:
        return f"{value_text(min(values))}-{value_text(max(values))}"
    return " or ".join(value_text(v) for v in values)


def _counts_text(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    parts = [f"{n} {state}" for state, n in counts.items() if n]
    return f"{total} trials: " + ", ".join(parts) if parts else "no trials"


def conditions_of(trials: pd.DataFrame, condition_keys: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    """(condition values, its trials) for each condition, in natural order; one group of all without."""
    if not condition_keys:
        return [({}, trials)]
    groups = []
    for key, group in trials.groupby(condition_keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        groups.append(({k: _plain(v) for k, v in zip(condition_keys, key)}, group))
    return groups


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def answer_for(
    condition: dict, trials: pd.DataFrame, factors: list[str], importances: pd.Series, goal: Goal = DEFAULT_GOAL
) -> ConditionAnswer:
    counts = {state: int((trials["state"] == state).sum()) for state in OUTCOMES}
    done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
    if done.empty:
        return ConditionAnswer(condition, counts, None, {}, 0)
    values = goal.values(done)
    best_row = done.loc[goal.best_index(values)]
    best_value = float(best_row[goal.column])
    near = done[goal.near(values, best_value)]
    params = {f: _plain(best_row[f]) for f in factors if f in done.columns and not _missing(best_row[f])}
    best = {
        "trial": int(best_row["trial"]),
        "run_id": best_row["run_id"],
        "params": params,
        "best_val_loss": float(best_row["best_val_loss"]),
        "best_epoch": int(best_row["best_epoch"]),
    }
    best[goal.column] = best_value
    spread = {
        f: sorted({_plain(v) for v in near[f].dropna()}, key=lambda v: (isinstance(v, str), v))
        for f in factors
        if f in near.columns
    }
    every = {f: {_plain(v) for v in trials[f].dropna()} for f in spread}
    important = [(str(k), float(v)) for k, v in importances.sort_values(ascending=False).items()]
    return ConditionAnswer(
        condition,
        counts,
        best,
        spread,
        len(near),
        important,
        any_value=[f for f in spread if len(every[f]) > 1 and set(spread[f]) == every[f]],
    )


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
