"""The bottom of the sweep runtime: store URIs, redaction, worker identity, retries. Imports no MLflow or Optuna,
so every layer above (tracking, ledger, sweep, cli) can use it.

Credentials: every URL shown goes through `redact`, and every message we did not write (MLflow's, SQLAlchemy's,
psycopg's) through `redact_text`. Passwords come from the environment (PGPASSWORD, ~/.pgpass,
MLFLOW_TRACKING_PASSWORD), never from us; when a user puts one in a URL anyway, it is replaced by *** wherever
the URL is shown.

Retries: `with_retries` retries connection-level failures with backoff (`RETRY_WAITS_S`, or
`$SWEEPLAB_RETRY_WAITS` as comma-separated seconds, which is how tests make an outage short), and between
attempts looks at the stop flag, so a stop during an outage acts at once. `retry_lost_races` tries again a write
that lost a check-then-insert race to another worker (tables created at once, a dataset inserted twice).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sweeplab.stop import stop_flag

SECRET_KEYS = {
    "password",
    "passwd",
    "pwd",
    "pass",
    "secret",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "sslpassword",
    "client_secret",
}
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_KEY_VALUE = re.compile(
    r"\b(" + "|".join(sorted(SECRET_KEYS, key=len, reverse=True)) + r")(\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,)]+)",
    re.IGNORECASE,
)


def redact(url: str) -> str:
    """A URL fit to print or log: the password in its user info and any secret query parameter become ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parseable as a URL (a bad port, say): redact what looks like a secret anyway
        return _KEY_VALUE.sub(r"\1\2***", re.sub(r"(//[^/:@\s]*):[^@/\s]*@", r"\1:***@", url))
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query and any(key.lower() in SECRET_KEYS for key, _ in parse_qsl(query, keep_blank_values=True)):
        query = urlencode(
            [
                (key, "***" if key.lower() in SECRET_KEYS else value)
                for key, value in parse_qsl(query, keep_blank_values=True)
            ],
            safe="*",
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # by hand: urlunsplit drops the empty host of sqlite:///path
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else urlunsplit(parts._replace(netloc=netloc))
    return rebuilt + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def has_secret(url: str) -> bool:
    return redact(url) != url


def redact_text(text: str) -> str:
    """Every URL in a message redacted, and `password=...`-style pairs outside URLs too (libpq's conninfo)."""
    return _KEY_VALUE.sub(r"\1\2***", _URL.sub(lambda match: redact(match.group(0)), text))


# --- store URIs -------------------------------------------------------------------------------------------------

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; a relative SQLite path is made
    absolute, so worker processes and MLflow's per-URI store cache all mean the same file."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        uri = sqlite_uri(sqlite_path(uri))
    return uri


def sqlite_uri(path: Path) -> str:
    """The `sqlite:///` URI of a database file, `%` and `?` in its path percent-encoded: a folder named `a#b?c=1`
    or `p%41` is otherwise read by SQLAlchemy as a query string or an escape (runs written to a file `/tmp/a#b`)."""
    return "sqlite:///" + str(path).replace("%", "%25").replace("?", "%3F")  # all SQLAlchemy misreads


def remove_mlflow_strays(uri: str) -> None:
    """MLflow 3.17 makes the parent folders of a SQLite URI's path without decoding it, so a store in `p%41/`
    leaves an empty folder `p%2541/` beside it: remove those (only while empty, only ones the real path lacks)."""
    database = sqlite_path(uri)
    if database is None:
        return
    raw, keep = Path(uri[len("sqlite:///") :]).parent, {database.parent, *database.parent.parents}
    while raw != raw.parent and raw not in keep:
        try:
            raw.rmdir()
        except OSError:  # not empty (somebody's folder), or not there
            return
        raw = raw.parent


def display_uri(uri: str) -> str:
    return redact(uri)


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (its path percent-decoded, as SQLAlchemy reads it), else None."""
    return Path(unquote(url[len("sqlite:///") :])).resolve() if url.startswith("sqlite:///") else None


def default_storage(tracking_uri: str) -> str:
    """A journal file beside the local MLflow database (or in the working directory): file-locked, so several
    local worker processes share it without SQLite's "database is locked"."""
    database = sqlite_path(tracking_uri)
    return str((database.parent if database else Path.cwd()) / "optuna.journal")


def resolve_storage_url(cli_value: str | None, tracking_uri: str) -> str:
    return cli_value or os.environ.get("SWEEPLAB_STORAGE") or default_storage(tracking_uri)


class SettingError(ValueError):
    """A store or an environment setting the user gave cannot be used as given: one line naming it, exit code 2."""


def env_number(name: str, default: float, kind: type = float, low: float = 0) -> float:
    """A number from the environment (`SWEEPLAB_GRACE_PERIOD=30`), or `default`; anything else is one line naming
    the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value < float("inf"):  # NaN fails the comparison too
        raise SettingError(f"${name}={text!r}: must be a {'whole ' if kind is int else ''}number of at least {low:g}")
    return value


def check_separate_stores(tracking_uri: str, storage_url: str) -> None:
    """Optuna's tables inside MLflow's SQLite database would mix two schemas in one file that both tools migrate
    on their own: refuse it."""
    if sqlite_path(storage_url) is not None and sqlite_path(storage_url) == sqlite_path(tracking_uri):
        raise SettingError(
            f"--storage {redact(storage_url)}: that is the MLflow tracking database; give Optuna a file "
            "of its own (or leave --storage out: optuna.journal beside the database)"
        )


def lock_path(database: str | os.PathLike) -> str:
    """The lock file beside a local store: hidden (`.mlflow.db.lock`), as a lock file must stay once made (removing
    it while another process waits on it would let a third take a second lock)."""
    path = os.fspath(database)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.lock")


@contextlib.contextmanager
def store_lock(uri: str, name: str):
    """Held across a check-then-write that two processes on one store must not interleave: a file lock beside a
    local SQLite store, a PostgreSQL advisory lock (ended with its connection) on a PostgreSQL one, nothing
    elsewhere (a tracking server offers no lock)."""
    database = sqlite_path(uri)
    if database is not None:
        with open(lock_path(database), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    if uri.startswith("postgresql"):
        import sqlalchemy  # PostgreSQL stores only; stores.py is imported before any heavy library

        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(
                    sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": zlib.crc32(f"sweeplab {name}".encode())}
                )
                yield
        finally:
            engine.dispose()
        return
    yield


# --- worker identity --------------------------------------------------------------------------------------------


def this_host() -> str:
    return socket.gethostname()


def worker_id() -> str:
    """`host:pid`: who holds a trial or owns a run, so a dead local process's trials and runs can be found."""
    return f"{this_host()}:{os.getpid()}"


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


# --- retries ----------------------------------------------------------------------------------------------------

T = TypeVar("T")


RETRY_WAITS_S = (0.5, 1, 2, 4, 8)  # ~15 s in all, then the outage is reported


def retry_waits() -> tuple[float, ...]:
    """The waits between attempts: $SWEEPLAB_RETRY_WAITS (comma-separated seconds) when set, else RETRY_WAITS_S.
    Read at each call, so a test (or an impatient user) can make an outage short; the CLI checks it up front."""
    text = os.environ.get("SWEEPLAB_RETRY_WAITS", "")
    try:
        waits = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        waits = (-1.0,)
    if any(not 0 <= wait < float("inf") for wait in waits):
        raise SettingError(f"$SWEEPLAB_RETRY_WAITS={text!r}: must be seconds separated by commas (0.5,1,2)")
    return waits or RETRY_WAITS_S


class OutageError(RuntimeError):
    """The storage or the tracking server stayed unreachable through every retry."""


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors a retry may cure. Optuna's StorageInternalError counts once Optuna is loaded (by the ledger)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import sqlalchemy.exc  # when installed; stores.py imports no heavy library itself

        errors += [sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError]
    with contextlib.suppress(ImportError):
        import requests  # (as above)

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    if "optuna" in sys.modules:  # only when already loaded: this module must not import Optuna
        errors.append(sys.modules["optuna"].exceptions.StorageInternalError)
    return tuple(errors)


def lost_insert_race(exc: BaseException) -> bool:
    """The error of a writer that lost a check-then-insert race to another worker (Optuna creating its tables,
    MLflow recording a dataset both workers use): PostgreSQL, MySQL and SQLite each in their words. Doing it
    again finds the other writer's row."""
    text = str(exc)
    return any(
        words in text
        for words in (
            "already exists",
            "duplicate key",
            "Duplicate entry",
            "UniqueViolation",
            "UNIQUE constraint failed",
        )
    )


def refused(exc: BaseException) -> bool:
    """A connection the database refused for good (a wrong password, user or database name): waiting will not
    make it right, unlike a restart (`AdminShutdown`, `the database system is starting up`) or an outage."""
    return any(words in str(exc) for words in ("authentication failed", "does not exist", "denied", "no password"))


def retry_lost_races(
    fn: Callable[..., T], *args: Any, attempts: int = 5, pause_s: tuple[float, float] = (0.1, 0.5), **kwargs: Any
) -> T:
    """Call fn, again (after a random pause in `pause_s`) while it loses a check-then-insert race to another
    worker (`lost_insert_race`): by the next try the other writer's row or table is there. After `attempts`
    tries, or on any other error, the error is raised as it is. The other kind of retry, through an outage, is
    `with_retries`."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt + 1 == attempts or not lost_insert_race(exc):
                raise
            time.sleep(random.uniform(*pause_s))
    raise AssertionError("unreachable")


def with_retries(
    fn: Callable[..., T],
    *args: Any,
    what: str = "the Optuna storage",
    waits: tuple[float, ...] | None = None,
    **kwargs: Any,
) -> T:
    """Call fn, retrying connection-level failures with backoff; after the last wait raise OutageError in one
    line. A stop requested during the outage ends the waiting at once (stop.check raises Stopped)."""
    waits = retry_waits() if waits is None else waits
    transient = transient_errors()
    for wait in (*waits, None):
        try:
            return fn(*args, **kwargs)
        except transient as exc:
            stop_flag.check()
            if wait is None:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise OutageError(f"{what} unreachable for {sum(waits):.0f} s: {first}") from None
            stop_flag.wait(wait)
    raise AssertionError("unreachable")
