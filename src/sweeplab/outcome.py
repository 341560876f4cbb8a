"""How a trial or run ended, in one vocabulary: each outcome knows its MLflow run status, its Optuna trial state
and its tag (`sweeplab.outcome`); and `RunEnd`, how one training ended. Imports nothing, so tracking (no Optuna)
and the sweep (Optuna) share it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    COMPLETED = "completed"  # trained every epoch
    PRUNED = "pruned"  # stopped early by the pruner
    DIVERGED = "diverged"  # a non-finite loss ended it
    FAILED = "failed"  # an error ended it
    KILLED = "killed"  # interrupted, or its process was lost

    @property
    def run_status(self) -> str:
        """The MLflow run status it ends with."""
        return {"completed": "FINISHED", "pruned": "KILLED", "killed": "KILLED"}.get(self.value, "FAILED")

    @property
    def trial_state(self) -> str:
        """The Optuna TrialState name it is told as: diverged and pruned trials were both ended early by design
        and count in the budget (PRUNED, with the reason); a failed or killed one is tried again (FAIL)."""
        return {"completed": "COMPLETE", "pruned": "PRUNED", "diverged": "PRUNED"}.get(self.value, "FAIL")

    @classmethod
    def of_history(cls, history, stopped: "Outcome | None" = None) -> "Outcome":
        """The outcome of a finished History: its status completed or diverged, or `stopped` (default PRUNED)
        for a run a callback stopped."""
        if history.status == "completed":
            return cls.COMPLETED
        if history.status == "diverged":
            return cls.DIVERGED
        if history.status == "failed":  # trained, but no epoch had a finite objective (epoch.Curves)
            return cls.FAILED
        return stopped or cls.PRUNED

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RunEnd:
    """How a trial's training ended, as its run records it and its trial is told: `value` is the objective at
    the best epoch (best_val_loss by default), `curve` the objective of each epoch (1, 2, ...), which becomes the
    trial's intermediate values."""

    outcome: Outcome
    value: float
    best_epoch: int
    reason: str | None = None
    curve: tuple[float, ...] = ()
