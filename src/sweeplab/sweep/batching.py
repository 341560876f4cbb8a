"""How many trials the next batch asks for: the sweep's decision, not the engine's.

An engine trains whatever batch it is given (sweeplab.train.engines); how big that batch is trades the stacked
engine's speed (the more members, the less each costs) against what the sampler learns between batches.
"""

from __future__ import annotations

import math

from sweeplab.sweep.spec import SweepSpec

# Batches after TPE's random start-up: it learns between them. Ten keeps the search as good as one trial at a time
# on the default sweep (10 trials after the start-up go one by one; bench_auto_search.py), and a 1,000-trial
# sweep still trains 99 trials per batch.
LEARNING_ROUNDS = 10


def learns(spec: SweepSpec) -> bool:
    """Whether the sampler proposes from earlier results (TPE) rather than independently (random, grid)."""
    return spec.sampler.type == "tpe"


def batch_size(spec: SweepSpec, stacks: bool, asked: int, n_trials: int) -> int:
    """Trials to lease for the next batch, `asked` having been leased so far, for an engine that `stacks` a batch
    (one that does not trains one trial after another: a batch of one, so no leased trial waits).

    A sampler that learns must see results between batches, or a batch of 256 asked at once is a random search:
    TPE's random start-up trials go in one batch, the rest of the budget in LEARNING_ROUNDS batches. Random and grid
    samplers learn nothing: as many as batch_trials allows."""
    if not stacks:
        return 1
    if not learns(spec):
        return spec.batch_trials
    startup = spec.sampler.n_startup_trials
    if asked < startup:
        return min(spec.batch_trials, startup - asked)
    return min(spec.batch_trials, max(1, math.ceil((n_trials - startup) / LEARNING_ROUNDS)))
