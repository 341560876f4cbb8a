"""Stop requests: Ctrl-C or SIGTERM sets a flag; the loop and the ledger look at it at epoch and write boundaries.

Python runs a signal handler in the main thread between any two bytecodes, so an exception raised from one can
land inside a half-done write (a journal file's lock taken and not yet released, a run created and not yet linked
to its trial). Here the handler only records the request. `check()` raises `Stopped` at the places that are safe
to leave: after an epoch, between writes, while waiting. A second signal restores the default handlers, so a
third one ends the process the usual way if something hangs.

The flag moves into a multiprocessing Event (`share`) before local helper workers are forked, so they and the sweep
process stop together, whichever of them the signal reached.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from typing import Callable


class Stopped(KeyboardInterrupt):
    """Raised at a check point after a stop was requested: the work in flight is recorded as interrupted (run
    KILLED, trial FAIL) and the process exits with 130. A KeyboardInterrupt, so code that records an interrupt
    treats Ctrl-C and a stop request alike."""


class StopFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self._signals = 0
        self._interruptible = 0  # > 0 while the main thread runs user code that writes to no store

    def install(self) -> None:
        """Let Ctrl-C and SIGTERM (a scheduler's stop, `kill`) set this flag: once, from the CLI's entry point."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a CLI call from a test's thread, say)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        self.request(signal.Signals(signum).name)
        if self._signals >= 2:  # asked twice: the next one acts as it would without us
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._interruptible:  # inside a user's constructor or loader: nothing half-written to leave
            raise Stopped(self.reason or "stopped")

    @contextlib.contextmanager
    def interruptible(self):
        """While the main thread runs a user's code that writes to no store (a model's constructor, a data loader,
        a module's import), a stop raises `Stopped` at once rather than at the next check: a constructor that
        takes a minute must not hold Ctrl-C for that minute (and build another model after it)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.check()
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    def share(self, event) -> None:
        """Keep the flag in `event` (a multiprocessing Event) from now on, so processes forked after this share it."""
        if self._event.is_set():
            event.set()
        self._event = event

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise Stopped if a stop was requested (here or in a process sharing the flag)."""
        if self._event.is_set():
            raise Stopped(self.reason or "stopped")

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, ending early (with Stopped) when a stop is requested."""
        if self._event.wait(seconds):
            self.check()

    def clear(self) -> None:
        self._event.clear()
        self.reason, self._signals = None, 0


stop_flag = StopFlag()  # the process's one flag: the CLI installs it; library callers may `request` a stop


def exit_with_parent(before_exit: Callable[[], object] | None = None, code: int = 0) -> None:
    """In a process the sweep forked (a local helper, a writer, the background report): start the one watch that
    ends it once the sweep process is gone, killed outright (SIGKILL, no chance to stop it). The watch calls
    `before_exit()` first, which may wait for the work in hand to reach a safe point (a helper fails its trials in
    flight; a writer finishes the run it is writing), then ends the process with os._exit(code): nothing the sweep
    set up (MLflow, Optuna, atexit handlers) is torn down twice. A process with no parent process returns at once."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        while parent.is_alive():
            parent.join(1.0)
        if before_exit is not None:
            before_exit()
        os._exit(code)

    threading.Thread(target=watch, name="sweeplab-orphan-watch", daemon=True).start()
