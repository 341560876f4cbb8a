"""The confirmation (`confirm: {top: K, seeds: S}`): after the search, each condition's K best configurations are
trained again with S more seeds, and the champion is the best mean over seeds.

On small noisy data one run's score is one draw: a change of 1e-7 in the initial weights can move it by more than
the gap between the search's first and second. So the K best trials of a condition's study are repeated with seeds
seed+1 ... seed+S (the data split keeps `data.split_seed`; `train.shuffle_seed` keeps the batch order), as trials
of a study of their own (`<study>:confirm`, enqueued with their parameters and the seed, so a resumed sweep trains
only the repeats it lacks), by the sweep's engine (stacked: repeats share every shape), each a child run of the
sweep's parent tagged `sweeplab.role=confirm` and `sweeplab.confirms=<the search trial's run id>`. The ranking over
seeds and the test of the leader's lead are track/seeds.py's, which the report uses too. The champion serves its
search run's weights (the sweep's seed); its registered version is tagged with the mean, the std and the seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from sweeplab.stores import with_retries
from sweeplab.sweep.ledger import (
    CONFIRMS_ATTR,
    CONFIRMS_TRIAL_ATTR,
    TrialSummary,
    best_trials,
    maximizes,
)
from sweeplab.sweep.spec import ParamSpec, PrunerSpec, SamplerSpec, Sweep
from sweeplab.track.seeds import Seeded, Verdict, rank, verdict

SEED_RANGE = 10**6  # the repeats' seed parameter spans seed+1 ... seed+SEED_RANGE: `seeds` may grow on a resume


def confirm_sweep(part: Sweep) -> Sweep:
    """The sweep of a condition's repeats: its space and `seed` (an int range, so a resume with more seeds keeps
    the study's distribution), every trial enqueued (a random sampler never asks for more), no pruner."""
    spec = part.spec
    first = part.base_config.seed
    seed = ParamSpec(low=first + 1, high=first + SEED_RANGE, type="int")
    confirm_spec = spec.model_copy(
        update={
            "phase": "confirm",
            "space": {**spec.space, "seed": seed},
            "sampler": SamplerSpec(type="random", seed=spec.sampler.seed),
            "pruner": PrunerSpec(),
            "repeats": 1,
        }
    )
    return dataclasses.replace(part, spec=confirm_spec)


def enqueue_repeats(search: optuna.Study, confirm: optuna.Study, top: int, seeds: int, first_seed: int) -> int:
    """Queue each (top trial, seed) the confirmation study does not hold yet; returns how many trials the study
    holds then (its budget). A repeat that failed is not queued again: a resume trains only what it never tried."""
    held = {
        (t.user_attrs.get(CONFIRMS_TRIAL_ATTR), t.params.get("seed"))
        for t in with_retries(confirm.get_trials, deepcopy=False)
        if not t.user_attrs.get("surplus")
    }
    for trial in best_trials(search, top):
        for seed in range(first_seed + 1, first_seed + 1 + seeds):
            if (trial.number, seed) in held:
                continue
            with_retries(
                confirm.enqueue_trial,
                {**trial.params, "seed": seed},
                user_attrs={CONFIRMS_ATTR: trial.run_id, CONFIRMS_TRIAL_ATTR: trial.number},
                skip_if_exists=False,
            )
            held.add((trial.number, seed))
    return len(held)


@dataclass(frozen=True)
class Confirmation:
    """A condition's confirmed ranking: each of its top trials with its values over seeds, best mean first, and
    whether the leader beats the runner-up beyond seed noise (None with one configuration)."""

    ranking: list[tuple[TrialSummary, Seeded]]
    verdict: Verdict | None
    seeds: int

    @property
    def leader(self) -> TrialSummary | None:
        return self.ranking[0][0] if self.ranking else None


def confirmed(search: optuna.Study, confirm: optuna.Study, top: int, column: str) -> Confirmation:
    """The top trials of the search ranked by their mean objective over the search's value and their completed
    repeats' (track/seeds.rank: the report ranks the runs by the same rule)."""
    trials = best_trials(search, top)
    values: dict[int, list[float]] = {t.number: [t.value] for t in trials}
    repeats = with_retries(confirm.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
    for repeat in sorted(repeats, key=lambda t: t.params.get("seed", 0)):
        number = repeat.user_attrs.get(CONFIRMS_TRIAL_ATTR)
        if number in values and repeat.value is not None:
            values[number].append(repeat.value)
    ranked = rank(values, maximizes(search))
    by_number = {t.number: t for t in trials}
    ranking = [(by_number[s.key], s) for s in ranked]
    judged = verdict(ranked[0], ranked[1], column) if len(ranked) > 1 else None
    return Confirmation(ranking, judged, max((s.n for s in ranked), default=0))


__all__ = ["confirm_sweep", "enqueue_repeats", "confirmed", "Confirmation", "SEED_RANGE"]
