"""The ledger: everything one worker says to its Optuna study, and the only code that handles trial ids.

A worker leases a trial (ask, then claim it with its `worker` attribute and, on RDB storages, a first heartbeat
that a thread keeps beating), reports intermediate values and asks whether to prune, and finishes it (complete,
pruned, failed). It gives back a trial asked for a place another worker took meanwhile, and before each lease it
recovers lost trials:

- stale (RDB storages): Optuna's `fail_stale_trials` fails trials whose heartbeat went quiet, and its
  RetryHeartbeatStaleTrialCallback queues them again;
- dead (any storage, the default journal file included): a RUNNING trial whose worker process on this machine no
  longer exists is failed and queued again the same way;
- orphaned: a trial created by an ask that failed half-way is never claimed; after ORPHAN_AFTER_S it is failed.

Either way the lost trial's MLflow run is ended as KILLED (through `runs`, the track.tracker.Tracker it is given: a
`RunStore` to the ledger, which knows nothing of MLflow). Every write is retried through outages
(`stores.with_retries`); a FAIL that still did not land is told before the next lease. Engines and the recorder hold `Lease`s, never Optuna trials.

Why one module of ~480 lines: everything said to Optuna about a trial (lease, heartbeat, recovery, retries,
tell, the summaries read back) is here, so no other module handles trial ids or storage details.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.storages.journal._storage import JournalOperation
from optuna.trial import TrialState

from sweeplab.outcome import Outcome, RunEnd
from sweeplab.stop import stop_flag
from sweeplab.stores import env_number, process_gone, with_retries, worker_id
from sweeplab.sweep.search import ALIVE, FINISHED, suggest
from sweeplab.sweep.spec import ParamSpec

# The trial user attributes sweeplab keeps (reports and other workers read them back from the storage):
RUN_ID_ATTR = "mlflow_run_id"  # its MLflow run
WORKER_ATTR = "worker"  # host:pid of the worker that claimed it
SURPLUS_ATTR = "surplus"  # asked for a place another worker took first; never ran, not counted
BEST_EPOCH_ATTR = "best_epoch"
OUTCOME_ATTR = "outcome"  # pruned | diverged, for a trial Optuna holds as PRUNED
REASON_ATTR = "reason"  # why it was stopped early
FAIL_REASON_ATTR = "fail_reason"  # why it failed
CONFIRMS_ATTR = "confirms"  # a confirmation's repeat (sweep/confirm.py): the run id of the search trial it repeats
CONFIRMS_TRIAL_ATTR = "confirms_trial"  # ... and that trial's number in the search study
ORPHAN_AFTER_S = env_number("SWEEPLAB_ORPHAN_AFTER", 60.0)


@dataclass(frozen=True)
class Lease:
    """A trial this worker holds, as the engines and the recorder see it: plain data, picklable to a writer
    process (which finishes it through a ledger of its own)."""

    number: int
    trial_id: int
    params: dict[str, Any] = field(default_factory=dict)  # {override key: value}, as the sweep file names them
    confirms: str | None = None  # a confirmation's repeat: the run id of the search trial it repeats (CONFIRMS_ATTR)


@dataclass(frozen=True)
class Stock:
    """The study as a worker sees it before asking: trials finished, running and queued to run again."""

    finished: int
    running: int
    queued: int


class Heartbeats:
    """Records the heartbeat of every trial this worker holds, from its claim until Optuna has been told how it
    ended. Optuna does this only inside optimize(); an ask-and-tell worker must do it itself. One thread per
    worker, started on the first claim; a no-op for storages without heartbeats."""

    def __init__(self, storage: optuna.storages.BaseStorage | None):
        self.storage = storage
        self.interval = heartbeat_interval(storage)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, trial_id: int) -> None:
        """Beat for this trial from now on; the first beat is written before this returns."""
        if not self.interval:
            return
        with_retries(self.storage.record_heartbeat, trial_id)
        with self._lock:
            self._held.add(trial_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="sweeplab-heartbeat", daemon=True)
            self._thread.start()

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                held = sorted(self._held)
            for trial_id in held:
                with contextlib.suppress(Exception):  # a missed beat is survivable; the grace period covers outages
                    self.storage.record_heartbeat(trial_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
            self._thread = None
        self._stop = threading.Event()  # a later hold() starts beating again


def heartbeat_interval(storage: optuna.storages.BaseStorage | None) -> float | None:
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter else None


def write_curve(storage: optuna.storages.BaseStorage, trial_id: int, curve: tuple[float, ...]) -> None:
    """The trial's per-epoch objective as its intermediate values (step = epoch), so Optuna's own tools
    (optuna-dashboard, `plot_intermediate_values`) show its learning curve. Non-finite values are left out, as in
    the MLflow curves; steps a pruner was already told are not written again.

    One write for the whole curve, not one per epoch: a journal gets one append of every operation under its lock
    (80 single writes cost ~80 appends and re-reads of the file), an RDB storage one transaction. Both go through
    Optuna's own write paths (pinned in test_pinned.py); any other storage gets the public call per step.
    Idempotent, so `with_retries` may repeat it."""
    known = storage.get_trial(trial_id).intermediate_values
    values = [
        (step, float(value)) for step, value in enumerate(curve, start=1) if math.isfinite(value) and step not in known
    ]
    if not values:
        return
    if isinstance(storage, optuna.storages.JournalStorage):
        with storage._thread_lock:
            worker = storage._replay_result.worker_id
            storage._backend.append_logs(
                [
                    {
                        "op_code": JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE,
                        "worker_id": worker,
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": value,
                    }
                    for step, value in values
                ]
            )
            storage._sync_with_backend()
    elif isinstance(storage, optuna.storages.RDBStorage):
        with _create_scoped_session(storage.scoped_session, True) as session:
            for step, value in values:
                storage._set_trial_intermediate_value_without_commit(session, trial_id, step, value)
    else:
        for step, value in values:
            storage.set_trial_intermediate_value(trial_id, step, value)


class RunStore(Protocol):
    """What the ledger asks of the trials' runs (track.tracker.Tracker fulfils it); a Protocol, so the ledger is
    written against no MLflow API. Called only while the ledger recovers lost trials (before a worker's next lease),
    never while a trial of this worker trains."""

    def end_if_running(self, run_id: str, reason: str) -> None:
        """Called for the run of a trial found lost (its worker's heartbeat stopped, its worker process gone): end
        it as KILLED with `reason` if it is still RUNNING. May assume nobody writes to the run any more. Must leave
        a run that already ended as it is (its own end is the truth), and must not touch the study."""

    def run_end(self, run_id: str) -> RunEnd | None:
        """Called for a lost trial whose run may have finished before its tell landed: how the run says its trial
        ended (its outcome, curve and value), or None if the run did not finish. Reads only."""


class Ledger:
    """One worker's dealings with one study. `n_trials` is the study's budget of finished trials; `runs`, where
    the trials' runs are (a writer process, which only tells trials it trained, has none)."""

    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        n_trials: int,
        space: dict[str, ParamSpec],
        runs: RunStore | None = None,
    ):
        self.study, self.storage, self.n_trials, self.space, self.runs = study, storage, n_trials, space, runs
        self.heartbeats = Heartbeats(storage)
        self._trials: dict[int, optuna.Trial] = {}  # leased here, by number: for report / should_prune
        self._handled: set[int] = set()  # failed trials whose runs were already ended
        self._unsettled: dict[int, str] = {}  # trial id -> fail reason whose FAIL did not land
        self._unclaimed: dict[int, float] = {}  # RUNNING trials nobody claimed -> when first seen

    # --- asking ------------------------------------------------------------------------------------------------

    def take_stock(self) -> Stock:
        """Tell the FAILs that did not land, recover lost trials, then count: a worker's view before it asks."""
        stop_flag.check()
        self._settle_unsettled()
        self.recover()
        states = [t.state for t in with_retries(self.study.get_trials, deepcopy=False)]
        return Stock(
            sum(state in FINISHED for state in states),
            states.count(TrialState.RUNNING),
            states.count(TrialState.WAITING),
        )

    def lease(self) -> Lease | None:
        """A new trial with its parameters, claimed by this worker; None when another worker took the last free
        place between our count and our ask (the asked trial is then given back unrun, as a surplus FAIL)."""
        trial = with_retries(self.study.ask)
        # the heartbeat first: if the storage goes away between the two writes, the trial is either stale (it has
        # a heartbeat) or unclaimed (it has no worker), and both are recovered; a worker without a heartbeat is not
        self.heartbeats.hold(trial._trial_id)
        with_retries(trial.set_user_attr, WORKER_ATTR, worker_id())
        if with_retries(self._is_surplus, trial.number):
            with_retries(trial.set_user_attr, SURPLUS_ATTR, True)
            self._tell(trial.number, state=TrialState.FAIL)
            self.heartbeats.release(trial._trial_id)
            self._handled.add(trial.number)
            return None
        params = with_retries(suggest, trial, self.space)  # a retry keeps the values already stored
        self._trials[trial.number] = trial
        return Lease(trial.number, trial._trial_id, params, trial.user_attrs.get(CONFIRMS_ATTR))

    def _is_surplus(self, number: int) -> bool:
        """True when `n_trials` trials numbered before this one already hold the budget. Trial numbers come from
        the storage in order, so when several workers race for the last places exactly one set wins."""
        earlier = [t for t in self.study.get_trials(deepcopy=False, states=ALIVE) if t.number < number]
        return len(earlier) >= self.n_trials

    # --- while training ----------------------------------------------------------------------------------------

    def link_run(self, lease: Lease, run_id: str) -> None:
        """Point the trial at its MLflow run, so recovery can end the run if this worker is lost."""
        with_retries(self.storage.set_trial_user_attr, lease.trial_id, RUN_ID_ATTR, run_id)

    def should_prune(self, lease: Lease, epoch: int, value: float) -> bool:
        """Report the validation loss at this epoch and ask the study's pruner."""
        stop_flag.check()
        trial = self._trials[lease.number]
        with_retries(trial.report, value, epoch)
        return with_retries(trial.should_prune)

    # --- ending ------------------------------------------------------------------------------------------------

    def finish(self, lease: Lease, end: RunEnd) -> None:
        """Tell how a trained trial ended, once its MLflow run is finished: its curve, then its result. Diverged
        and pruned trials are both PRUNED to Optuna (ended early by design, counted in the budget), with the
        reason, so reports can tell the two apart."""
        self._tell_end(lease.trial_id, lease.number, end)
        self._release(lease)

    def _tell_end(self, trial_id: int, number: int, end: RunEnd) -> None:
        # A diverged trial has no result: no best_epoch (as its run has no best_*), and no curve, whose values
        # before diverging (millions) would flatten every other trial's in optuna-dashboard's and Optuna's plots;
        # its reason says at which epoch it diverged.
        diverged = end.outcome == Outcome.DIVERGED
        if end.curve and not diverged:
            with_retries(write_curve, self.storage, trial_id, end.curve)
        if not diverged:
            with_retries(self.storage.set_trial_user_attr, trial_id, BEST_EPOCH_ATTR, end.best_epoch)
        if end.outcome == Outcome.COMPLETED:
            self._tell(number, end.value)
        else:
            with_retries(self.storage.set_trial_user_attr, trial_id, OUTCOME_ATTR, str(end.outcome))
            with_retries(self.storage.set_trial_user_attr, trial_id, REASON_ATTR, end.reason)
            if end.outcome == Outcome.FAILED:  # trained without a result: what `last_failure` reads
                with_retries(self.storage.set_trial_user_attr, trial_id, FAIL_REASON_ATTR, end.reason)
            self._tell(number, state=TrialState[end.outcome.trial_state])

    def fail(self, lease: Lease, reason: str, interrupted: bool = False, run_ended: bool = True) -> None:
        """A trial that ended in an error or an interrupt: FAIL with the reason. Interrupted, one attempt (the user
        is waiting; a trial left RUNNING is recovered by the others once this process is gone). Otherwise retried
        through an outage, and what still did not land is told before this worker's next lease. `run_ended`:
        whether its MLflow run was ended already (else recovery ends it once it sees the FAIL)."""

        def attempt(fn, *args, **kwargs):
            return fn(*args, **kwargs) if interrupted else with_retries(fn, *args, **kwargs)

        try:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                attempt(self.storage.set_trial_user_attr, lease.trial_id, FAIL_REASON_ATTR, reason)
                attempt(self.storage.set_trial_state_values, lease.trial_id, state=TrialState.FAIL)
        except Exception:
            self._unsettled[lease.trial_id] = reason  # still held: its heartbeat goes on until it is told
            return
        self._release(lease)
        if run_ended:
            self._handled.add(lease.number)

    @property
    def last_failure(self) -> str:
        """The fail reason of the latest failed trial (for the message when several fail in a row)."""
        failed = with_retries(self.study.get_trials, deepcopy=False, states=(TrialState.FAIL,))
        return failed[-1].user_attrs.get(FAIL_REASON_ATTR, "") if failed else ""

    def release(self, lease: Lease) -> None:
        """Stop holding a trial that another process (a writer) told."""
        self._release(lease)

    def _release(self, lease: Lease) -> None:
        self.heartbeats.release(lease.trial_id)
        self._trials.pop(lease.number, None)

    def _tell(self, number: int, value: float | None = None, state: TrialState | None = None) -> None:
        """tell, retried through outages; a retry that finds its first attempt already landed is done."""
        with_retries(self.study.tell, number, value, state=state, skip_if_finished=True)

    def _settle_unsettled(self) -> None:
        for trial_id, reason in list(self._unsettled.items()):
            self._fail_trial(trial_id, reason)  # False: already failed by a worker that found it stale
            del self._unsettled[trial_id]
            self.heartbeats.release(trial_id)

    @property
    def poll_interval(self) -> float:
        """How long a worker waiting on others' running trials sleeps between looks: at most a heartbeat."""
        return min(self.heartbeats.interval or 1.0, 1.0)

    def close(self) -> None:
        self.heartbeats.close()

    # --- recovery ----------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Fail and requeue lost trials, and end their MLflow runs as KILLED. Safe to run in every worker at once:
        only the worker whose state change succeeds requeues a trial."""
        beating = bool(heartbeat_interval(self.storage))
        if beating:  # Optuna fails stale trials and RetryHeartbeatStaleTrialCallback queues them again
            self._tell_stale_from_runs()
            with_retries(optuna.storages.fail_stale_trials, self.study)
        trials = with_retries(self.study.get_trials, deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL))
        running = [t for t in trials if t.state == TrialState.RUNNING]
        by_number = {t.number: t for t in trials}
        self._fail_orphans([t for t in running if not self._claimed(t, by_number)])
        for trial in (t for t in running if not beating):
            worker = trial.user_attrs.get(WORKER_ATTR)
            if worker and process_gone(worker):
                if self._tell_from_run(trial):
                    continue  # it died after its run was finished, before the tell: the run has the result
                if not self._fail_trial(trial._trial_id, f"worker {worker} died during the trial"):
                    continue  # another worker got there first
                with_retries(
                    self.study.enqueue_trial, trial.params, user_attrs=retry_attrs(trial), skip_if_exists=False
                )
                trials.append(with_retries(self.storage.get_trial, trial._trial_id))
        for trial in (t for t in trials if t.state == TrialState.FAIL):
            if trial.number in self._handled:
                continue
            self._handled.add(trial.number)
            run_id = trial.user_attrs.get(RUN_ID_ATTR)
            if run_id and self.runs is not None:
                self.runs.end_if_running(
                    run_id,
                    trial.user_attrs.get(FAIL_REASON_ATTR) or "worker lost: no heartbeat within the grace period",
                )

    def _tell_stale_from_runs(self) -> None:
        """Before Optuna fails the stale trials (and queues each again): a stale trial whose run finished was lost
        between the run's end and its tell (a SIGKILL there), and is told what its run recorded instead, as for a
        dead worker on a journal storage; failing and retrying it would train it twice beside a finished run."""
        if self.runs is None:
            return
        stale = set(with_retries(self.storage._get_stale_trial_ids, self.study._study_id))
        if not stale:
            return
        for trial in with_retries(self.study.get_trials, deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id in stale:
                self._tell_from_run(trial)

    def _tell_from_run(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Tell a dead worker's trial what its finished run recorded (a worker killed between finishing the run
        and telling Optuna): failing and retrying it would leave a finished run beside a failed trial and train
        it twice. True when told (by this worker or, first, another)."""
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        end = self.runs.run_end(run_id) if run_id and self.runs is not None else None
        if end is None or end.outcome.trial_state == "FAIL":
            return False
        try:
            self._tell_end(trial._trial_id, trial.number, end)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker told it first
        self._handled.add(trial.number)
        return True

    def _claimed(self, trial: optuna.trial.FrozenTrial, by_number: dict[int, Any]) -> bool:
        """Claimed by a worker: it has a `worker`, and not just the one Optuna's RetryHeartbeatStaleTrialCallback
        copied from the failed trial it retries (that worker is gone)."""
        worker = trial.user_attrs.get(WORKER_ATTR)
        if worker is None:
            return False
        history = optuna.storages.RetryFailedTrialCallback.retry_history(trial)  # the trials it retries, oldest first
        retried = by_number.get(history[-1]) if history else None
        return retried is None or retried.user_attrs.get(WORKER_ATTR) != worker

    def _fail_orphans(self, unclaimed: list[optuna.trial.FrozenTrial]) -> None:
        """A RUNNING trial nobody claims was orphaned inside `ask` (the storage failed after creating it, and the
        ask was retried). This worker remembers when it first saw each one, on its own clock (no clocks are
        compared across machines), and fails it after ORPHAN_AFTER_S. It never ran, so it is not queued again."""
        now = time.monotonic()
        ids = {t._trial_id for t in unclaimed}
        for trial_id in [i for i in self._unclaimed if i not in ids]:
            del self._unclaimed[trial_id]  # claimed or finished since
        for trial in unclaimed:
            first_seen = self._unclaimed.setdefault(trial._trial_id, now)
            if now - first_seen >= ORPHAN_AFTER_S:
                del self._unclaimed[trial._trial_id]
                if self._fail_trial(
                    trial._trial_id,
                    f"orphaned: no worker claimed it within {ORPHAN_AFTER_S:.0f} s "
                    "(created while the storage was failing); it never ran",
                ):
                    self._handled.add(trial.number)

    def _fail_trial(self, trial_id: int, reason: str) -> bool:
        """Mark a RUNNING trial FAIL with its reason; False when another worker (or its owner) finished it first."""
        try:  # the reason first: a finished trial takes no more attributes
            with_retries(self.storage.set_trial_user_attr, trial_id, FAIL_REASON_ATTR, reason)
            with_retries(self.storage.set_trial_state_values, trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True


# --- reading a study back ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSummary:
    """A completed trial as the CLI, the champion and the run descriptions need it."""

    number: int
    value: float
    run_id: str | None
    best_epoch: int | None
    params: dict[str, Any]  # Optuna's names (`lr_Adam`); search.values_of turns them into the sweep file's


def retry_attrs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The user attributes a lost trial's retry is queued with: which trial it retries, and what it repeats (a
    confirmation's repeat stays one)."""
    kept = {k: v for k, v in trial.user_attrs.items() if k in (CONFIRMS_ATTR, CONFIRMS_TRIAL_ATTR)}
    return {"retry_of": trial.number, **kept}


def best_trials(study: optuna.Study, top: int = 5) -> list[TrialSummary]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return [
        TrialSummary(t.number, t.value, t.user_attrs.get(RUN_ID_ATTR), t.user_attrs.get(BEST_EPOCH_ATTR), t.params)
        for t in sorted(done, key=lambda t: t.value, reverse=maximizes(study))[:top]
    ]


def maximizes(study: optuna.Study) -> bool:
    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def finished_count(study: optuna.Study) -> int:
    return len(finished_trials(study))


def outcome_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by outcome (completed, pruned, diverged, failed, running...), leaving out surplus asks."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get(SURPLUS_ATTR):
            continue
        # in the outcome vocabulary (outcome.Outcome) where it has a word: completed, pruned, diverged, failed
        label = trial.user_attrs.get(OUTCOME_ATTR) or {"complete": "completed", "fail": "failed"}.get(
            trial.state.name.lower(), trial.state.name.lower()
        )
        counts[label] = counts.get(label, 0) + 1
    return counts
