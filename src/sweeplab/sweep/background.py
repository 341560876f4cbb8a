"""One piece of work done beside the sweep, in a process forked before the sweep opens any store.

`sweeplab sweep` ends with its report and its champions' export, ~2 s each of one core while the other core idles;
and a report's first build in a process spends another ~2 s on first use (fANOVA's scikit-learn, matplotlib's
fonts, MLflow's SQL store). A `Forked` process pays those first-use costs while the trials train, then does the
one call it is sent (the report, once the trials are done) while this process registers the champions.

It is forked before any store is opened (it opens its own) and before any thread starts, as the local helpers are
(helpers.Helpers). It ignores Ctrl-C: the sweep decides, and closes it. It ends with `os._exit`, so nothing this
process set up (MLflow, Optuna, atexit handlers) is torn down twice; and when this process dies, the pipe closes
and it ends too.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable

from sweeplab.stop import exit_with_parent, stop_flag


class BackgroundError(RuntimeError):
    """The call failed there: its message is the original error's type and message."""


class Forked:
    """A forked process that runs `warm()` at once, then one call sent with `submit`; `result` waits for it."""

    def __init__(self, warm: Callable[[], None]):
        context = multiprocessing.get_context("fork")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(theirs, self._conn, warm), daemon=True, name="sweeplab-background"
        )
        self._process.start()
        theirs.close()

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Run function(*args) there (a module-level function; args are pickled). A process that is gone already
        (killed, as the OOM killer would) takes nothing: `result` says so, and the sweep goes on without it."""
        try:
            self._conn.send((function, args))
        except OSError:  # BrokenPipeError: nobody at the other end
            pass

    def result(self) -> Any:
        """The call's return value; its exception comes back as a BackgroundError with its type and message."""
        while not self._conn.poll(0.2):
            stop_flag.check()
            if not self._process.is_alive() and not self._conn.poll():
                self.close()
                raise BackgroundError(f"the background process ended (exit code {self._process.exitcode})")
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError):  # it died between its answer's first byte and its last
            self.close()
            raise BackgroundError(f"the background process ended (exit code {self._process.exitcode})") from None
        self.close()
        if not ok:
            raise BackgroundError(value)
        return value

    def close(self) -> None:
        """End it, done or not (the sweep failed, or was stopped)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(5)
        if not self._conn.closed:
            self._conn.close()


def _serve(conn, ours, warm: Callable[[], None]) -> None:
    ours.close()  # the sweep's end, copied by the fork: with it closed here, the sweep's death is an EOF here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep handles Ctrl-C, then closes this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent()  # while it warms up or builds the report: the pipe's EOF tells only a process waiting on it
    try:
        try:
            warm()
        except Exception:
            pass  # warming up only saves time; the call itself says what is wrong
        function, args = conn.recv()
        try:
            conn.send((True, function(*args)))
        except Exception as exc:
            conn.send((False, f"{type(exc).__name__}: {exc}"))
    except BaseException:
        pass  # the sweep ended without sending work (EOFError), or closed the pipe
    finally:
        os._exit(0)
