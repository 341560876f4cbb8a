"""How many trials the next batch asks for: the sweep's decision, not the engine's.

An engine trains whatever batch it is given (sweeplab.train.engines); how big that batch is trades the stacked
engine's speed (the more members, the less each costs) against what the sampler learns between batches.
"""

from __future__ import annotations

import math

from sweeplab.sweep.spec import SweepSpec

# Batches after TPE's random start-up: it learns between them, at least LEARNING_ROUNDS times (a 1,000-trial sweep
# trains 99 trials per batch), in rounds of at least TPE_BATCH trials asked at once (Optuna's constant liar counts
# the running ones as the worst), so that a sweep of a few dozen trials stacks too. TPE_BATCH is the largest batch
# measured whose median best over 10 seeds stays within 2% of one trial at a time on the default, digits CNN and
# breast cancer sweeps: 8, at most 0.17% worse and up to 0.92% better (4: at most 0.43% worse), 2026-12-06,
# benchmarks/bench_tpe_batch.py, benchmarks/results/tpe_batch.csv; the table is on the benchmarks page.
LEARNING_ROUNDS = 10
TPE_BATCH = 8


def learns(spec: SweepSpec) -> bool:
    """Whether the sampler proposes from earlier results (TPE) rather than independently (random, grid)."""
    return spec.sampler.type == "tpe"


def batch_size(spec: SweepSpec, stacks: bool, asked: int, n_trials: int) -> int:
    """Trials to lease for the next batch, `asked` having been leased so far, for an engine that `stacks` a batch
    (one that does not trains one trial after another: a batch of one, so no leased trial waits).

    A sampler that learns must see results between batches, or a batch of 256 asked at once is a random search:
    TPE's random start-up trials go in one batch, the rest of the budget in LEARNING_ROUNDS batches of at least
    `sampler.batch` (TPE_BATCH) trials. Random and grid samplers learn nothing: as many as batch_trials allows."""
    if not stacks:
        return 1
    if not learns(spec):
        return spec.batch_trials
    startup = spec.sampler.n_startup_trials
    if asked < startup:
        return min(spec.batch_trials, startup - asked)
    per_round = spec.sampler.batch or TPE_BATCH
    return min(spec.batch_trials, max(per_round, math.ceil((n_trials - startup) / LEARNING_ROUNDS)))
