"""stores.py: store URIs, secrets kept out of what is printed, settings from the environment, and retries."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeplab import stores
from sweeplab.stores import (
    OutageError,
    SettingError,
    check_separate_stores,
    default_storage,
    env_number,
    process_gone,
    redact,
    redact_text,
    resolve_tracking_uri,
    retry_waits,
    sqlite_path,
    sqlite_uri,
    with_retries,
    worker_id,
)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://sweeper:s3cret@db.example:5432/optuna", "postgresql://sweeper:***@db.example:5432/optuna"),
        (
            "postgresql://db/optuna?user=u&password=pw&sslmode=require",
            "postgresql://db/optuna?user=u&password=***&sslmode=require",
        ),
        ("https://mlflow.example/api?token=abc", "https://mlflow.example/api?token=***"),
        ("sqlite:////tmp/runs.db", "sqlite:////tmp/runs.db"),  # nothing secret: unchanged, byte for byte
        ("postgresql://u:pw@host:notaport/db", "postgresql://u:***@host:notaport/db"),  # unparseable, still redacted
    ],
)
def test_a_url_is_printed_without_its_password(url, shown):
    assert redact(url) == shown


def test_a_message_loses_every_secret_it_quotes():
    message = (
        'connection to "postgresql://a:hunter2@h/db" failed: '
        "host=h password=hunter2 dbname=db, and again password='hunter2'"
    )
    shown = redact_text(message)
    assert "hunter2" not in shown and shown.count("***") == 3 and "host=h" in shown and "dbname=db" in shown


def test_a_relative_sqlite_store_means_one_file_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///runs/my.db") == f"sqlite:///{tmp_path}/runs/my.db"
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/from-env.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # the flag wins, as given


def test_odd_folder_names_survive_the_round_trip_through_a_sqlite_uri(tmp_path):
    database = tmp_path / "a#b?c=1" / "p%41" / "runs.db"
    uri = sqlite_uri(database)
    assert "%3F" in uri and "%2541" in uri  # SQLAlchemy would read ? as a query and %41 as "A"
    assert sqlite_path(uri) == database


def test_the_journal_defaults_to_beside_the_database_and_may_not_be_the_database(tmp_path):
    assert default_storage(f"sqlite:///{tmp_path}/x/runs.db") == str(tmp_path / "x" / "optuna.journal")
    with pytest.raises(SettingError, match="that is the MLflow tracking database"):
        check_separate_stores(f"sqlite:///{tmp_path}/runs.db", f"sqlite:///{tmp_path}/runs.db")
    check_separate_stores(f"sqlite:///{tmp_path}/runs.db", f"sqlite:///{tmp_path}/optuna.db")


@pytest.mark.parametrize("text, expected", [("", 60.0), ("30", 30.0), (" 2.5 ", 2.5), ("0", 0.0)])
def test_a_number_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv("SWEEPLAB_TEST_NUMBER", text)
    assert env_number("SWEEPLAB_TEST_NUMBER", 60.0) == expected


@pytest.mark.parametrize("text", ["soon", "-1", "nan", "inf", "1.5e999"])
def test_a_bad_number_from_the_environment_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("SWEEPLAB_TEST_NUMBER", text)
    with pytest.raises(SettingError, match=r"^\$SWEEPLAB_TEST_NUMBER="):
        env_number("SWEEPLAB_TEST_NUMBER", 60.0)
    monkeypatch.setenv("SWEEPLAB_TEST_NUMBER", "2.5")
    with pytest.raises(SettingError, match="whole number"):
        env_number("SWEEPLAB_TEST_NUMBER", 3, kind=int)


def test_retry_waits_come_from_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv("SWEEPLAB_RETRY_WAITS", raising=False)
    assert retry_waits() == (0.5, 1, 2, 4, 8)
    monkeypatch.setenv("SWEEPLAB_RETRY_WAITS", "0,0.01")
    assert retry_waits() == (0.0, 0.01)
    monkeypatch.setenv("SWEEPLAB_RETRY_WAITS", "1,soon")
    with pytest.raises(SettingError, match="SWEEPLAB_RETRY_WAITS"):
        retry_waits()


def test_a_transient_failure_is_retried_and_a_lasting_one_reported_in_one_line():
    calls = []

    def flaky(value):
        calls.append(value)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return value * 2

    assert with_retries(flaky, 21, waits=(0, 0, 0)) == 42 and calls == [21, 21, 21]

    def down():
        calls.append("down")
        raise TimeoutError("timed out\nsecond line")

    calls.clear()
    with pytest.raises(OutageError) as caught:
        with_retries(down, what="the tracking server", waits=(0, 0))
    assert str(caught.value) == "the tracking server unreachable for 0 s: timed out" and len(calls) == 3


def test_an_error_a_retry_cannot_cure_is_not_retried():
    calls = []

    def wrong():
        calls.append(1)
        raise ValueError("no such column")

    with pytest.raises(ValueError, match="no such column"):
        with_retries(wrong, waits=(0, 0, 0))
    assert calls == [1]


def test_a_worker_is_gone_only_when_its_process_on_this_machine_is():
    assert worker_id() == f"{stores.this_host()}:{os.getpid()}"
    assert not process_gone(worker_id())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_gone(f"{stores.this_host()}:{child.pid}")
    assert not process_gone(f"another-host:{child.pid}")  # another machine's worker: its heartbeats decide
    assert not process_gone("garbage")


def test_stores_imports_no_heavy_library():
    code = "import sys, sweeplab.stores; print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    assert out.stdout.strip() == "[]"


def test_a_lost_insert_race_is_tried_again_and_anything_else_raised_as_it_is():
    from sweeplab.stores import retry_lost_races

    calls = []

    def insert():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError('duplicate key value violates unique constraint "pg_type_typname_nsp_index"')
        return "row"

    assert retry_lost_races(insert, pause_s=(0, 0)) == "row" and len(calls) == 3
    calls.clear()
    with pytest.raises(RuntimeError, match="UNIQUE constraint failed"):
        retry_lost_races(
            lambda: calls.append(1) or (_ for _ in ()).throw(RuntimeError("UNIQUE constraint failed")),
            attempts=2,
            pause_s=(0, 0),
        )
    assert len(calls) == 2  # every attempt lost: the last error, as it is
    calls.clear()
    with pytest.raises(ConnectionError):  # not a race: an outage is with_retries' to handle
        retry_lost_races(lambda: calls.append(1) or (_ for _ in ()).throw(ConnectionError("refused")), pause_s=(0, 0))
    assert len(calls) == 1
