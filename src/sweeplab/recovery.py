"""Fault tolerance for sweep workers: no trial lost, none counted twice, nothing left looking alive.

- Heartbeats (RDB storages): a thread records the heartbeat of each trial the worker holds, from its claim
  right after the ask until the tell; before each trial every worker fails the trials whose heartbeat went
  stale (Optuna's `fail_stale_trials`), and Optuna's RetryHeartbeatStaleTrialCallback queues them again.
- Local dead workers (any storage, the default journal file included): a RUNNING trial whose worker process on
  this machine no longer exists is failed and queued again the same way.
- Orphans (any storage): a trial created by an ask that failed half-way is never claimed; it is failed.
- Either way the lost trial's MLflow run, left RUNNING by the dead worker, is ended as KILLED.
- Transient outages of the database or the tracking server are retried with backoff (`with_retries`).
- Ctrl-C / SIGTERM: the trial in flight is recorded (run KILLED, trial FAIL) under `shielded()`, which holds
  off a second signal until that bookkeeping is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, TypeVar

import optuna
from optuna.trial import TrialState

T = TypeVar("T")
RETRY_WAITS_S = (0.5, 1, 2, 4, 8)  # ~15 s in all, then the outage is reported


class OutageError(RuntimeError):
    """The storage or the tracking server stayed unreachable through every retry."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, optuna.exceptions.StorageInternalError]
    with contextlib.suppress(ImportError):
        import sqlalchemy.exc

        errors += [sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError]
    with contextlib.suppress(ImportError):
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return tuple(errors)


TRANSIENT = _transient_errors()


def lost_insert_race(exc: BaseException) -> bool:
    """The error of a writer that lost a check-then-insert race to another worker (Optuna creating its tables,
    MLflow recording a dataset both workers use): PostgreSQL, MySQL and SQLite each in their words. Doing it
    again finds the other writer's row."""
    text = str(exc)
    return any(words in text for words in ("already exists", "duplicate key", "Duplicate entry", "UniqueViolation",
                                           "UNIQUE constraint failed"))


def with_retries(fn: Callable[..., T], *args: Any, what: str = "the Optuna storage", **kwargs: Any) -> T:
    """Call fn as a critical section, retrying connection-level failures with backoff (between attempts a stop
    signal acts at once); after ~15 s raise OutageError in one line."""
    for wait in (*RETRY_WAITS_S, None):
        try:
            with critical():
                return fn(*args, **kwargs)
        except TRANSIENT as exc:
            check_stop()
            if wait is None:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise OutageError(f"{what} unreachable for {sum(RETRY_WAITS_S):.0f} s: {first}") from None
            time.sleep(wait)
    raise AssertionError("unreachable")


def heartbeat_interval(storage: optuna.storages.BaseStorage) -> float | None:
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter else None


class Heartbeats:
    """Records the heartbeat of every trial this worker holds, from the moment it claims the trial (right after
    asking) until Optuna has been told how it ended. Optuna does this only inside optimize(); an ask-and-tell
    worker must do it itself. One thread per worker, started on the first claim; a no-op for storages without
    heartbeats."""

    def __init__(self, storage: optuna.storages.BaseStorage | None):
        self.storage = storage
        self.interval = heartbeat_interval(storage) if storage is not None else None
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


def this_host() -> str:
    return socket.gethostname()


def process_gone(worker: str) -> bool:
    """True for `host:pid` of a process on this machine that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != this_host() or not pid.isdigit():
        return False  # another machine's worker: heartbeats, not us, decide
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover(study: optuna.Study, storage: optuna.storages.BaseStorage, end_lost_run: Callable[[str, str], None],
            handled: set[int], unclaimed: dict[int, float] | None = None) -> None:
    """Fail and requeue lost trials, and end their MLflow runs as KILLED. Safe to run in every worker at once:
    only the worker whose state change succeeds requeues a trial.

    A worker claims a trial (its `worker` attribute, and on RDB storages its first heartbeat) right after asking
    for it. A RUNNING trial nobody claims was orphaned inside `ask` (the storage failed after creating it, and
    the ask was retried): `unclaimed` remembers when this worker first saw each one, and after ORPHAN_AFTER_S
    of its own clock (no clocks are compared across machines) the trial is failed. It never ran, so it is
    not queued again."""
    beating = bool(heartbeat_interval(storage))
    if beating:  # Optuna fails stale trials and RetryHeartbeatStaleTrialCallback queues them again
        with_retries(optuna.storages.fail_stale_trials, study)
    trials = with_retries(study.get_trials, deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL))
    running = [t for t in trials if t.state == TrialState.RUNNING]
    if unclaimed is not None:
        by_number = {t.number: t for t in trials}
        _fail_orphans(study, storage, [t for t in running if not _claimed(t, by_number)], unclaimed, handled)
    for trial in (t for t in running if not beating):
        worker = trial.user_attrs.get("worker")
        if worker and process_gone(worker):
            if not fail_trial(storage, trial._trial_id, f"worker {worker} died during the trial"):
                continue  # another worker got there first
            with_retries(study.enqueue_trial, trial.params, user_attrs={"retry_of": trial.number},
                         skip_if_exists=False)
            trials.append(with_retries(study._storage.get_trial, trial._trial_id))
    for trial in (t for t in trials if t.state == TrialState.FAIL):
        if trial.number in handled:
            continue
        handled.add(trial.number)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            end_lost_run(run_id, trial.user_attrs.get("fail_reason") or "worker lost: no heartbeat within the grace period")


def _claimed(trial, by_number: dict[int, Any]) -> bool:
    """Claimed by a worker: it has a `worker`, and not just the one Optuna's RetryHeartbeatStaleTrialCallback
    copied from the failed trial it retries (that worker is gone)."""
    worker = trial.user_attrs.get("worker")
    if worker is None:
        return False
    retried = by_number.get((trial.system_attrs.get("retry_history") or [None])[-1])
    return retried is None or retried.user_attrs.get("worker") != worker


ORPHAN_AFTER_S = float(os.environ.get("SWEEPLAB_ORPHAN_AFTER", "60"))


def _fail_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage, trials: list,
                  unclaimed: dict[int, float], handled: set[int]) -> None:
    now = time.monotonic()
    ids = {t._trial_id for t in trials}
    for trial_id in [i for i in unclaimed if i not in ids]:
        del unclaimed[trial_id]  # claimed or finished since
    for trial in trials:
        first_seen = unclaimed.setdefault(trial._trial_id, now)
        if now - first_seen >= ORPHAN_AFTER_S:
            del unclaimed[trial._trial_id]
            if fail_trial(storage, trial._trial_id, f"orphaned: no worker claimed it within {ORPHAN_AFTER_S:.0f} s (created "
                                     "while the storage was failing); it never ran"):
                handled.add(trial.number)


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with its reason; False when another worker (or its owner) finished it first."""
    try:  # the reason first: a finished trial takes no more attributes
        with_retries(storage.set_trial_user_attr, trial_id, "fail_reason", reason)
        with_retries(storage.set_trial_state_values, trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


@contextlib.contextmanager
def shielded():
    """Hold off SIGINT/SIGTERM while recording an interrupted trial, so a second Ctrl-C cannot leave its run
    RUNNING. Only the main thread can set handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_critical_depth = 0
_pending_stop: str | None = None


@contextlib.contextmanager
def critical():
    """A stop signal that arrives in here takes effect at the next `check_stop`. Storage writes run in here: the
    journal file's lock, taken and released in Python, would otherwise be left behind by an interrupt that
    lands between the two, stalling every other worker until Optuna's lock grace period ends."""
    global _critical_depth, _pending_stop
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1


def check_stop() -> None:
    """Raise the interrupt that arrived during a critical section. Called at safe points: between trials,
    once a trial's run exists, and after every epoch, so a stop never waits longer than an epoch."""
    global _pending_stop
    if _pending_stop and not _critical_depth:
        reason, _pending_stop = _pending_stop, None
        raise KeyboardInterrupt(reason)


def _stop_handler(signum, frame) -> None:
    global _pending_stop
    name = signal.Signals(signum).name
    if _critical_depth:
        _pending_stop = name
        return
    raise KeyboardInterrupt(name)


def raise_on_sigterm() -> None:
    """Ctrl-C and SIGTERM (a scheduler's stop, `kill`) both end a worker as an interrupt, deferred while a
    storage write is in progress (see `critical`)."""
    signal.signal(signal.SIGINT, _stop_handler)
    signal.signal(signal.SIGTERM, _stop_handler)
