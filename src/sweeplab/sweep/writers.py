"""Where trained trials are written: here, as they finish (`InlineWriter`), or in writer processes (`WriterPool`).

Either way a job goes through the same `recorder.Recorder`: its MLflow run, then its trial in the ledger. The
pool exists because measurement says so: MLflow's store spends ~30 ms of Python per run, and the vectorized
engine trains a trial in well under that, so writing in the training process would halve its speed, and a thread
would fight the training for the GIL. Writer processes are spawned (not forked: this one holds open database
connections), open their own stores, and hand back each trial's outcome, or its error with the traceback,
through `concurrent.futures`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Optional

import optuna

from sweeplab.process import configure
from sweeplab.stop import exit_with_parent, stop_flag
from sweeplab.sweep.ledger import Ledger
from sweeplab.sweep.search import open_storage
from sweeplab.track.recorder import Recorder
from sweeplab.track.tracker import Tracker
from sweeplab.train import plugins
from sweeplab.train.engines import Job

# Told when a trial's write is done: (trial number, outcome), for progress.
OnWritten = Optional[Callable[[int, str], None]]


class InlineWriter:
    """Writes each job in this process as soon as it is handed over: the reference engine's live runs, and the
    vectorized engine's for small sweeps (below ~100 trials a writer process's ~3 s start costs more than it saves)."""

    def __init__(self, recorder):
        self.recorder = recorder

    def submit(self, job: Job, on_written: OnWritten = None) -> None:
        if job.run is not None:
            outcome = self.recorder.finish(job.run, job.lease, job.result)
        else:
            outcome = self.recorder.record(job.lease, job.result, job.started)
        if on_written:
            on_written(job.lease.number, str(outcome))

    def busy(self) -> bool:
        return False

    def collect(self, on_written: OnWritten = None, block: bool = False) -> None:
        return None

    def drain(self, on_written: OnWritten = None) -> None:
        return None

    def abandon(self) -> list[Job]:
        return []

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class WriterSetup:
    """What a writer process needs to open its own stores and recorder: plain, picklable data."""

    tracking_uri: str
    storage_url: str
    optuna_study: str
    n_trials: int
    experiment_id: str
    parent_run_id: str | None
    study: str
    keys: tuple[str, ...]
    condition: dict
    engine: str
    main_sources: tuple[tuple[str, str], ...] = ()  # plugins.main_sources() of the sweep process

    def recorder(self, tracker: Tracker, ledger) -> Recorder:
        """The part's recorder, on stores opened by whoever calls: the sweep process's own (sweep.prepare), or a
        writer process's (`_open_writer`; spawned, it cannot share the sweep's connections)."""
        return Recorder(
            tracker,
            self.experiment_id,
            self.parent_run_id,
            ledger,
            self.study,
            list(self.keys),
            self.condition,
            self.engine,
        )


@contextlib.contextmanager
def main_not_rerun():
    """While writer processes start: multiprocessing's spawn runs the main module again in each child, by its
    path, and a user's script that calls sweeplab.sweep without `if __name__ == "__main__":` (as notebook code is
    written) would start its sweep again in every writer. A writer needs nothing of it (jobs name the user's code
    by import path; a notebook class's source comes in WriterSetup), so the main module is hidden from spawn."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    file, spec = main.__dict__.pop("__file__", None), getattr(main, "__spec__", None)
    main.__spec__ = None  # spawn reads __spec__ (python -m module) and then __file__ (a script)
    try:
        yield
    finally:
        main.__spec__ = spec
        if file is not None:
            main.__file__ = file


class WriterPool:
    """Writes jobs in `processes` spawned writer processes. The ledger of this process keeps each trial's
    heartbeat until its write is collected."""

    def __init__(self, setup: WriterSetup, ledger, processes: int):
        self.ledger = ledger
        self.pool = ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"), initializer=_open_writer, initargs=(setup,)
        )
        self.in_flight: dict[Future, Job] = {}
        with main_not_rerun():
            for _ in range(processes):  # start the processes now: their imports (~3 s) overlap the first batch
                self.pool.submit(os.getpid)

    def submit(self, job: Job, on_written: OnWritten = None) -> None:
        with main_not_rerun():  # (the processes are started; should the pool start another, the same holds)
            future = self.pool.submit(_write, job.lease, job.result, job.started)
        self.in_flight[future] = job

    def busy(self) -> bool:
        return bool(self.in_flight)

    def collect(self, on_written: OnWritten = None, block: bool = False) -> None:
        """Take in the writes that are done (with block, at least one); a writer's error is raised here."""
        if not self.in_flight:
            return

        while True:
            done, _ = wait(list(self.in_flight), timeout=1.0 if block else 0, return_when=FIRST_COMPLETED)
            if done or not block:
                break
            stop_flag.check()
        for future in done:
            job = self.in_flight.pop(future)
            self.ledger.release(job.lease)  # told (or failed) by the writer
            outcome = future.result()  # a writer's exception, with its traceback as the cause
            if on_written:
                on_written(job.lease.number, outcome)

    def drain(self, on_written: OnWritten = None) -> None:
        """Wait until every job handed over is written and told."""
        while self.in_flight:
            self.collect(on_written, block=True)

    def abandon(self) -> list[Job]:
        """Stop writing: the jobs not yet written are handed back (their trials are then failed). A write already
        under way finishes."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        left = []
        for future, job in self.in_flight.items():
            if future.cancelled() or future.exception() is not None:
                left.append(job)
            else:
                self.ledger.release(job.lease)
        self.in_flight.clear()
        return left

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_recorder = None  # the writer process's own recorder, opened once by _open_writer
_writing = threading.Lock()  # held while a trial is written: a lost sweep process never cuts one in half


def _open_writer(setup: WriterSetup) -> None:
    """A writer process's start: its own stores, ledger and recorder. It ignores Ctrl-C (the sweep process decides
    what is written and what is failed) and exits if the sweep process is killed, whose trials then stop
    heartbeating and go to the surviving workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    configure(install_stop=False)
    # once the sweep process is gone, exit, but never between a trial's run and its tell: a run left FINISHED for
    # a trial that then fails (its heartbeat gone) would be counted as a second result when it is retried
    exit_with_parent(_writing.acquire)
    global _recorder
    plugins.MAIN_SOURCES.update(setup.main_sources)  # a notebook class's source, logged with each run
    storage = open_storage(setup.storage_url)
    study = optuna.load_study(study_name=setup.optuna_study, storage=storage)
    # no RunStore: a writer only tells the trials it is handed, and recovers none
    _recorder = setup.recorder(Tracker(setup.tracking_uri), Ledger(study, storage, setup.n_trials, {}))


def _write(lease, result, started: float) -> str:
    with _writing:
        return str(_recorder.record(lease, result, started))
