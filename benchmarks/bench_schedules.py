"""A per-step schedule in the stacked engine: its cost per optimizer step against the stacked optimizer step itself,
at K = 16 / 256 / 1,024 members of the lab's MLP (P = 65 parameters each), side by side in one run.

`tables` is the engine's way for CosineAnnealingLR (and StepLR, ExponentialLR): one float64 tensor formula for all
members (stacked.optim.Formula); `live` is one torch scheduler stepped per member (the way for any other
scheduler, and for these before #40). Prints milliseconds per step and the schedule's share of the optimizer step.
Usage: python benchmarks/bench_schedules.py
"""

from __future__ import annotations

import time
import warnings

import torch

from sweeplab.config import load_experiment
from sweeplab.train.stacked.optim import Formula, StackedOptimizer

LAB = "experiments/training_loop_lab.yaml"


def per_step(function, repeats: int = 200) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    torch.set_num_threads(1)
    for k in (16, 256, 1024):
        config = load_experiment(LAB)
        configs = [
            config.model_copy(update={"train": config.train.model_copy(update={"lr": 0.001 * (1 + i % 50)})})
            for i in range(k)
        ]
        flat = torch.randn(k, 65, requires_grad=True)
        flat.grad = torch.randn(k, 65)
        optimizer = StackedOptimizer(flat, configs)
        step_ms = per_step(optimizer.step)
        shadows = []
        for c in configs:
            shadow = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=c.train.lr)
            shadows.append(torch.optim.lr_scheduler.CosineAnnealingLR(shadow, T_max=10_000))
        formula = Formula(
            Formula.settings(shadows[0]), [(i, s.optimizer.param_groups[0]["lr"]) for i, s in enumerate(shadows)]
        )
        rows = formula.rows

        def tables(k=k, rows=rows, formula=formula, optimizer=optimizer) -> None:
            current = torch.zeros(k, dtype=torch.float64)
            current[rows] = formula.step()
            optimizer.lr.copy_(current.unsqueeze(1))

        def live(shadows=shadows, optimizer=optimizer) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for scheduler in shadows:
                    scheduler.step()
            optimizer.lr.copy_(torch.tensor([s.optimizer.param_groups[0]["lr"] for s in shadows]).unsqueeze(1))

        table_ms, live_ms = per_step(tables), per_step(live, 50)
        print(
            f"K={k:5d}  optimizer step {step_ms:.3f} ms   schedule: tables {table_ms:.3f} ms "
            f"({table_ms / step_ms:.0%} of the step), live {live_ms:.3f} ms ({live_ms / step_ms:.0%}); "
            f"live / tables {live_ms / table_ms:.0f}x"
        )


if __name__ == "__main__":
    main()
