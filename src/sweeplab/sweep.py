"""The sweep driver: Optuna asks, the loop trains, MLflow records; then the champion is registered.

`run_sweep` is `sweeplab sweep`: it opens the study and the MLflow experiment, starts one parent run, works
through the budget in this process or in N worker processes (`sweeplab worker`), and registers the study's best
model. `work` is one worker's loop; `run_trial` is one trial, from suggestion to finished run.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from .config import ConfigError, Sweep
from .experiment import run_experiment
from .loop import EpochRecord
from .outcome import Outcome
from .recovery import (Heartbeats, OutageError, check_stop, critical, fail_trial, heartbeat_interval, raise_on_sigterm,
                       recover, shielded, with_retries)
from .search import (ALIVE, FINISHED, budget, check_compatible, count, is_surplus, open_storage, open_study, redact, suggest,
                     worker_id)
from .tracking import (TAG_CONDITION, TAG_NOTE, TAG_ROLE, TAG_STATE, TAG_STUDY, TAG_TRIAL, TAG_STUDY_TRIAL_ATTR, Tracker, condition_label, finite, value_text,
                       run_name_for)

MAX_CONSECUTIVE_FAILURES = 3


class SweepError(Exception):
    """The sweep cannot go on (every trial fails, say): one line for the user, exit code 1."""


class PruningCallback:
    """Reports the validation loss to Optuna every `every` epochs and asks the pruner whether to stop.

    Each report is a storage write and each question reads every trial's values: on PostgreSQL ~6 ms together,
    a second per 80-epoch trial if done every epoch. All trials report at the same epochs, so the pruner still
    compares like with like; the curves themselves go to MLflow every epoch."""

    def __init__(self, trial: optuna.Trial, every: int = 1):
        self.trial, self.every = trial, every

    def __call__(self, record: EpochRecord) -> str | None:
        if not finite(record.val_loss) or record.epoch % self.every:
            return None  # the loop stops a diverging run itself
        with_retries(self.trial.report, record.val_loss, record.epoch)
        if with_retries(self.trial.should_prune):
            return f"pruned at epoch {record.epoch} (val_loss={record.val_loss:.4g})"
        return None


@dataclass
class SweepContext:
    """What a worker needs: the sweep, where to record, and under which parent run."""

    sweep: Sweep
    study: optuna.Study
    tracker: Tracker
    experiment_id: str
    parent_run_id: str | None
    n_trials: int
    storage: optuna.storages.BaseStorage | None = None
    tracking_uri: str = ""
    storage_url: str = ""
    handled_failures: set[int] = field(default_factory=set)  # failed trials whose runs were already settled
    heartbeats: Heartbeats = field(default_factory=lambda: Heartbeats(None))
    unsettled: dict[int, str] = field(default_factory=dict)  # trial id -> fail reason whose FAIL did not land
    unclaimed: dict[int, float] = field(default_factory=dict)  # RUNNING trials nobody claimed -> first seen


def run_trial(ctx: SweepContext, trial: optuna.Trial) -> str:
    """Train one claimed trial and record it in MLflow, then in Optuna (in that order: a finished trial always
    has its finished run). Returns the outcome: completed | pruned | diverged | failed. An interrupt at any
    point leaves the trial FAIL and its run KILLED."""
    run = None
    try:
        params = with_retries(suggest, trial, ctx.sweep.spec.space)  # a retry keeps the values already stored
        try:
            config = ctx.sweep.config_for(params)
        except ConfigError as exc:
            with_retries(trial.set_user_attr, "fail_reason", str(exc))
            _tell(ctx.study, trial, state=TrialState.FAIL)
            ctx.heartbeats.release(trial._trial_id)
            return "failed"
        tags = trial_tags(ctx.sweep, trial.number)
        with critical():  # the run and our handle on it come into being together
            run = ctx.tracker.trial_run(ctx.experiment_id, run_name_for(config, trial.number), config, tags,
                                        parent_run_id=ctx.parent_run_id)
        with_retries(trial.set_user_attr, TAG_STUDY_TRIAL_ATTR, run.run_id)
        check_stop()
        callbacks = [run.epoch_callback, _stop_point]
        if ctx.sweep.spec.pruner.type != "none":
            callbacks.append(PruningCallback(trial, report_every(ctx.sweep.spec, config.train.epochs)))
        result = run_experiment(config, callbacks=callbacks)
        history = result.history
        outcome = outcome_of(history)
        with critical():  # the run and the trial are recorded together; a stop waits the ~60 ms this takes
            run.finish(result, outcome, history.stop_reason, tags={TAG_STATE: outcome.trial_state,
                                                                   TAG_NOTE: trial_note(ctx.sweep, trial.number,
                                                                                        config, history)})
            told = settle(ctx.study, trial, history)
    except BaseException as exc:
        with shielded():
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            reason = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
            _record_failure(ctx, trial, run, reason, interrupted)
        if interrupted or isinstance(exc, OutageError):
            raise
        return "failed"
    ctx.heartbeats.release(trial._trial_id)
    return told


def trial_tags(sweep: Sweep, number: int | None) -> dict[str, str]:
    """The tags that say what a trial run is: role, study, trial number and, in a sweep with conditions, which."""
    tags = {TAG_ROLE: "trial", TAG_STUDY: sweep.spec.study}
    if number is not None:
        tags[TAG_TRIAL] = str(number)
    if sweep.spec.condition:
        tags[TAG_CONDITION] = condition_label(sweep.spec.condition)
    return tags


def trial_note(sweep: Sweep, number: int, config, history) -> str:
    """The trial run's description in the MLflow UI: its setting and how it ended."""
    from .config import value_at

    setting = ", ".join(f"{key} {value_text(value_at(config, key))}" for key in sweep.spec.space)
    where = f" ({condition_label(sweep.spec.condition)})" if sweep.spec.condition else ""
    outcome = outcome_of(history)
    if outcome == "completed":
        result = (f"completed: best validation loss {history.best_val_loss:.4g} at epoch {history.best_epoch} of "
                  f"{history.epochs_run}")
    else:
        result = f"{outcome}: {history.stop_reason}"
    return f"Trial #{number}{where}: {setting}. {result}."


def _record_failure(ctx: SweepContext, trial: optuna.Trial, run, reason: str, interrupted: bool) -> None:
    """Record a trial that ended in an exception: its run ended (KILLED when interrupted), the trial FAIL with
    the reason. Interrupted, one attempt each (the user is waiting; a trial left RUNNING is recovered by the
    others once this process is gone). Otherwise the writes are retried through an outage, and what still did
    not land is settled before this worker's next trial."""
    attempt = (lambda fn, *a, **k: fn(*a, **k)) if interrupted else with_retries
    ended = run is None
    if run is not None:
        with contextlib.suppress(Exception):
            attempt(run.end, "killed" if interrupted else "failed", reason, {TAG_STATE: "FAIL"})
            ended = True
    try:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            attempt(trial.set_user_attr, "fail_reason", reason)
            attempt(ctx.study.tell, trial, state=TrialState.FAIL)
    except Exception:
        ctx.unsettled[trial._trial_id] = reason  # still held: its heartbeat goes on until it is settled
        return
    ctx.heartbeats.release(trial._trial_id)
    if ended:
        ctx.handled_failures.add(trial.number)  # else recover() ends its run once it sees the FAIL


def _settle_unsettled(ctx: SweepContext) -> None:
    """Tell Optuna about the failed trials whose FAIL did not land (the storage was failing at the time)."""
    for trial_id, reason in list(ctx.unsettled.items()):
        fail_trial(ctx.storage, trial_id, reason)  # False: already failed by a worker that found it stale
        del ctx.unsettled[trial_id]
        ctx.heartbeats.release(trial_id)


def outcome_of(history) -> Outcome:
    return Outcome.of_history(history)


def settle(study: optuna.Study, trial: optuna.Trial, history) -> str:
    """Tell Optuna how a trial ended, once its MLflow run is finished. Diverged and pruned trials are both
    PRUNED to Optuna (ended early by design, counted in the budget), with the reason, so reports can tell the
    two apart."""
    outcome = outcome_of(history)
    with_retries(trial.set_user_attr, "best_epoch", history.best_epoch)
    if outcome == "completed":
        _tell(study, trial, history.best_val_loss)
        return outcome
    with_retries(trial.set_user_attr, "outcome", str(outcome))
    with_retries(trial.set_user_attr, "reason", history.stop_reason)
    _tell(study, trial, state=TrialState.PRUNED)
    return outcome


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None) -> None:
    """tell, retried through outages; a retry that finds its first attempt already landed is done."""
    def once() -> None:
        try:
            study.tell(trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    with_retries(once)


def report_every(spec, epochs: int) -> int:
    """Epochs between pruning checks: the sweep's `pruner.report_every`, else about 20 checks per trial."""
    return spec.pruner.report_every or max(1, epochs // 20)


def _stop_point(record: EpochRecord) -> None:
    check_stop()
    return None


def _quietly(fn: Callable, *args: Any, **kwargs: Any) -> None:
    """Best effort while already failing: the original error is what the user needs to see."""
    try:
        fn(*args, **kwargs)
    except Exception:
        pass


def _take_stock(ctx: SweepContext) -> tuple[int, int, int]:
    """Settle and recover lost trials, then count (finished, running, queued): a worker's view before it asks."""
    check_stop()
    if ctx.storage is not None:
        _settle_unsettled(ctx)
        recover(ctx.study, ctx.storage, ctx.tracker.end_if_running, ctx.handled_failures, ctx.unclaimed)
    states = [t.state for t in with_retries(ctx.study.get_trials, deepcopy=False)]
    return sum(state in FINISHED for state in states), states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


def _ask_place(ctx: SweepContext) -> optuna.Trial | None:
    """A new trial, claimed by this worker (its `worker` attribute, and its first heartbeat on storages that
    have them); or None when another worker took the last free place between our count and our ask (the
    asked trial is then given back unrun)."""
    trial = with_retries(ctx.study.ask)
    # the heartbeat first: if the storage goes away between the two writes, the trial is either stale (it has a
    # heartbeat) or unclaimed (it has no worker), and both are recovered; a worker without a heartbeat is not
    ctx.heartbeats.hold(trial._trial_id)
    with_retries(trial.set_user_attr, "worker", worker_id())
    if with_retries(is_surplus, ctx.study, trial.number, ctx.n_trials):
        with_retries(trial.set_user_attr, "surplus", True)
        _tell(ctx.study, trial, state=TrialState.FAIL)
        ctx.heartbeats.release(trial._trial_id)
        ctx.handled_failures.add(trial.number)
        return None
    return trial


def work(ctx: SweepContext, on_trial_end: Callable[[int, str], None] | None = None) -> int:
    """One worker: ask, train, tell, until the study holds n_trials finished trials. Returns trials run.

    Before each trial it recovers lost trials (stale heartbeats, dead local workers). When every remaining
    place is held by a running trial it waits rather than leaves: that trial may yet fail and be requeued."""
    ran = 0
    failures = 0
    poll = min(heartbeat_interval(ctx.storage) or 1.0, 1.0) if ctx.storage else 1.0
    while True:
        finished, running, queued = _take_stock(ctx)
        if finished >= ctx.n_trials:
            break
        if finished + running >= ctx.n_trials and not queued:
            time.sleep(poll)
            continue
        trial = _ask_place(ctx)
        if trial is None:
            continue
        outcome = run_trial(ctx, trial)
        ran += 1
        failures = failures + 1 if outcome == "failed" else 0
        if on_trial_end:
            on_trial_end(trial.number, outcome)
        if failures >= MAX_CONSECUTIVE_FAILURES:
            reason = ctx.study.get_trials(deepcopy=False)[trial.number].user_attrs.get("fail_reason", "")
            raise SweepError(f"{failures} trials in a row failed; the last: {reason}")
    return ran


def run_workload(ctx: SweepContext, on_trial_end: Callable[[int, str], None] | None = None) -> int:
    """The sweep's engine: the reference loop one trial at a time, or the vectorized engine in batches."""
    try:
        if ctx.sweep.spec.engine == "vectorized":
            return work_vectorized(ctx, on_trial_end)
        return work(ctx, on_trial_end)
    finally:
        ctx.heartbeats.close()


class _LoggerProcess:
    """Writes finished vectorized members to MLflow, then tells Optuna, in a process of its own: MLflow's
    store spends ~35 ms per run in Python, and a thread would fight the training for the GIL. The process is
    spawned (not forked: this one holds open database connections) and opens its own stores."""

    def __init__(self, ctx: SweepContext, processes: int = 2):
        import multiprocessing

        mp = multiprocessing.get_context("spawn")
        self.todo, self.done, self.abort = mp.Queue(), mp.Queue(), mp.Event()
        # Two writers: much of a log_batch is Python work outside SQLite's write lock, so they overlap.
        self.processes = [mp.Process(target=_logger_main, name=f"sweeplab-logger-{i}", daemon=True, args=(
            ctx.sweep.spec.optuna_study, trial_tags(ctx.sweep, None), ctx.tracking_uri, ctx.storage_url,
            ctx.experiment_id, ctx.parent_run_id,
            self.todo, self.done, self.abort)) for i in range(processes)]
        for process in self.processes:
            process.start()
        self.sent: dict[int, object] = {}  # trial number -> member, until acknowledged
        self.heartbeats = ctx.heartbeats

    def submit(self, member, note: str) -> None:
        self.sent[member.key.number] = member
        self.todo.put({"number": member.key.number, "trial_id": member.key._trial_id, "config": member.config,
                       "spec": member.spec, "history": member.history, "dataset": member.dataset,
                       "started": member.started, "note": note})

    def poll(self, on_trial_end=None, block: bool = False) -> None:
        import queue

        while self.sent:
            try:
                kind, number, detail = self.done.get(timeout=1.0) if block else self.done.get_nowait()
            except queue.Empty:
                dead = [p for p in self.processes if not p.is_alive()]
                if block and dead:
                    raise SweepError(f"an MLflow logger process ended unexpectedly (exit code {dead[0].exitcode})")
                if block:
                    continue
                return
            if kind == "error":
                raise SweepError(f"logging trial #{number} failed: {detail}")
            member = self.sent.pop(number, None)
            if member is not None:
                self.heartbeats.release(member.key._trial_id)  # told (or failed) by the logger
            if kind == "logged" and on_trial_end:
                on_trial_end(number, detail)

    def close(self, on_trial_end=None) -> None:
        self.poll(on_trial_end, block=True)
        self._stop()

    def _stop(self) -> None:
        for _ in self.processes:
            self.todo.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    def abandon(self) -> list:
        """Stop logging; the members not written are handed back (their trials are then failed)."""
        self.abort.set()
        self._stop()
        import queue

        while True:
            try:
                kind, number, _ = self.done.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if kind == "logged":
                member = self.sent.pop(number, None)
                if member is not None:
                    self.heartbeats.release(member.key._trial_id)
        return list(self.sent.values())


def _logger_main(study_name, tags, tracking_uri, storage_url, experiment_id, parent_run_id, todo, done, abort) -> None:
    import signal as signals

    signals.signal(signals.SIGINT, signals.SIG_IGN)  # the sweep process decides; this one finishes its item
    signals.signal(signals.SIGTERM, signals.SIG_IGN)
    from .experiment import RunResult

    import multiprocessing
    import queue

    tracker = Tracker(tracking_uri)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    sweep_process = multiprocessing.parent_process()
    while True:
        try:
            item = todo.get(timeout=1.0)
        except queue.Empty:
            item = ...
        if sweep_process is not None and not sweep_process.is_alive():
            return  # killed: its trials stopped heartbeating and go to the surviving workers, not to us
        if item is None:
            return
        if item is ...:
            continue
        if abort.is_set():
            done.put(("skipped", item["number"], None))
            continue
        try:
            trial = optuna.trial.Trial(study, item["trial_id"])
            history = item["history"]
            result = RunResult(item["config"], item["dataset"], item["spec"], None, history, None, None)
            outcome = _record_member(tracker, study, trial, item["number"], result, {**tags, TAG_NOTE: item["note"]},
                                     experiment_id, parent_run_id, item["started"])
            done.put(("logged", item["number"], outcome))
        except Exception as exc:
            done.put(("error", item["number"], f"{type(exc).__name__}: {exc}"))


def _record_member(tracker: Tracker, study: optuna.Study, trial, number: int, result, tags: dict[str, str],
                   experiment_id: str, parent_run_id: str | None, started: float) -> str:
    """One vectorized member: its whole MLflow run, then its Optuna outcome, as run_trial records a trial."""
    history = result.history
    outcome = outcome_of(history)
    tracker.log_finished_run(
        experiment_id, run_name_for(result.config, number), result, outcome, history.stop_reason,
        {**tags, TAG_TRIAL: str(number), TAG_STATE: outcome.trial_state, "sweeplab.engine": "vectorized"},
        parent_run_id, int(started * 1000), int(time.time() * 1000),
        on_created=lambda run_id: with_retries(trial.set_user_attr, TAG_STUDY_TRIAL_ATTR, run_id))
    return settle(study, trial, history)


LEARNING_ROUNDS = 4  # batches after TPE's random start-up, so that it learns between them


def learns(spec) -> bool:
    """Whether the sampler proposes from earlier results (TPE) rather than independently (random, grid)."""
    return spec.sampler.type == "tpe"


def batch_size(spec, asked: int, n_trials: int) -> int:
    """Trials to ask together. A sampler that learns must see results between batches, or a batch of 256 asked
    at once is a random search: TPE's random start-up trials go in one batch, the rest of the budget in
    LEARNING_ROUNDS batches. Random and grid samplers learn nothing: as many as batch_trials allows."""
    if not learns(spec):
        return spec.batch_trials
    startup = spec.sampler.n_startup_trials
    if asked < startup:
        return min(spec.batch_trials, startup - asked)
    return min(spec.batch_trials, max(1, math.ceil((n_trials - startup) / LEARNING_ROUNDS)))


def work_vectorized(ctx: SweepContext, on_trial_end: Callable[[int, str], None] | None = None) -> int:
    """Ask up to `batch_trials` trials, train them stacked (grouped by shape), log and tell each; repeat until
    the budget holds. Pruners see each member's validation loss at the same epochs as in the reference loop."""
    from .vectorized import group_members, prepare_member, train_group

    import torch

    spec = ctx.sweep.spec
    # a writer process costs ~3 s of imports to start; a second one pays off only for many trials
    logger = _LoggerProcess(ctx, processes=1 if ctx.n_trials <= 100 else 2)
    torch.set_num_threads(1)  # the two cores go to training and to the MLflow writers
    pending: list = []  # asked and not yet handed to the logger
    ran = 0
    try:
        while True:
            logger.poll(on_trial_end)
            finished, running, _ = _take_stock(ctx)
            if finished >= ctx.n_trials:
                break
            free = ctx.n_trials - finished - running
            if free <= 0:
                # the last places are held by running trials: ours in the logger, or another worker's
                logger.poll(on_trial_end, block=bool(logger.sent)) if logger.sent else time.sleep(0.2)
                continue
            if learns(spec) and logger.sent and finished + running >= spec.sampler.n_startup_trials:
                # TPE proposes from the results it has been told: the previous batch's first
                logger.poll(on_trial_end, block=True)
                continue
            pending = []
            for _ in range(min(batch_size(spec, finished + running, ctx.n_trials), free)):
                trial = _ask_place(ctx)
                if trial is None:
                    break
                params = with_retries(suggest, trial, spec.space)
                pending.append(prepare_member(trial, ctx.sweep.config_for(params)))
            every = report_every(spec, pending[0].config.train.epochs) if pending else 1

            def prune(member, epoch: int, val_loss: float) -> str | None:
                check_stop()
                if spec.pruner.type == "none" or epoch % every or not finite(val_loss):
                    return None
                if logger.sent:
                    # Optuna's pruners compare with COMPLETE trials only: the batches before this one must be
                    # told before its first check, or a pipelined sweep prunes nothing (the writers, starting
                    # up, would tell every trial after the last batch had trained).
                    logger.poll(on_trial_end, block=True)
                with_retries(member.key.report, val_loss, epoch)
                if with_retries(member.key.should_prune):
                    return f"pruned at epoch {epoch} (val_loss={val_loss:.4g})"
                return None

            for group in group_members(pending):
                train_group(group, on_epoch=prune)
            for member in pending:
                logger.submit(member, trial_note(ctx.sweep, member.key.number, member.config, member.history))
            ran += len(pending)
            pending = []
        logger.close(on_trial_end)
    except BaseException as exc:
        with shielded():
            left = logger.abandon() + pending
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
            for member in left:
                _record_failure(ctx, member.key, None, reason, interrupted=True)
        raise
    return ran


# --- the coordinator ------------------------------------------------------------------------------------------

@dataclass
class PartOutcome:
    """One condition of a sweep (the whole sweep when it has none): its study, trials run now, its champion."""

    sweep: Sweep
    study: optuna.Study
    ran: int
    champion: dict[str, Any] | None = None


@dataclass
class SweepOutcome:
    parts: list[PartOutcome]
    parent_run_id: str
    experiment_id: str
    notes: list[str] = field(default_factory=list)

    @property
    def ran(self) -> int:
        return sum(part.ran for part in self.parts)


def prepare(sweep: Sweep, tracking_uri: str, storage_url: str, worker_index: int = 0) -> list[SweepContext]:
    """Open the storage and the MLflow experiment once, then the study of each part of the sweep (one per
    condition, or the sweep itself): one context per part, without a parent run yet. Every study is checked
    against the sweep file before anything runs."""
    check_separate_stores(tracking_uri, storage_url)
    # Both stores are reached before either is written to: a remote tracking store is probed (reading), then the
    # Optuna storage opened, and only then a local MLflow database created.
    remote = None if tracking_uri.startswith("sqlite:///") else Tracker(tracking_uri)
    if remote is not None:
        remote.check_reachable()
    storage = open_storage(storage_url)
    tracker = remote or Tracker(tracking_uri)
    epochs = sweep.config_for({}).train.epochs
    contexts = []
    for part in sweep.parts():
        study = open_study(part.spec, storage, worker_index, epochs)
        check_compatible(study, part.spec, part.source)
        contexts.append(SweepContext(part, study, tracker, "", None, budget(part.spec), storage, tracking_uri,
                                     storage_url, heartbeats=Heartbeats(storage)))
    experiment_id = tracker.experiment_id(sweep.spec.study)
    with_retries(tracker.reap_dead_local_runs, experiment_id, what="the MLflow tracking store")
    for ctx in contexts:
        ctx.experiment_id = experiment_id
    return contexts


def check_separate_stores(tracking_uri: str, storage_url: str) -> None:
    """Optuna's tables inside MLflow's SQLite database would mix two schemas in one file that both tools migrate
    on their own: refuse it."""
    from pathlib import Path

    def sqlite_file(url: str) -> Path | None:
        return Path(url[len("sqlite:///"):]).resolve() if url.startswith("sqlite:///") else None

    if sqlite_file(storage_url) is not None and sqlite_file(storage_url) == sqlite_file(tracking_uri):
        raise ConfigError(f"--storage {redact(storage_url)}: that is the MLflow tracking database; give Optuna a file "
                          "of its own (or leave --storage out: optuna.journal beside the database)")


def start_parent_run(tracker: Tracker, experiment_id: str, sweep: Sweep, storage_url: str, workers: int,
                     role: str = "sweep") -> str:
    spec = sweep.spec
    name = f"{role} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = tracker.start_run(experiment_id, name, {TAG_ROLE: role, TAG_STUDY: spec.study,
                                                      "sweeplab.sweep_file": sweep.source,
                                                      "sweeplab.storage": redact(storage_url)})
    from mlflow.entities import Param

    params = {"study": spec.study, "engine": spec.engine, "sampler": spec.sampler.type, "sampler_seed": str(spec.sampler.seed),
              "pruner": spec.pruner.type, "n_trials": str(spec.n_trials), "workers": str(workers),
              "repeats": str(spec.repeats), "space": ",".join(spec.space), "conditions": ",".join(spec.conditions),
              "continuous": ",".join(name for name, param in spec.space.items()  # ranges, not levels: plotted
                                     if any(case.kind != "categorical" for case in (param.cases or {"": param}).values()))}
    tracker.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return run_id


def run_sweep(sweep: Sweep, tracking_uri: str, storage_url: str, workers: int = 1,
              progress: Callable[[optuna.Study, int, str], None] | None = None, register: bool = True) -> SweepOutcome:
    """`sweeplab sweep`: this process works as worker 0; with workers=N it forks N-1 helpers first. A sweep with
    conditions runs them one after the other, each its own study with its share of the budget, under one parent
    run; each condition gets its champion."""
    helpers = _fork_helpers(sweep, tracking_uri, storage_url, workers - 1)
    try:
        contexts = prepare(sweep, tracking_uri, storage_url)
        tracker, experiment_id = contexts[0].tracker, contexts[0].experiment_id
        parent = start_parent_run(tracker, experiment_id, sweep, storage_url, workers)
        describe_study(tracker, experiment_id, sweep)
        for ctx in contexts:
            ctx.parent_run_id = parent
    except BaseException:
        _release(helpers, "")
        _wait(helpers)
        raise
    _release(helpers, parent)
    try:
        if helpers:
            import torch

            torch.set_num_threads(1)  # one core per worker
        outcome = SweepOutcome([], parent, experiment_id)
        for ctx in contexts:
            before = count(ctx.study, FINISHED)
            label = condition_label(ctx.sweep.spec.condition)
            report = (lambda number, result, ctx=ctx, label=label: progress(ctx.study, ctx.n_trials, label)) \
                if progress else None
            run_workload(ctx, on_trial_end=report)
            outcome.parts.append(PartOutcome(ctx.sweep, ctx.study, count(ctx.study, FINISHED) - before))
        check_stop()  # a stop that arrived while the last trial was being recorded
        last = contexts[-1]
        failed = _wait(helpers, lambda: progress(last.study, last.n_trials, condition_label(last.sweep.spec.condition))
                       if progress else None)
        if failed and any(count(ctx.study, FINISHED) < ctx.n_trials for ctx in contexts):
            raise SweepError(f"{len(failed)} of {len(helpers)} helper workers failed (exit codes {failed}); "
                             "see their messages above")
        if register:
            from .champion import register_champion

            for part in outcome.parts:
                if count(part.study, (TrialState.COMPLETE,)):
                    part.champion = register_champion(tracker, part.study, sweep.spec.study, experiment_id,
                                                      champion_alias(part.sweep), part.sweep.spec.condition)
        with critical():
            tracker.client.set_tag(parent, TAG_NOTE, outcome_note(outcome))
            tracker.end_run(parent, "completed")
    except BaseException as exc:
        with shielded():
            interrupted = isinstance(exc, KeyboardInterrupt)
            _signal_helpers(helpers)
            _wait(helpers, timeout=20)
            _quietly(tracker.end_run, parent, "killed" if interrupted else "failed",
                     "interrupted" if interrupted else f"{type(exc).__name__}: {exc}")
        raise
    return outcome


def describe_study(tracker: Tracker, experiment_id: str, sweep: Sweep) -> None:
    """The experiment's description (what the study compares) and the view the printed UI link opens."""
    from .tracking import share_view

    spec = sweep.spec
    searched = ", ".join(spec.space)
    compared = "; ".join(f"{key} in {values}" for key, values in spec.conditions.items())
    text = (f"sweeplab study {spec.study}: searches {searched} ({spec.sampler.type} sampler, {spec.n_trials} trials"
            + (f") separately for each condition: {compared}, an equal share of trials each" if compared else ")")
            + f". Lower best_val_loss (validation loss at the best epoch) is better. Sweep file: {sweep.source}.")
    tracker.client.set_experiment_tag(experiment_id, TAG_NOTE, text)
    share_view(tracker.client, experiment_id, [*spec.space, *spec.conditions], list(spec.conditions))


def outcome_note(outcome: SweepOutcome) -> str:
    """The parent run's description: the best trial of each condition (the report, when written, says more)."""
    lines = []
    for part in outcome.parts:
        where = f"{condition_label(part.sweep.spec.condition)}: " if part.sweep.spec.condition else ""
        top = best_trials(part.study, 1)
        if not top:
            lines.append(f"{where}no trial completed.")
            continue
        best = top[0]
        alias = f" (models:/{part.champion['name']}@{part.champion['alias']})" if part.champion else ""
        lines.append(f"{where}best is trial #{best.number}, best_val_loss {best.value:.4g}{alias}.")
    return "\n\n".join(lines)


def champion_alias(part: Sweep) -> str:
    """`champion` for the base experiment's own condition (or a sweep without conditions); `champion-noise-1_0`
    for another (MLflow's aliases take letters, digits, _ and - only)."""
    import re

    from .champion import ALIAS

    if part.own_setting:
        return ALIAS
    words = [f"{key}-{value}" for key, value in part.spec.condition.items()]
    return re.sub(r"[^\w-]", "_", "-".join([ALIAS, *words]))


@dataclass
class _Helper:
    pid: int
    pipe: int  # write end: the parent run id, once it exists ("" means: exit without working)


def _fork_helpers(sweep: Sweep, tracking_uri: str, storage_url: str, n: int) -> list[_Helper]:
    """Fork the extra local workers right away, before this process opens any store or starts any thread (only
    the main thread exists after the imports), so each starts with the imports already paid for and opens its
    own database connections. Each waits on a pipe for the parent run id, then works like `sweeplab worker`."""
    helpers = []
    for index in range(1, n + 1):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            _helper_main(sweep, tracking_uri, storage_url, index, read_end)
        os.close(read_end)
        helpers.append(_Helper(pid, write_end))
    return helpers


def _helper_main(sweep: Sweep, tracking_uri: str, storage_url: str, index: int, pipe: int) -> None:
    code = 0
    raise_on_sigterm()
    try:
        with os.fdopen(pipe) as reader:
            parent = reader.read().strip()
        if parent:
            import torch

            torch.set_num_threads(1)
            for ctx in prepare(sweep, tracking_uri, storage_url, worker_index=index):
                ctx.parent_run_id = parent
                run_workload(ctx)
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:
        print(f"sweeplab: worker {index}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never return into the parent's code path


def _signal_helpers(helpers: list[_Helper]) -> None:
    """Pass a stop on to the helpers (Ctrl-C reaches them anyway; SIGTERM or an error here does not)."""
    for helper in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper.pid, signal.SIGTERM)


def _release(helpers: list[_Helper], parent_run_id: str) -> None:
    for helper in helpers:
        try:
            os.write(helper.pipe, parent_run_id.encode())
        finally:
            os.close(helper.pipe)


def _wait(helpers: list[_Helper], tick: Callable[[], None] | None = None, timeout: float | None = None) -> list[int]:
    """Wait for the helpers; returns the non-zero exit codes. With a timeout (after Ctrl-C, which reached the
    whole process group), helpers still running then are killed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = {h.pid for h in helpers}
    failed = []
    while pending:
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code:
                    failed.append(code)
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                for pid in pending:
                    os.kill(pid, signal.SIGKILL)
                deadline = None
            time.sleep(0.1)
            if tick:
                tick()
    return failed


def run_worker(sweep: Sweep, tracking_uri: str, storage_url: str, parent_run_id: str | None,
               worker_index: int) -> int:
    """`sweeplab worker`: join the study and work until the budget is reached. Without a parent run id (a
    worker on another machine), it opens a parent run of its own for this invocation."""
    import torch

    torch.set_num_threads(1)
    contexts = prepare(sweep, tracking_uri, storage_url, worker_index)
    tracker = contexts[0].tracker
    own_parent = parent_run_id is None
    if own_parent:
        parent_run_id = start_parent_run(tracker, contexts[0].experiment_id, sweep, storage_url, 1, role="worker")
    ran = 0
    try:
        for ctx in contexts:
            ctx.parent_run_id = parent_run_id
            ran += run_workload(ctx)
    except BaseException as exc:
        if own_parent:
            interrupted = isinstance(exc, KeyboardInterrupt)
            _quietly(tracker.end_run, parent_run_id, "killed" if interrupted else "failed", str(exc) or "interrupted")
        raise
    if own_parent:
        tracker.end_run(parent_run_id, "completed")
    return ran


def best_trials(study: optuna.Study, top: int = 5) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(done, key=lambda t: t.value)[:top]


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("surplus"):
            continue
        label = trial.user_attrs.get("outcome") or trial.state.name.lower()
        counts[label] = counts.get(label, 0) + 1
    return counts


__all__ = ["run_sweep", "run_worker", "work", "run_trial", "SweepError", "best_trials", "ALIVE"]
