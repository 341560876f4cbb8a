"""The MLflow UI's server (`mlflow server`) as a child process of `sweeplab ui`: started in a process group of its own with a
watchdog that ends it if sweeplab is killed outright, ended whole (its uvicorn workers too), and the stray folder
MLflow's server makes for a store in a folder whose name has a `%` removed after it. Beside the sweep's other
child processes (sweep/helpers.py, the local workers; sweep/background.py, the report); imports no MLflow."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from sweeplab.stores import sqlite_path


def start_ui_server(uri: str, host: str, port: int, workers: int = 1, log=None) -> subprocess.Popen:
    """`mlflow server` as the UI over a store. The store goes through the environment, not the command line, where
    `ps` would show its password; a local SQLite store's artifacts are where sweeplab put them (mlartifacts/)."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--uvicorn-opts",
        "--log-level warning",
    ]
    database = sqlite_path(uri)
    if database:
        command += ["--default-artifact-root", os.path.dirname(os.path.abspath(database)) + "/mlartifacts"]
    # No GenAI job runner unless asked for: its huey consumers (7 processes here) and the store MLflow makes for them
    # in /dev/shm serve evaluations and issue detection, which a sweep's UI does not run.
    env = {
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "PYTHONWARNINGS": "ignore",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": uri,
    }
    # The server and everything it starts (uvicorn workers, huey consumers) in a process group of their own, which
    # `stop_ui_server` ends whole; a watchdog outside both ends it too if this process is killed outright.
    stray = _stray_folder(uri)
    server = subprocess.Popen(command, env=env, stdout=log.fileno() if log else None, start_new_session=True)
    server.stray_folder = stray  # type: ignore[attr-defined]
    watchdog = (
        f"while kill -0 {os.getpid()} 2>/dev/null && kill -0 {server.pid} 2>/dev/null; do sleep 1; done; "
        f"kill -TERM -{server.pid} 2>/dev/null; sleep 5; kill -KILL -{server.pid} 2>/dev/null"
        + (f"; rmdir {shlex.quote(stray)} 2>/dev/null" if stray else "")
    )
    subprocess.Popen(
        ["sh", "-c", watchdog],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server


def _stray_folder(uri: str) -> str | None:
    """The folder MLflow's server makes from a SQLite URI's path before unquoting it (`p%2541 x` beside the store's
    folder `p%41 x`), when it does not exist yet: removed again, if still empty, once the server has ended."""
    database = sqlite_path(uri)
    if not database:
        return None
    raw = os.path.dirname(urllib.parse.urlparse(uri).path)
    real = os.path.dirname(os.path.abspath(database))
    if "%" not in raw or os.path.abspath(raw) == real or os.path.exists(raw):
        return None
    return os.path.abspath(raw)


def stop_ui_server(server: subprocess.Popen, grace_s: float = 10) -> None:
    """End the UI server's whole process group: SIGTERM, then SIGKILL for what is left after `grace_s`."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(server.pid):
            server.poll()
            time.sleep(0.1)
        if not _group_alive(server.pid):
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=1)
    stray = getattr(server, "stray_folder", None)
    if stray:
        with contextlib.suppress(OSError):
            os.rmdir(stray)  # only if empty: never anything the user put there


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a group whose only members are zombies (the server, not yet reaped by us) is gone for our purposes
    members = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid_of(p) == pgid]
    return any(_state_of(p) != "Z" for p in members)


def _pgid_of(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _state_of(proc: Path) -> str:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def answers(url: str) -> bool:
    """Whether an HTTP server answers 200 at url (within 2 s)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
