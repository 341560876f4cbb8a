"""Members that end leave the stack (#40): one stacked group of the breast cancer example's MLP (early stopping
patience 10, its plateau schedule, clipping, class weights), K members with the sweep's space drawn at random
(lr, hidden, clip_grad_norm, the schedule's factor), trained with every row kept to the end (`whole`, the engine
before compaction) and compacted, alternating, ROUNDS times each, side by side in one process. Prints the median
seconds of each, their ratio, and the member-epochs trained beside the row-epochs each computed.

Usage: python benchmarks/bench_compact.py [K] [ROUNDS]
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from sweeplab.config import load_experiment
from sweeplab.train.stacked import mlp
from sweeplab.train.stacked.epochs import group_members, prepare_member

EXPERIMENT = "experiments/breast_cancer.yaml"


def configs(k: int) -> list:
    rng = random.Random(0)
    return [
        load_experiment(
            EXPERIMENT,
            {
                "lr": 10 ** rng.uniform(-3.5, -1.5),
                "hidden": rng.choice([16, 64]),
                "clip_grad_norm": rng.choice([0.5, 5.0]),
                "train.scheduler.init_args.factor": rng.choice([0.3, 0.7]),
            },
        )
        for _ in range(k)
    ]


def one(settings: list, compact: bool) -> tuple[float, list[int]]:
    mlp.COMPACT = compact
    members = [prepare_member(i, c) for i, c in enumerate(settings)]
    assert len(group_members(members)) == 1
    started = time.perf_counter()
    mlp.train_group(members)
    return time.perf_counter() - started, [m.history.epochs_run for m in members]


def main() -> None:
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(1)
    settings = configs(k)
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds):
        for compact in (False, True) if round_ % 2 == 0 else (True, False):
            seconds, epochs_run = one(settings, compact)
            times[compact].append(seconds)
    longest = max(epochs_run)
    trained = sum(epochs_run)
    # rows at epoch e: the members still training then, at least two (a last survivor keeps a companion)
    rows = sum(max(sum(1 for n in epochs_run if n >= e), min(2, k)) for e in range(1, longest + 1))
    whole, compacted = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"K={k}, {rounds} rounds, epochs run per member: min {min(epochs_run)}, median "
        f"{statistics.median(epochs_run)}, max {longest}"
    )
    print(f"whole stack : {whole:6.2f} s, {k * longest} row-epochs computed (runs: {times[False]})")
    print(f"compacted   : {compacted:6.2f} s, {rows} row-epochs computed (runs: {times[True]})")
    print(f"member-epochs trained: {trained}; whole / compacted = {whole / compacted:.2f}x")


if __name__ == "__main__":
    main()
