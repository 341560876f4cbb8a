"""Seed noise: configurations ranked by their mean over seeds, and whether the leader beats the runner-up.

One rule, one owner: the sweep's confirmation (sweep/confirm.py) ranks the Optuna trials by it to choose the
champion, and the report (report/tables.py) ranks the MLflow runs by it to say whether the winner is real; both
hand it {configuration: [objective per seed]}. A configuration's values are its search run's first, then its
repeats' (seed+1 ... seed+S). Welch's t-test (unequal variances, two-sided, scipy.stats.ttest_ind) compares the
leader's values with the runner-up's; a lead is "beyond seed noise" when p < ALPHA.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Hashable

ALPHA = 0.05  # the test's level: a lead with p below it is beyond seed noise


@dataclass(frozen=True)
class Seeded:
    """One configuration's objective over its seeds."""

    key: Hashable  # what it is to the caller: a trial number, a run id
    values: tuple[float, ...]  # the search run's first, then each repeat's

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """The sample standard deviation (n - 1), 0 for one value."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def n(self) -> int:
        return len(self.values)


def rank(groups: dict[Hashable, list[float]], maximize: bool) -> list[Seeded]:
    """Configurations best first by their mean objective over the finite values they have (a configuration with
    none is left out); a tie keeps the callers' order (the search's ranking)."""
    seeded = [Seeded(key, tuple(v for v in values if math.isfinite(v))) for key, values in groups.items()]
    seeded = [s for s in seeded if s.values]
    return sorted(seeded, key=lambda s: -s.mean if maximize else s.mean)


@dataclass(frozen=True)
class Verdict:
    """Whether the leader's lead over the runner-up exceeds seed noise, by Welch's t-test."""

    beyond_noise: bool
    t: float
    p: float
    sentence: str


def verdict(leader: Seeded, runner_up: Seeded, column: str) -> Verdict:
    """Welch's t-test on the two configurations' values (two-sided; with no spread on either side a difference is
    exact, and equal means are no lead)."""
    from scipy import stats  # scikit-learn's own dependency: here already

    gap = abs(leader.mean - runner_up.mean)
    if leader.n < 2 or runner_up.n < 2:
        t, p = math.nan, math.nan
    elif leader.std == 0 and runner_up.std == 0:
        t, p = (math.inf, 0.0) if gap > 0 else (0.0, 1.0)
    else:
        result = stats.ttest_ind(list(leader.values), list(runner_up.values), equal_var=False)
        t, p = float(abs(result.statistic)), float(result.pvalue)
    means = (
        f"mean {column} {leader.mean:.4g} ± {leader.std:.2g} over {leader.n} seeds against "
        f"{runner_up.mean:.4g} ± {runner_up.std:.2g} over {runner_up.n}"
    )
    if math.isnan(p):
        return Verdict(False, t, p, f"The leader's lead cannot be tested: {means} (Welch's t needs 2 seeds each).")
    beyond = p < ALPHA
    test = f"Welch's t = {t:.2f}, p = {p:.3g}"
    if beyond:
        sentence = f"The leader beats the runner-up beyond seed noise ({means}; {test} < {ALPHA})."
    else:
        sentence = (
            f"The leader and the runner-up are indistinguishable from seed noise ({means}; {test} ≥ {ALPHA}): "
            "either would do, or run more seeds."
        )
    return Verdict(beyond, t, p, sentence)
