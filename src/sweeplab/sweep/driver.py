"""The sweep driver: the ledger leases trials, an engine trains them, the recorder writes them; then the champion.

`run_sweep` is `sweeplab sweep`: it opens the stores, starts one parent run, works through each condition's
budget in this process (and in N-1 forked helpers), and registers each condition's best model. `run_worker` is
`sweeplab worker`, the same work joining a study from anywhere. `work` is one worker on one study:

    lease a batch (ledger) -> train it (engine) -> write each run, then tell its trial (recorder)

until the study holds its budget of finished trials. Where to look next: ledger.py (everything Optuna, recovery),
train/engines.py (the two engines), track/recorder.py and writers.py (MLflow), stop.py (Ctrl-C and SIGTERM).
After the search: confirm.py (more seeds), refit.py (a data.folds winner), then the champions (track/champion.py).

Why one module of ~700 lines: `work` (one worker's batch loop) and the two ways into it, `run_sweep` and
`run_worker`, share the Part a condition runs as and the order of its steps (lease, train, hand over, confirm,
crown); split, that order would be read across files back and forth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Callable

import optuna

from sweeplab.config import ConfigError
from sweeplab.outcome import Outcome
from sweeplab.process import use_threads
from sweeplab.stop import stop_flag
from sweeplab.stores import OutageError, check_separate_stores, env_number, redact, with_retries, worker_id
from sweeplab.sweep.batching import batch_size, learns
from sweeplab.sweep.confirm import Confirmation, confirm_sweep, confirmed, enqueue_repeats
from sweeplab.sweep.helpers import Helpers
from sweeplab.sweep.ledger import RUN_ID_ATTR, WORKER_ATTR, Ledger, best_trials, finished_count, finished_trials
from sweeplab.sweep.probes import Plan
from sweeplab.sweep.refit import refit
from sweeplab.sweep.search import CODE_KEY, budget, check_compatible, label_study, open_storage, open_study, values_of
from sweeplab.sweep.spec import Sweep, result_settings
from sweeplab.sweep.writers import InlineWriter, WriterPool, WriterSetup
from sweeplab.track.champion import (
    ALIAS,
    TAG_OBJECTIVE_MEAN,
    TAG_OBJECTIVE_STD,
    TAG_SEEDS,
    Champion,
    register_champion,
    score_on_test,
)
from sweeplab.track.recorder import Recorder, finite
from sweeplab.track.tracker import TAG_REFIT_OF, TAG_ROLE, TAG_STUDY, Tracker, condition_label
from sweeplab.train.crossval import Folded, refit_config
from sweeplab.train.engines import Engine, Job, Routes, engine_named
from sweeplab.train.epoch import EpochRecord
from sweeplab.train.items import BatchError
from sweeplab.train.loop import ShapeError
from sweeplab.train.plugins import REGISTERED, in_main, main_sources, source_of
from sweeplab.train.sources import import_paths, source_hashes

MAX_CONSECUTIVE_FAILURES = 3
# A writer process costs ~3 s of imports to start: it pays off only for more trials (per condition) than this.
WRITERS_FROM_TRIALS = env_number("SWEEPLAB_WRITERS_FROM_TRIALS", 100, int)


class SweepError(Exception):
    """The sweep cannot go on (every trial fails, say): one line for the user, exit code 1."""


@dataclass
class Part:
    """One condition of a sweep (the whole sweep when it has none) as one worker sees it: its study and ledger,
    and where its runs go."""

    sweep: Sweep
    study: optuna.Study
    ledger: Ledger
    tracker: Tracker
    experiment_id: str
    tracking_uri: str
    storage_url: str
    parent_run_id: str | None = None
    pool_writers: bool = True  # False when every core already runs a condition (conditions side by side)
    routes: Routes = field(default_factory=Routes)  # the plan's: where each configuration trains, decided once
    confirm: optuna.Study | None = None  # the study of its confirmation's repeats (`confirm:`), opened and checked

    @property
    def n_trials(self) -> int:
        return self.ledger.n_trials


# --- one worker on one study --------------------------------------------------------------------------------


def work(part: Part, on_trial_end: Callable[[int, str], None] | None = None) -> int:
    """Lease, train, record, until the study holds its budget of finished trials. Returns the trials trained here.

    Before each batch the ledger recovers lost trials (stale heartbeats, dead local workers, orphans). When every
    remaining place is held by a running trial the worker waits rather than leaves: that trial may yet fail and be
    queued again."""
    spec = part.sweep.spec
    engine = Folded(engine_named(spec.engine, part.routes))  # a data.folds trial as its fold members
    setup = WriterSetup(
        part.tracking_uri,
        part.storage_url,
        spec.optuna_study,
        part.n_trials,
        part.experiment_id,
        part.parent_run_id,
        spec.study,
        tuple(spec.space),
        dict(spec.condition),
        engine.name,
        main_sources(),
    )
    recorder = setup.recorder(part.tracker, part.ledger)  # the one a writer process builds for itself
    pooled = not engine.live and part.n_trials > WRITERS_FROM_TRIALS and part.pool_writers
    writer = WriterPool(setup, part.ledger, processes=2) if pooled else InlineWriter(recorder)
    poll = part.ledger.poll_interval
    ran = failures = 0
    in_hand: list[Job] = []  # leased and not yet handed to the writer
    try:
        while True:
            writer.collect(on_trial_end)
            stock = part.ledger.take_stock()
            if stock.finished >= part.n_trials:
                break
            if stock.finished + stock.running >= part.n_trials and not stock.queued:
                writer.collect(on_trial_end, block=True) if writer.busy() else stop_flag.wait(poll)
                continue
            if learns(spec) and writer.busy() and stock.finished + stock.running >= spec.sampler.n_startup_trials:
                writer.drain(on_trial_end)  # TPE proposes from what it has been told: the previous batch first
                continue
            places = max(part.n_trials - stock.finished - stock.running, stock.queued, 1)
            size = min(batch_size(spec, engine.stacks, stock.finished + stock.running, part.n_trials), places)
            in_hand, refused = lease_jobs(part, size, on_trial_end)
            if not in_hand and not refused:
                continue  # another worker took the last place
            tried = len(in_hand) + refused
            ran += tried
            failed = refused + train_and_hand_over(part, engine, recorder, writer, in_hand, on_trial_end)
            failures = failures + failed if failed == tried else 0  # in a row: a batch with a success resets it
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise SweepError(f"{failures} trials in a row failed; the last: {part.ledger.last_failure}")
        writer.drain(on_trial_end)
        # a worker on this machine killed after its last trial left only its own parent run RUNNING, which no
        # trial's recovery ends: the survivors end it as they finish (a run's process that is gone, only)
        with contextlib.suppress(Exception):
            part.tracker.reap_dead_local_runs(part.experiment_id)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"
        for job in writer.abandon() + in_hand:
            recorder.fail(job.run, job.lease, reason, interrupted=True)
        raise
    finally:
        writer.close()
        part.ledger.close()
    return ran


def lease_jobs(part: Part, size: int, on_trial_end=None) -> tuple[list[Job], int]:
    """Up to `size` leased trials with their configs, and how many were refused: a suggestion the config refuses
    (a combination the sweep file allows and the experiment does not) fails its trial with the reason."""
    jobs, refused = [], 0
    for _ in range(size):
        lease = part.ledger.lease()
        if lease is None:
            break
        try:
            jobs.append(Job(lease, part.sweep.config_for(lease.params)))
        except ConfigError as exc:
            part.ledger.fail(lease, str(exc))
            refused += 1
            if on_trial_end:
                on_trial_end(lease.number, "failed")
    return jobs, refused


def train_and_hand_over(
    part: Part, engine: Engine, recorder: Recorder, writer, jobs: list[Job], on_trial_end=None
) -> int:
    """Train a batch and hand each trained job to the writer. An error fails the jobs it left untrained (their
    runs FAILED, their trials FAIL with the reason) and the sweep goes on, unless the stores are out of reach.
    Returns how many failed."""
    if not jobs:
        return 0
    spec = part.sweep.spec
    reports = report_epochs(spec, jobs[0].config.train.epochs)
    pruning = spec.pruner.type != "none"

    def on_epoch(job: Job, record: EpochRecord) -> str | None:
        if job.run is not None:
            job.run.epoch_callback(record)
        if not pruning or not reports(record.epoch) or not finite(record.value):
            return None  # a diverging run is stopped by the engine itself
        # the median pruner compares with COMPLETE trials only: the batches before this one are told first, or a
        # pipelined sweep prunes nothing (its writers, starting up, would tell every trial after the last batch).
        # Successive halving (and hyperband's brackets of it) compares with every trial that reached the rung,
        # which it records as it asks: it waits for no writer (a 1,000-trial sweep waited 21 s here)
        if spec.pruner.type == "median":
            writer.drain(on_trial_end)
        if part.ledger.should_prune(job.lease, record.epoch, record.value):
            metric = job.config.objective.metric
            return f"pruned at epoch {record.epoch} ({metric}={record.value:.4g})"
        return None

    failed = 0

    def fail(job: Job, exc: Exception) -> None:
        nonlocal failed
        jobs.remove(job)
        recorder.fail(job.run, job.lease, f"{type(exc).__name__}: {exc}", config=job.config)
        failed += 1
        if on_trial_end:
            on_trial_end(job.lease.number, "failed")
        if isinstance(exc, (OutageError, BatchError, ShapeError)):
            raise exc  # the stores are gone, or the data is bad input: every next trial would fail the same way

    try:
        if engine.live:
            for job in jobs:
                job.run = recorder.begin(job.lease, job.config)
        stop_flag.check()
        engine.train(jobs, on_epoch if engine.live or pruning else None)  # the engine checks the stop flag
    except Exception as exc:  # an interrupt is the caller's to record: `jobs` still holds what it must fail
        for job in [j for j in jobs if j.result is None]:
            fail(job, exc)
    for job in [j for j in jobs if j.error is not None]:  # failed alone; the rest of its batch trained
        fail(job, job.error)
    # trained without a result (no finite objective at any epoch): written as FAILED, and a failure in a row
    failed += sum(1 for job in jobs if job.result is not None and job.result.history.status == "failed")
    for job in list(jobs):  # each leaves `jobs` once the writer has it
        try:
            writer.submit(job, on_trial_end)
        except Exception as exc:
            fail(job, exc)
        else:
            jobs.remove(job)
    return failed


def report_epochs(spec, epochs: int):
    """Whether an epoch is a pruning check: every `pruner.report_every` epochs; else, for successive halving and
    hyperband, the rungs (min_resource * reduction_factor ** i: the only epochs they decide at; each of
    hyperband's brackets is a successive halving whose rungs start i rungs later), and about 20 checks per trial
    for the others.

    Each report is a storage write and each question reads every trial's values: on PostgreSQL ~6 ms together,
    a second per 80-epoch trial if done every epoch. All trials report at the same epochs, so the pruner still
    compares like with like; the curves themselves go to MLflow every epoch."""
    pruner = spec.pruner
    if pruner.report_every is None and pruner.type in ("successive_halving", "hyperband"):
        rungs, rung = set(), min(pruner.min_resource, epochs)
        while rung <= epochs:
            rungs.add(rung)
            rung *= pruner.reduction_factor
        return rungs.__contains__
    every = pruner.report_every or max(1, epochs // 20)
    return lambda epoch: epoch % every == 0


# --- the stores, once for every condition ---------------------------------------------------------------------


def prepare(
    sweep: Sweep, tracking_uri: str, storage_url: str, worker_index: int = 0, routes: Routes | None = None
) -> list[Part]:
    """Open the storage and the MLflow experiment once, then the study of each part of the sweep (one per
    condition, or the sweep itself): one Part each, without a parent run yet. Every study is checked against the
    sweep file before anything runs. `sweep` is settled (probes.settle): its engine is decided."""
    check_separate_stores(tracking_uri, storage_url)
    # Both stores are reached before either is written to: a remote tracking store is probed (reading), then the
    # Optuna storage opened, and only then a local MLflow database created.
    remote = None if tracking_uri.startswith("sqlite:///") else Tracker(tracking_uri)
    if remote is not None:
        remote.check_reachable()
    storage = open_storage(storage_url)
    tracker = remote or Tracker(tracking_uri)
    epochs = sweep.base_config.train.epochs
    studies, confirms = [], {}
    for part in sweep.parts():
        objective = part.base_config.objective
        study, settings = open_checked(part, storage, worker_index, epochs)
        check_same_tracking_store(study, tracker, part.source, storage_url, tracking_uri)
        studies.append((part, study, settings, objective))
        if part.spec.confirm is not None:  # its repeats' study, checked as the search's is
            confirms[part.spec.optuna_study] = open_checked(confirm_sweep(part), storage, worker_index, epochs)
    for part, study, settings, objective in studies:  # once every part is known to fit
        with_retries(label_study, study, settings, objective.column)
        if part.spec.optuna_study in confirms:
            with_retries(label_study, *confirms[part.spec.optuna_study], objective.column)
    experiment_id = tracker.experiment_id(sweep.spec.study)
    with_retries(tracker.reap_dead_local_runs, experiment_id, what="the MLflow tracking store")
    return [
        Part(
            part,
            study,
            Ledger(study, storage, budget(part.spec), part.spec.space, runs=tracker),
            tracker,
            experiment_id,
            tracking_uri,
            storage_url,
            routes=routes if routes is not None else Routes(),
            confirm=confirms.get(part.spec.optuna_study, (None,))[0],
        )
        for part, study, _, _ in studies
    ]


def open_checked(part: Sweep, storage, worker_index: int, epochs: int):
    """A part's study and its result settings, the study checked against what the sweep file says it holds."""
    study = open_study(part.spec, storage, worker_index, epochs, part.base_config.objective.direction)
    settings = {**result_settings(part), **code_settings(part.base_config)}
    check_compatible(study, part.spec, part.source, settings)
    return study, settings


def check_same_tracking_store(study, tracker: Tracker, source: str, storage_url: str, tracking_uri: str) -> None:
    """A study whose trials' runs are in another MLflow store (two stores in one folder share the default journal,
    optuna.journal) would be resumed, then fail when its best run is looked up: refuse it first, in one line."""
    linked = next((t.user_attrs[RUN_ID_ATTR] for t in finished_trials(study) if RUN_ID_ATTR in t.user_attrs), None)
    if linked is None:
        return
    try:
        with_retries(tracker.client.get_run, linked, what="the MLflow tracking store")
    except OutageError:
        raise
    except Exception:
        raise ConfigError(
            f"{source}: study {study.study_name!r} in {redact(storage_url)} ran its trials against another MLflow "
            f"store (its run {linked} is not in {redact(tracking_uri)}); give this store a storage of its own "
            "(--storage journal:PATH) or the study another name (study=NAME)"
        ) from None


def code_settings(config) -> dict[str, str]:
    """The sha256 of the user's code a trial runs, as result settings: a study resumed after `relu` became `tanh`
    in the user's file, or in a helper module that file imports, would rank both in one table. Each module of the
    user's that the model, the data loader, the collate_fn, a loss, optimizer, scheduler or metric imports is one
    `code:<module>` key (train/sources.py); `model.source_sha256` / `data.source_sha256` are what studies
    recorded before those keys existed."""
    out = {}
    for key, path in (("model.source_sha256", config.model.class_path), ("data.source_sha256", config.data.class_path)):
        found = source_of(path, config.code_dir) if path else None
        if found is not None:
            out[key] = found[1]
    search = [config.code_dir] if config.code_dir else None
    for path in import_paths(config).values():
        if not (in_main(path) or path in REGISTERED):
            for module, sha256 in source_hashes(path.rpartition(".")[0], search).items():
                out[f"{CODE_KEY}{module}"] = sha256
    return out


def start_parent_run(
    tracker: Tracker, experiment_id: str, sweep: Sweep, storage_url: str, workers: int, role: str = "sweep"
) -> str:
    spec = sweep.spec
    name = f"{role} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    run_id = tracker.start_run(
        experiment_id,
        name,
        {
            TAG_ROLE: role,
            TAG_STUDY: spec.study,
            "sweeplab.sweep_file": sweep.source,
            "sweeplab.storage": redact(storage_url),
        },
    )
    params = {
        "study": spec.study,
        "engine": spec.engine,
        "sampler": spec.sampler.type,
        "sampler_seed": str(spec.sampler.seed),
        "pruner": spec.pruner.type,
        "n_trials": str(spec.n_trials),
        "workers": str(workers),
        "repeats": str(spec.repeats),
        "space": ",".join(spec.space),
        "conditions": ",".join(spec.conditions),
        "fields": ",".join(sweep.field_of(k) for k in [*spec.space, *spec.conditions]),
        "objective": f"{sweep.base_config.objective.metric} {sweep.base_config.objective.direction}",
        "continuous": ",".join(
            name
            for name, param in spec.space.items()  # ranges, not levels: plotted
            if any(case.kind != "categorical" for case in (param.cases or {"": param}).values())
        ),
    }
    tracker.log_params(run_id, params)
    return run_id


# --- `sweeplab sweep` ---------------------------------------------------------------------------------------------


@dataclass
class PartOutcome:
    """One condition of a sweep (the whole sweep when it has none): its study, trials run now, its champion."""

    sweep: Sweep
    study: optuna.Study
    ran: int
    champion: Champion | None = None
    confirmation: Confirmation | None = None  # its top trials over more seeds (`confirm:`), best mean first


@dataclass
class SweepOutcome:
    parts: list[PartOutcome]
    parent_run_id: str
    experiment_id: str
    notes: list[str] = field(default_factory=list)

    @property
    def ran(self) -> int:
        return sum(part.ran for part in self.parts)


def side_by_side(sweep: Sweep, workers: int) -> int:
    """How many of a sweep's conditions run at once. With one worker, one process per condition, up to this
    machine's cores ($SWEEPLAB_CONDITIONS_AT_ONCE lowers it): each condition is its own study, so its search is
    the one it would be alone, and a 2-core machine does twice the work. With workers=N, the N processes share
    each condition in turn."""
    if workers > 1:
        return 1
    cores = env_number("SWEEPLAB_CONDITIONS_AT_ONCE", os.cpu_count() or 1, int, 1)
    return max(1, min(len(sweep.parts()), cores))


def run_sweep(
    plan: Plan,
    tracking_uri: str,
    storage_url: str,
    workers: int = 1,
    progress: Callable[[optuna.Study, int, str], None] | None = None,
    register: bool = True,
    trials_done: Callable[[], None] | None = None,
) -> SweepOutcome:
    """`sweeplab sweep`: this process works as worker 0, with local helpers: workers-1 of them working through
    every condition with it, or (workers=1) one per further condition run side by side (`side_by_side`). A sweep
    with conditions gives each its own study with its share of the budget, under one parent run; each condition
    gets its champion. `trials_done()` is called once every trial is recorded, before the champions are
    registered (the CLI starts its report then). `plan` is the sweep settled (probes.settle)."""
    sweep = plan.sweep
    side = side_by_side(sweep, workers)
    # one core per worker or condition run side by side; the vectorized engine leaves the second to its writers
    use_threads(1 if workers > 1 or side > 1 or sweep.spec.engine == "vectorized" else None)
    helpers = Helpers(workers - 1 if side == 1 else side - 1)  # forked now: before this process opens any store
    try:
        parts = prepare(sweep, tracking_uri, storage_url, routes=plan.routes)
        tracker, experiment_id = parts[0].tracker, parts[0].experiment_id
        parent = start_parent_run(tracker, experiment_id, sweep, storage_url, workers)
        describe_study(tracker, experiment_id, sweep)
        before = [{t.number for t in finished_trials(part.study)} for part in parts]  # to count what this sweep ran
    except BaseException:
        helpers.close()
        raise
    # side by side: this process takes parts 0, side, 2*side...; helper i parts i, i+side...
    shares = [list(range(i, len(parts), side)) for i in range(side)]
    # every helper works through every part (workers=N), or helper i through the parts in shares[i] alone
    # (conditions side by side: each is then the only worker on its parts, with worker 0's sampler seed)
    helpers.start(
        _helper_work,
        lambda i: (plan, tracking_uri, storage_url, 0 if side > 1 else i, parent, shares[i] if side > 1 else None),
    )
    try:

        def tick(part: Part) -> None:
            if progress:
                progress(part.study, part.n_trials, condition_label(part.sweep.spec.condition))

        theirs = [parts[index] for share in shares[1:] for index in share] or parts[-1:]

        def tick_theirs() -> None:
            for other in theirs:
                tick(other)

        def ticks(part: Part) -> None:
            tick(part)
            if side > 1:  # the conditions the helpers run side by side: their bars move beside ours
                tick_theirs()

        for index in shares[0]:  # the bars (and the engine's header line) before anything trains
            ticks(parts[index])
        for index in shares[0]:
            part = parts[index]
            part.parent_run_id, part.pool_writers = parent, side == 1
            work(part, on_trial_end=lambda number, result, part=part: ticks(part))
        stop_flag.check()  # a stop that arrived while the last trial was being recorded
        champions: dict[int, Champion | None] = {}
        report_started = None
        confirming = sweep.spec.confirm is not None
        if side > 1 and register and not confirming:  # our champions now, while the helpers finish; the report
            # starts when they do
            report_started = _when_done(helpers.futures, trials_done)
            for index in shares[0]:
                champions[index] = crown(tracker, parts[index], experiment_id)
        failed = helpers.wait(tick_theirs)
        if failed and any(finished_count(part.study) < part.n_trials for part in parts):
            raise SweepError(f"{len(failed)} of {helpers.n} helper workers failed; the first: {failed[0]}")
        if side > 1:
            tick_theirs()
        confirmations: dict[int, Confirmation] = {}
        for index, part in enumerate(parts):  # every condition's search is over: its top trials over more seeds
            if part.confirm is not None:
                part.parent_run_id = parent
                confirmations[index] = confirm(part, progress)
        if (report_started is None or not report_started.result()) and trials_done is not None:
            trials_done()
        for index, part in enumerate(parts):
            if index not in champions:
                champions[index] = crown(tracker, part, experiment_id, confirmations.get(index)) if register else None
        ours = {worker_id(), *helpers.workers()}  # a second sweep on the same study at once runs trials too
        outcome = SweepOutcome(
            [
                PartOutcome(
                    part.sweep,
                    part.study,
                    sum(
                        t.number not in ran_before and t.user_attrs.get(WORKER_ATTR) in ours
                        for t in finished_trials(part.study)
                    ),
                    champions[index],
                    confirmations.get(index),
                )
                for index, (part, ran_before) in enumerate(zip(parts, before))
            ],
            parent,
            experiment_id,
        )
        tracker.set_note(parent, outcome_note(outcome))
        tracker.end_run(parent, Outcome.COMPLETED)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        ours = helpers.n > 0 and not stop_flag.is_set()
        if ours:
            stop_flag.request("the sweep process stopped")  # the helpers share the flag: they stop too
        helpers.wait(timeout=20)
        if ours:
            stop_flag.clear()  # the request was for the helpers, not for a later sweep in this process
        try:
            tracker.end_run(
                parent,
                Outcome.KILLED if interrupted else Outcome.FAILED,
                "interrupted" if interrupted else f"{type(exc).__name__}: {exc}",
            )
        except Exception:
            pass  # the original error is what the user needs to see
        raise
    finally:
        helpers.close()
    return outcome


def _when_done(futures: list, then: Callable[[], None] | None):
    """A future, True once `then()` was called from a thread when every future succeeded (False when one failed
    or there is no `then`): the helpers' end starts the report while this process is busy registering."""
    started: Future = Future()

    def watch() -> None:
        wait(futures)
        ok = then is not None and all(not f.cancelled() and f.exception() is None for f in futures)
        try:
            if ok:
                then()
        except Exception:  # the sweep failed meanwhile and closed what `then` starts: nothing to start
            ok = False
        started.set_result(ok)

    threading.Thread(target=watch, name="sweeplab-trials-done", daemon=True).start()
    return started


def confirm(part: Part, progress: Callable | None = None) -> Confirmation:
    """The condition's confirmation (sweep/confirm.py): its top trials' repeats queued (those a resume already
    has are not), trained by the sweep's engine as trials of the repeats' study, then ranked by their mean."""
    wanted = part.sweep.spec.confirm
    again = confirm_sweep(part.sweep)
    first_seed = part.sweep.base_config.seed
    n = enqueue_repeats(part.study, part.confirm, wanted.top, wanted.seeds, first_seed)
    ledger = Ledger(part.confirm, part.ledger.storage, n, again.spec.space, runs=part.tracker)
    repeats = dataclasses.replace(part, sweep=again, study=part.confirm, ledger=ledger, confirm=None)
    label = " ".join(filter(None, [condition_label(part.sweep.spec.condition), "confirm"]))

    def tick(*_) -> None:
        if progress:
            progress(repeats.study, n, label)

    tick()
    work(repeats, on_trial_end=tick)
    return confirmed(part.study, part.confirm, wanted.top, part.sweep.base_config.objective.column)


def crown(
    tracker: Tracker, part: Part, experiment_id: str, confirmation: Confirmation | None = None
) -> Champion | None:
    """The condition's best trial's model, registered under its alias (None when no trial completed); with a
    confirmation, the configuration with the best mean over seeds (its search run's weights), its version tagged
    with the mean, the std and the number of seeds."""
    top = best_trials(part.study, 1)
    if not top:
        return None
    best, tags = top[0], {}
    if confirmation is not None and confirmation.leader is not None:
        best, seeded = confirmation.ranking[0]
        tags = {
            TAG_OBJECTIVE_MEAN: repr(seeded.mean),
            TAG_OBJECTIVE_STD: repr(seeded.std),
            TAG_SEEDS: str(seeded.n),
        }
    config = part.sweep.config_for(values_of(best.params, part.sweep.spec.space))  # the winner's run's config
    if config.data.folds is not None:  # fold trials keep no weights: the winner is refit
        tags[TAG_REFIT_OF] = best.run_id
        best = refit(tracker, config, best, experiment_id, part.parent_run_id, part.sweep.spec.study)
        config = refit_config(config, best.best_epoch or 1)
    champion = register_champion(
        tracker,
        best,
        part.sweep.spec.study,
        experiment_id,
        champion_alias(part.sweep),
        part.sweep.spec.condition,
        part.sweep.base_config.objective.column,
        tags,
    )
    return score_on_test(tracker, champion, config)  # data.test_size: once, now that the search is over


def describe_study(tracker: Tracker, experiment_id: str, sweep: Sweep) -> None:
    """The experiment's description (what the study compares) and the view the printed UI link opens."""
    spec = sweep.spec
    searched = ", ".join(spec.space)
    compared = "; ".join(f"{key} in {values}" for key, values in spec.conditions.items())
    text = (
        f"sweeplab study {spec.study}: searches {searched} ({spec.sampler.type} sampler, {spec.n_trials} trials"
        + (f") separately for each condition: {compared}, an equal share of trials each" if compared else ")")
        + f". {_better_text(sweep.base_config.objective)} Sweep file: {sweep.source}."
    )
    tracker.describe_experiment(
        experiment_id,
        text,
        [sweep.field_of(k) for k in [*spec.space, *spec.conditions]],
        [sweep.field_of(k) for k in spec.conditions],
        sweep.base_config.objective,
    )


def _better_text(objective) -> str:
    if objective.metric == "val_loss":
        return "Lower best_val_loss (validation loss at the best epoch) is better."
    way = "Lower" if objective.minimize else "Higher"
    return f"{way} {objective.column} ({objective.metric} at the best epoch) is better."


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
        alias = f" ({part.champion.uri})" if part.champion else ""
        column = part.sweep.base_config.objective.column
        lines.append(f"{where}best is trial #{best.number}, {column} {best.value:.4g}{alias}.")
    return "\n\n".join(lines)


def champion_alias(part: Sweep) -> str:
    """`champion` for the base experiment's own condition (or a sweep without conditions); `champion-noise-1_0`
    for another (MLflow's aliases take letters, digits, _ and - only)."""
    if part.own_setting:
        return ALIAS
    words = [f"{key}-{value}" for key, value in part.spec.condition.items()]
    return re.sub(r"[^\w-]", "_", "-".join([ALIAS, *words]))


# --- local helper workers: what each does (helpers.py starts them) ----------------------------------------


def _helper_work(
    plan: Plan, tracking_uri: str, storage_url: str, index: int, parent_run_id: str, share: list[int] | None = None
) -> int:
    """A helper's whole work, in its forked process: every part, or (side by side) its share of them alone."""
    ran = 0
    parts = prepare(plan.sweep, tracking_uri, storage_url, worker_index=index, routes=plan.routes)
    for number, part in enumerate(parts):
        if share is None or number in share:
            part.parent_run_id, part.pool_writers = parent_run_id, share is None
            ran += work(part)
    return ran


# --- `sweeplab worker` --------------------------------------------------------------------------------------------


def run_worker(plan: Plan, tracking_uri: str, storage_url: str, parent_run_id: str | None, worker_index: int) -> int:
    """`sweeplab worker`: join the study and work until the budget is reached. Without a parent run id (a
    worker on another machine), it opens a parent run of its own for this invocation."""
    sweep = plan.sweep
    parts = prepare(sweep, tracking_uri, storage_url, worker_index, plan.routes)
    tracker = parts[0].tracker
    own_parent = parent_run_id is None
    if own_parent:
        parent_run_id = start_parent_run(tracker, parts[0].experiment_id, sweep, storage_url, 1, role="worker")
    ran = 0
    try:
        for part in parts:
            part.parent_run_id = parent_run_id
            ran += work(part)
    except BaseException as exc:
        if own_parent:
            interrupted = isinstance(exc, KeyboardInterrupt)
            try:
                tracker.end_run(
                    parent_run_id, Outcome.KILLED if interrupted else Outcome.FAILED, str(exc) or "interrupted"
                )
            except Exception:
                pass  # the original error is what the user needs to see
        raise
    if own_parent:
        tracker.end_run(parent_run_id, Outcome.COMPLETED)
    return ran


__all__ = ["run_sweep", "run_worker", "work", "prepare", "SweepError", "best_trials"]
