"""The local helpers of `sweeplab sweep`: extra workers in processes forked from the sweep's own.

driver.run_sweep says what each helper does (driver._helper_work: the work of `sweeplab worker`, under the
sweep's parent run); this module owns the processes: forked early, sharing the stop flag, each ending on its own
when the sweep process is killed.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Callable

from sweeplab.stop import exit_with_parent, stop_flag
from sweeplab.stores import this_host


class Helpers:
    """The extra local workers of `sweeplab sweep workers=N`, in a process pool whose processes are forked at
    once, before this process opens any store or starts a thread (only the main thread exists after the imports):
    each starts with the imports already paid for (a spawned one, or a `sweeplab worker` subprocess, pays ~5 s of
    them again on this 2-core machine) and opens its own database connections. Each works like `sweeplab worker`
    under the sweep's parent run. They share this process's stop flag, so a stop reaching either stops both, and
    an error comes back with its traceback."""

    def __init__(self, n: int):
        self.n, self.futures = n, []
        self.pool = None
        if n > 0:
            context = multiprocessing.get_context("fork")
            stop_flag.share(context.Event())
            self.pool = ProcessPoolExecutor(n, mp_context=context)
            wait([self.pool.submit(os.getpid) for _ in range(n)])  # forks all n now (fork pools start them all)

    def start(self, work: Callable[..., int], args_of: Callable[[int], tuple]) -> None:
        """Helper i (1..n) runs work(*args_of(i)) (a module-level function; the args are pickled), and stops on its
        own if this process is killed outright (stop.exit_with_parent)."""
        if self.pool is not None:
            self.futures = [self.pool.submit(_helper_main, work, args_of(index)) for index in range(1, self.n + 1)]

    def wait(self, tick: Callable[[], None] | None = None, timeout: float | None = None) -> list[str]:
        """Wait for the helpers; returns their errors. With a timeout (after a stop), helpers still running then
        are killed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.futures and not all(future.done() for future in self.futures):
            wait(self.futures, timeout=0.2)
            if tick:
                tick()
            if deadline is None:
                stop_flag.check()
            elif time.monotonic() > deadline:
                for process in (getattr(self.pool, "_processes", None) or {}).values():
                    process.kill()  # the pool's own processes: not every child of this process (a user's own)
                break
        return [
            f"{type(exc).__name__}: {exc}"
            for exc in (future.exception() for future in self.futures if future.done())
            if exc is not None
        ]

    def workers(self) -> list[str]:
        """The helpers' worker ids (host:pid), as their trials name them."""
        processes = getattr(self.pool, "_processes", None) or {}
        return [f"{this_host()}:{pid}" for pid in processes]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


_helper_done = threading.Event()


def _helper_main(work: Callable[..., int], args: tuple) -> int:
    """In the helper's process: `work(*args)`. A helper whose sweep process was killed outright stops as if
    interrupted, its trials in flight failed (running the sweep again resumes them), and then ends: an idle pool
    process would wait for work forever."""
    _helper_done.clear()
    exit_with_parent(lambda: (stop_flag.request("the sweep process is gone"), _helper_done.wait(60)), code=1)
    try:
        return work(*args)
    finally:
        _helper_done.set()
