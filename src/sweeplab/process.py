"""Process-wide settings, made once by the CLI's entry point (`configure`), never as a side effect of an import:
environment defaults for MLflow's HTTP client, warning and logging filters, the stop flag's signal handlers, the
torch patch that skips dynamo, and how many threads torch uses. Library callers (a notebook importing sweeplab)
keep their own settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from sweeplab._eager import skip_dynamo_wrappers
from sweeplab.stop import stop_flag
from sweeplab.stores import retry_waits


def configure(with_optuna: bool = True, install_stop: bool = True, library: bool = False) -> None:
    """Everything a sweeplab command wants of its process, before it opens any store. `library`: called from
    Python (sweeplab.sweep, sweeplab.run, inside `borrowed()`), where torch's optimizers are left as they are."""
    # MLflow: no progress bars or "View run at" lines (the sweep prints its own progress and the UI link once;
    # against a server each line also costs a request to read the run back).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's HTTP client retries on its own; its default backoff waits minutes before giving up. Bound it to
    # ~15 s (1 + 2 + 4 + 8), as the Optuna storage retries are, so an outage or a wrong URL ends in one line; and a
    # server that stops answering ends a request after 10 s, not 120 s: at most ~65 s in all (5 tries), not the
    # 15 minutes MLflow's defaults allow. A log_batch of 1,000 metrics to a busy server takes well under a second.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    warnings.filterwarnings("ignore", module=r"mlflow\..*")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow's SQL store logs every database error with its traceback, then raises it (as an MlflowException) to
    # us, who say it in one line: on a full disk that was 13 tracebacks before the line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    urllib3 = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, SayWhatWeWaitFor) for f in urllib3.filters):  # once, however many commands run here
        urllib3.addFilter(SayWhatWeWaitFor())
    # Optuna: TPE's multivariate/group/constant_liar options are marked experimental; they are what conditional
    # spaces and parallel workers need, and the versions are pinned. Its heartbeat warning is meant for
    # Study.optimize; our ask-and-tell workers record heartbeats themselves (ledger.Heartbeats) and fail stale
    # trials before each ask, which is what optimize() does. Its INFO line per trial would drown the progress bar.
    if with_optuna:  # a tracked `sweeplab run` must not pay for importing Optuna
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

    retry_waits()  # a bad $SWEEPLAB_RETRY_WAITS is one line now, before any store is touched

    if not library:
        skip_dynamo_wrappers()

    stop_flag.clear()  # a command run in a process that ran one before (a test, a notebook) starts afresh
    if install_stop:
        stop_flag.install()


@contextlib.contextmanager
def borrowed():
    """What a sweep or run from Python changes in the caller's interpreter, given back afterwards however it ends
    (an error, Ctrl-C): the SIGINT and SIGTERM handlers, sys.stdout and sys.stderr, the warning filters, the levels
    of every logger (configure()'s, and the sqlalchemy and alembic ones MLflow's store sets), the environment
    variables it sets by default, torch's thread counts and its random state, and the stop flag. A notebook is then as it was, and a later Ctrl-C interrupts its own loops again."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    streams = sys.stdout, sys.stderr
    filters = list(warnings.filters)
    loggers = {name: logging.getLogger(name).level for name in ("mlflow", "mlflow.store.db.utils", "optuna")}
    # every logger the caller has, as it is (alembic's migrations set levels, and may disable existing loggers)
    existing = {
        name: (logger.level, logger.disabled)
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    environ = dict(os.environ)
    import torch  # a sweep or run needs it anyway; its thread count is read before anything sets it

    threads = torch.get_num_threads()
    rng = torch.get_rng_state()  # a sweep seeds its trials: the caller's own draws go on as if it had not run
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    # torch wraps an optimizer class's `step` (its profiler hook) the first time one is built: the caller's classes
    # are given back as they were, whatever the sweep built
    steps = {cls: cls.__dict__["step"] for cls in _optimizer_classes(torch) if "step" in cls.__dict__}
    try:
        yield
    finally:
        stop_flag.clear()
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        sys.stdout, sys.stderr = streams
        warnings.filters[:] = filters
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if not isinstance(logger, logging.Logger):
                continue
            if name in existing:
                logger.setLevel(existing[name][0])
                logger.disabled = existing[name][1]
            elif name.split(".")[0] in ("sqlalchemy", "alembic"):  # set by MLflow's store on first use
                logger.setLevel(logging.NOTSET)
                logger.disabled = False
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for key in [k for k in os.environ if k not in environ]:
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})
        torch.set_num_threads(threads)
        for cls, step in steps.items():
            cls.step = step


def _optimizer_classes(torch) -> list[type]:
    found, stack = [], [torch.optim.Optimizer]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack += cls.__subclasses__()
    return found


def use_threads(threads: int | None) -> None:
    """Torch's intra-op threads for this process (and the helpers it forks): one per worker when several workers or
    the vectorized engine's MLflow writers share the cores; None leaves torch's default."""
    if threads:
        import torch  # on use: configure() runs before the config is checked, and must not pay for torch

        torch.set_num_threads(threads)


def http_patience_s() -> float:
    """How long MLflow's HTTP client keeps trying one request: every try's timeout plus urllib3's backoff."""
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 120))
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 7))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", 2))
    return timeout * (retries + 1) + factor * (2**retries - 1)


class SayWhatWeWaitFor(logging.Filter):
    """urllib3 logs each HTTP retry as `Retrying (Retry(total=3, ...)) after connection broken by ...: /api/2.0/
    mlflow/runs/log-batch`. Say instead, once per outage of a server that stopped answering, what is being waited
    for and for how long at most; the retries of a refused connection stay quiet (one error line follows)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_said = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Retrying" not in message:
            return True
        # a refused connection fails within seconds and its error says why; a server that accepts and then says
        # nothing is the wait worth explaining
        if "Timeout" in message and time.monotonic() - self.last_said > 120:
            print(
                f"sweeplab: the MLflow tracking server is not answering; retrying for up to ~{http_patience_s():.0f} s "
                "(MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES)",
                file=sys.stderr,
                flush=True,
            )
        self.last_said = time.monotonic()
        return False


# CPU kernels pinned to one instruction set, so that a sweep's numbers depend on its settings, not on which x86
# machine ran it: torch's own kernels (ATen), oneDNN's convolutions and MKL's matrix products each pick the widest
# instructions the CPU has (AVX-512 on some machines of a kind, AVX2 on others), and each sums in its own order, so
# the same trial differs in its last bits, which TPE and a best epoch amplify into another answer. AVX2 is what every
# x86 machine sweeplab runs on has; a user's own setting of any of these wins. Set before torch is imported.
SAME_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def same_kernels_everywhere() -> None:
    if "torch" in sys.modules or platform.machine().lower() not in ("x86_64", "amd64"):
        return  # too late to choose; other CPUs have one kernel set
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if " avx2" in flags:
        for name, value in SAME_KERNELS.items():
            os.environ.setdefault(name, value)


def cpu_kernels() -> str:
    """The instruction set torch's own CPU kernels use in this process (AVX2 under the sweeplab command, which pins
    it; often AVX512 in a notebook on the same machine): a run records it, and a rerun in another says so."""
    import torch

    return torch.backends.cpu.get_cpu_capability()
