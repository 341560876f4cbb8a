"""What the runs say: per-factor convergence tables within each condition (`factor_table`), Optuna's fANOVA
importances (`param_importances`), the answer per condition (answer.py's `answer_for`), and `Report`, which holds
them, and a confirmation's ranking over seeds (`confirmed_of`, by track/seeds' rule). Read from load.py's
SweepData; drawn by pictures.py, written by render.py."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sweeplab.report.answer import DEFAULT_GOAL, Goal, answer_for, conditions_of
from sweeplab.report.load import FACTORS, SweepData
from sweeplab.track.seeds import Verdict, rank, verdict
from sweeplab.track.tracker import condition_label, value_text


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
        known = group["learned"].dropna() if "learned" in group else group.iloc[:0]
        # blank (NaN) where no trial logged a baseline: counting those as learned, or as not, would mislead
        row["learned"] = int(known.astype(bool).sum()) if len(known) else math.nan
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
    return [
        f
        for f in factors
        if f in trials.columns and 1 < trials[f].nunique() and not is_continuous(trials[f], continuous)
    ]


def all_factor_tables(
    trials: pd.DataFrame,
    factors: list[str] | None = None,
    conditions: list[str] = (),
    continuous: set[str] = frozenset(),
    goal: Goal = DEFAULT_GOAL,
) -> dict[str, pd.DataFrame]:
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


def param_importances(
    trials: pd.DataFrame,
    factors: list[str] | None = None,
    continuous: set[str] = frozenset({"lr"}),
    goal: Goal = DEFAULT_GOAL,
) -> pd.Series:
    """Optuna's fANOVA importances of the searched factors for the objective, computed on the trials as MLflow
    recorded them (an in-memory study rebuilt from the table). A factor with many distinct positive values that
    span more than a decade (a learning rate) is taken on a log scale."""
    import optuna  # here only: the one part of a report that needs Optuna (~0.5 s to import), and only with trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    factors = ["optimizer", "hidden", "noise", "lr"] if factors is None else factors
    done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
    columns = [c for c in factors if c in done.columns and done[c].nunique() > 1]
    if len(done) < 4 or not columns:
        return pd.Series(dtype=float)
    distributions = {}
    for column in columns:
        values = done[column]
        if is_continuous(values, continuous):
            low, high = float(values.min()), float(values.max())
            distributions[column] = optuna.distributions.FloatDistribution(low, high, log=low > 0 and high / low > 10)
        else:
            distributions[column] = optuna.distributions.CategoricalDistribution(levels_of(values))
    study = optuna.create_study(direction=goal.direction)
    for _, row in done.iterrows():
        params = {
            c: (
                float(row[c])
                if isinstance(distributions[c], optuna.distributions.FloatDistribution)
                else row[c].item()
                if hasattr(row[c], "item")
                else row[c]
            )
            for c in columns
        }
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[goal.column]))
        )
    # Optuna's defaults (64 trees of depth 64) take ~8 s on 500 trials; 16 shallower trees rank the same handful
    # of parameters in a fraction of that.
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=16, max_depth=16, seed=0)
    return pd.Series(optuna.importance.get_param_importances(study, evaluator=evaluator), name="importance")


def is_continuous(values: pd.Series, continuous: set[str] = frozenset()) -> bool:
    """A range rather than levels: searched as one (the sweep says so), or a float column of many values."""
    return values.name in continuous or (pd.api.types.is_float_dtype(values) and values.nunique() > MAX_LEVELS)


def levels_of(column: pd.Series) -> list:
    """A factor's values in natural order: numbers numerically, names alphabetically."""
    return sorted(column.dropna().unique().tolist(), key=lambda v: (isinstance(v, str), v))


@dataclass
class Report:
    data: SweepData
    tables: dict[str, pd.DataFrame]
    files: list[Path]
    answers: list = field(default_factory=list)  # answer.ConditionAnswer, one per condition
    confirmed: list = field(default_factory=list)  # Confirmed, one per condition whose top trials were repeated

    def to_json(self) -> dict:
        return {
            "study": self.data.study,
            "experiment_id": self.data.experiment_id,
            "factors": self.data.factors,
            "conditions": self.data.conditions,
            "answers": [a.to_json() for a in self.answers],
            "confirmed": [c.to_json() for c in self.confirmed],
        }


@dataclass
class Confirmed:
    """A condition's confirmation as its runs say it: the repeated trials best mean first (`table`: trial, the
    searched values, mean, std, min, max and seeds of the objective, the trial's run), each configuration's values
    (`values`: trial -> [search run's, repeats' by seed]) and the verdict on the leader's lead (track/seeds)."""

    condition: dict
    table: pd.DataFrame
    values: dict
    verdict: Verdict | None

    def to_json(self) -> dict:
        return {
            "condition": self.condition,
            "ranking": self.table.to_dict(orient="records"),
            "verdict": self.verdict.sentence if self.verdict else None,
            "beyond_noise": self.verdict.beyond_noise if self.verdict else None,
            "p_value": self.verdict.p if self.verdict else None,
        }

    def sentence(self, factors: list[str], column: str) -> str:
        """What the summary says: the best configuration over seeds, and whether its lead is beyond seed noise."""
        where = f"{condition_label(self.condition)}: " if self.condition else ""
        if self.table.empty:
            return f"{where}no repeated trial completed."
        best = self.table.iloc[0]
        setting = ", ".join(f"{f} {value_text(best[f])}" for f in factors if f in best.index)
        head = (
            f"{where}over seeds, the best is trial #{int(best['trial'])} ({setting}): mean {column} "
            f"{best['mean']:.4g} ± {best['std']:.2g} (min {best['min']:.4g}, max {best['max']:.4g}, "
            f"{int(best['seeds'])} seeds)."
        )
        return f"{head} {self.verdict.sentence}" if self.verdict else head


def confirmed_of(data: SweepData) -> list[Confirmed]:
    """Each condition's confirmed ranking, from the runs alone: a repeated trial's values are its own run's
    objective and its repeats' (`data.repeats`), ranked by track/seeds.rank, as the sweep ranked them to choose
    its champion."""
    if data.repeats.empty:
        return []
    goal, out = data.goal, []
    for condition, trials in conditions_of(data.trials, data.conditions):
        repeated = trials[trials["run_id"].isin(set(data.repeats["confirms"]))]
        values = {}
        for row in repeated.itertuples(index=False):
            own = data.repeats[data.repeats["confirms"] == row.run_id]
            values[row.trial] = [getattr(row, goal.column)] + list(own[goal.column])
        ranked = rank(values, maximize=not goal.minimize)
        by_trial = repeated.set_index("trial")
        rows = [
            {
                "trial": s.key,
                **{f: by_trial.loc[s.key, f] for f in data.factors if f in by_trial.columns},
                "mean": s.mean,
                "std": s.std,
                "min": min(s.values),
                "max": max(s.values),
                "seeds": s.n,
                "run_id": by_trial.loc[s.key, "run_id"],
            }
            for s in ranked
        ]
        table = pd.DataFrame.from_records(rows)
        judged = verdict(ranked[0], ranked[1], goal.column) if len(ranked) > 1 else None
        out.append(Confirmed(condition, table, {s.key: list(s.values) for s in ranked}, judged))
    return out


def answers_of(data: SweepData) -> list:
    """The answer per condition: its best setting, what comes close, and which factor matters most there."""
    answers = []
    for condition, trials in conditions_of(data.trials, data.conditions):
        try:
            importances = param_importances(trials, data.factors, data.continuous, data.goal)
        except Exception as exc:  # fANOVA needs variety; an answer without it is still an answer
            importances = pd.Series(dtype=float)
            data.notes.append(f"parameter importances unavailable for {condition or 'the study'}: {exc}")
        answers.append(answer_for(condition, trials, data.factors, importances, data.goal))
    return answers
