"""Scale-out and fault tolerance against real servers: a throwaway PostgreSQL cluster (Optuna's RDB storage and
the MLflow backend store) and a real `mlflow server` on 127.0.0.1; worker processes killed and interrupted."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from servers import PASSWORD, postgres_bin, start_mlflow_server, start_postgres

ROOT = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

pytestmark = [
    pytest.mark.slow,  # a PostgreSQL cluster, a tracking server and worker processes
    pytest.mark.skipif(
        postgres_bin() is None and not os.environ.get("CI"),
        reason="PostgreSQL is not installed here (.ci/run installs it)",
    ),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    postgres = start_postgres()
    postgres.create_database("mlflow")
    postgres.create_database("optuna")
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = start_mlflow_server(postgres.url("mlflow"), folder, env)
    yield postgres, server
    server.stop()
    postgres.destroy()


def sweep_file(folder: Path, study: str, n_trials: int) -> Path:
    path = folder / f"{study}.yaml"
    path.write_text(
        f"study: {study}\nexperiment: {ROOT / 'experiments/training_loop_lab.yaml'}\nspace:\n"
        "  optimizer: {choices: [Adam, SGD]}\n  lr: {low: 0.005, high: 0.05, log: true}\n"
        "  hidden: {choices: [8, 16, 32]}\n"
        f"sampler: {{type: random, seed: 0}}\nn_trials: {n_trials}\nengine: reference\n"
    )
    return path


def worker_env(postgres, server, **extra) -> dict[str, str]:
    env = {
        **os.environ,
        "PGPASSWORD": PASSWORD,
        "MLFLOW_TRACKING_URI": server.url,
        "SWEEPLAB_STORAGE": postgres.url("optuna"),
        "SWEEPLAB_HEARTBEAT_INTERVAL": "1",
        "SWEEPLAB_GRACE_PERIOD": "3",
        "SWEEPLAB_ORPHAN_AFTER": "10",
        **extra,
    }
    return env


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def finish(worker: subprocess.Popen, timeout: float, storage: str, study: str, server) -> tuple[str, str]:
    """communicate(); a worker still running after `timeout` is killed and the failure says where things
    stood: the study's trials, the worker's output, the tracking server's log."""
    try:
        return worker.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        try:
            out, err = worker.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a child of the worker still holds the pipes
            out, err = "(unreadable)", "(unreadable)"
        found = load(study, storage)
        trials = [
            (t.number, t.state.name, t.user_attrs.get("worker"), t.user_attrs.get("fail_reason"))
            for t in (found.trials if found else [])
        ]
        raise AssertionError(
            f"worker still running after {timeout} s\ntrials: {trials}\nstdout: {out[-3000:]}\n"
            f"stderr: {err[-3000:]}\nserver log: {server.log.read_text()[-3000:]}"
        ) from None


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def load(study: str, storage):
    """The study, or None while it is not there yet: not created, or its tables still being created by a worker
    (Optuna then fails the schema check with a StorageInternalError)."""
    try:
        return optuna.load_study(study_name=study, storage=storage)
    except (KeyError, optuna.exceptions.StorageInternalError):
        return None


def running_trial_of(storage, study: str, pid: int):
    found = load(study, storage)
    if found is None:
        return None
    me = f"{socket.gethostname()}:{pid}"
    return next(
        (
            t
            for t in found.get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") == me and "mlflow_run_id" in t.user_attrs
        ),
        None,
    )


def check_records(study: optuna.Study, client: MlflowClient, n_trials: int, epochs: int) -> None:
    """Exactly n finished trials, each with exactly one FINISHED child run holding its full curves and
    checkpoint; no run left RUNNING; no trial number twice."""
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == n_trials
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    trial_runs = [r for r in runs if r.data.tags.get("sweeplab.role") == "trial"]
    done_numbers = [r.data.tags["sweeplab.trial_number"] for r in trial_runs if r.info.status == "FINISHED"]
    assert len(done_numbers) == len(set(done_numbers)) == n_trials
    assert sorted(done_numbers) == sorted(str(t.number) for t in finished)
    for trial in finished:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert len(client.get_metric_history(run_id, "val_loss")) == epochs
        assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoint")}


def test_three_workers_share_a_study_and_survive_a_sigkill(cluster, tmp_path):
    postgres, server = cluster
    storage = postgres.url("optuna", password=True)
    sweep = sweep_file(tmp_path, "kill3", 12)
    epochs = 120
    env = worker_env(postgres, server)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sweeplab",
                "worker",
                str(sweep),
                f"epochs={epochs}",
                "--worker-index",
                str(i),
                "--quiet",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    victim = workers[0]
    lost = wait_for(lambda: running_trial_of(storage, "kill3", victim.pid), 120, "the victim to start a trial")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for worker in workers[1:]:
        _, err = finish(worker, 300, storage, "kill3", server)
        assert worker.returncode == 0, err
    study = load("kill3", storage)
    client = MlflowClient(server.url)
    check_records(study, client, 12, epochs)
    retries = [
        t
        for t in study.trials
        if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == lost.number
    ]
    lost_run = client.get_run(lost.user_attrs["mlflow_run_id"])
    if lost_run.info.status == "FINISHED":
        # killed after its run was finished, before the tell (a busy machine can land the signal there): the
        # trial is told what its run recorded, not failed and trained twice (ledger._tell_stale_from_runs)
        assert study.trials[lost.number].state == TrialState.COMPLETE and not retries
        assert study.trials[lost.number].value == pytest.approx(lost_run.data.metrics["best_val_loss"], rel=1e-9)
        return
    # the killed trial failed after the grace period, was retried by a survivor, and its run ended KILLED
    assert study.trials[lost.number].state == TrialState.FAIL
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert lost_run.info.status == "KILLED" and lost_run.data.tags["sweeplab.outcome"] == "killed"


def test_a_killed_vectorized_worker_loses_no_trial(cluster, tmp_path):
    """The vectorized engine holds a whole batch of trials at once: every one of them must be heartbeating, or a
    SIGKILL leaves them RUNNING for ever (Optuna skips trials that never beat) and the budget is never reached."""
    postgres, server = cluster
    storage = postgres.url("optuna", password=True)
    sweep = sweep_file(tmp_path, "vkill", 16)
    env = worker_env(postgres, server, SWEEPLAB_WRITERS_FROM_TRIALS="0")  # writer processes, whatever the size
    args = [
        sys.executable,
        "-m",
        "sweeplab",
        "worker",
        str(sweep),
        "engine=vectorized",
        "batch_trials=8",
        "epochs=300",
        "--quiet",
    ]
    victim = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    polled = []  # the first study's storage for every later poll: a URL would open a connection pool each time

    def batch_in_flight():
        found = load("vkill", polled[0] if polled else storage)
        if found is None:
            return None
        polled[:1] = [found._storage]
        mine = [
            t
            for t in found.get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") == f"{socket.gethostname()}:{victim.pid}"
        ]
        return mine if len(found.get_trials(states=FINISHED)) >= 8 and len(mine) >= 4 else None

    lost = wait_for(batch_in_flight, 180, "a second batch in flight")
    writers = [int(pid) for pid in Path(f"/proc/{victim.pid}/task/{victim.pid}/children").read_text().split()]
    assert len(writers) >= 2  # its MLflow writer processes
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait_for(lambda: not [pid for pid in writers if alive(pid)], 15, "the killed worker's writer processes to exit")
    survivor = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = finish(survivor, 300, storage, "vkill", server)
    assert survivor.returncode == 0, err
    study = load("vkill", storage)
    check_records(study, MlflowClient(server.url), 16, 300)
    retried = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in study.trials}
    for trial in lost:
        state = study.trials[trial.number].state
        assert state in FINISHED or (state == TrialState.FAIL and trial.number in retried), (trial.number, state)


def test_workers_started_together_on_a_fresh_database_all_join(cluster, tmp_path):
    """All of them create Optuna's tables at the same moment; PostgreSQL lets one win and fails the others
    ("duplicate key ... pg_type_typname_nsp_index"), which must not end a worker."""
    postgres, server = cluster
    postgres.create_database("fresh")
    env = worker_env(postgres, server, SWEEPLAB_STORAGE=postgres.url("fresh"))
    sweep = sweep_file(tmp_path, "together", 4)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeplab", "worker", str(sweep), "epochs=3", "--worker-index", str(i), "--quiet"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for worker in workers:
        _, err = finish(worker, 300, postgres.url("fresh", password=True), "together", server)
        assert worker.returncode == 0, err
    check_records(load("together", postgres.url("fresh", password=True)), MlflowClient(server.url), 4, 3)


def test_workers_started_together_on_a_fresh_tracking_database_without_a_server_all_join(cluster, tmp_path):
    """#19.7: MLflow creating its tables in a fresh PostgreSQL database from several workers at once failed all
    but one (`UniqueViolation ... pg_type_typname_nsp_index`)."""
    postgres, server = cluster
    postgres.create_database("fresh_tracking")
    postgres.create_database("fresh_storage")
    env = worker_env(
        postgres,
        server,
        MLFLOW_TRACKING_URI=postgres.url("fresh_tracking"),
        SWEEPLAB_STORAGE=postgres.url("fresh_storage"),
    )
    sweep = sweep_file(tmp_path, "tables", 4)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeplab", "worker", str(sweep), "epochs=2", "--worker-index", str(i), "--quiet"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for worker in workers:
        _, err = finish(worker, 300, postgres.url("fresh_storage", password=True), "tables", server)
        assert worker.returncode == 0, err
    client = MlflowClient(postgres.url("fresh_tracking", password=True))
    check_records(load("tables", postgres.url("fresh_storage", password=True)), client, 4, 2)


def test_a_database_restart_while_a_worker_opens_the_storage_is_waited_out(cluster, tmp_path):
    """#19.7: a worker that found PostgreSQL restarting exited 2, as if its input were bad."""
    postgres, server = cluster
    storage = postgres.url("optuna", password=True)
    env = worker_env(postgres, server, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/runs.db")
    postgres.stop()
    try:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sweeplab",
                "worker",
                str(sweep_file(tmp_path, "restart", 2)),
                "epochs=2",
                "--quiet",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)  # the worker is trying to open the storage now
        assert worker.poll() is None, worker.communicate()[1]
    finally:
        postgres.start()
    _, err = finish(worker, 300, storage, "restart", server)
    assert worker.returncode == 0, err
    assert len(load("restart", storage).get_trials(states=FINISHED)) == 2


def test_wrong_database_password_is_one_line_without_the_password(cluster, tmp_path):
    postgres, server = cluster
    wrong = "not-the-" + PASSWORD
    url = postgres.url("optuna").replace("@", f":{wrong}@")
    env = worker_env(postgres, server)
    env.pop("PGPASSWORD")
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "worker", str(sweep_file(tmp_path, "pw", 2)), "--storage", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "password authentication failed" in proc.stderr and ":***@" in proc.stderr
    assert wrong not in proc.stderr + proc.stdout
    assert MlflowClient(server.url).get_experiment_by_name("pw") is None  # nothing half-written


def test_a_wrong_storage_password_creates_no_local_store(cluster, tmp_path):
    """Issue #11: the default local MLflow database was created before the Optuna storage refused the password."""
    postgres, _ = cluster
    url = postgres.url("optuna").replace("@", ":wrong-password@")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE", "PGPASSWORD")}
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "sweep", str(sweep_file(tmp_path, "pw2", 2)), "--storage", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "password authentication failed" in proc.stderr
    assert "wrong-password" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pw2.yaml"]


def test_a_champion_is_registered_through_a_tracking_server(cluster, tmp_path):
    """Issue #10: registering resolved the logged model through the default tracking URI, not the server."""
    postgres, server = cluster
    env = worker_env(postgres, server, SWEEPLAB_STORAGE=str(tmp_path / "optuna.journal"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "sweep",
            str(sweep_file(tmp_path, "champ", 2)),
            "epochs=3",
            "--quiet",
            "--no-report",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "champ.yaml",
        "optuna.journal",
        "optuna.journal.lock",
    ] or sorted(p.name for p in tmp_path.iterdir()) == ["champ.yaml", "optuna.journal"]
    client = MlflowClient(server.url)
    version = client.get_model_version_by_alias("champ", "champion")
    assert client.get_run(version.run_id).data.tags["sweeplab.role"] == "trial"
    script = (
        "import mlflow, numpy as np; mlflow.set_tracking_uri(%r); "
        "print(mlflow.pyfunc.load_model('models:/champ@champion').predict(np.array([[1.0, 2.0]])).shape)"
    )
    out = subprocess.run([sys.executable, "-c", script % server.url], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "(1, 1)", out.stderr


def test_credentials_stay_out_of_runs(cluster, tmp_path):
    postgres, server = cluster
    env = worker_env(postgres, server)
    env["SWEEPLAB_STORAGE"] = postgres.url("optuna", password=True)  # even when the URL carries it
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "worker", str(sweep_file(tmp_path, "secret", 2)), "epochs=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    client = MlflowClient(server.url)
    for run in client.search_runs([client.get_experiment_by_name("secret").experiment_id]):
        text = repr(run.data.params) + repr(run.data.tags)
        assert PASSWORD not in text


def test_a_database_outage_of_a_few_seconds_does_not_kill_a_worker(cluster, tmp_path):
    postgres, server = cluster
    storage = postgres.url("optuna", password=True)
    sweep = sweep_file(tmp_path, "outage", 8)
    worker = subprocess.Popen(
        [sys.executable, "-m", "sweeplab", "worker", str(sweep), "epochs=80", "--quiet"],
        cwd=tmp_path,
        env=worker_env(postgres, server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: (s := load("outage", storage)) and len(s.get_trials(states=FINISHED)) >= 2, 120, "two finished trials"
    )
    postgres.stop()
    time.sleep(3)
    postgres.start()
    _, err = finish(worker, 300, storage, "outage", server)
    assert worker.returncode == 0, err
    check_records(load("outage", storage), MlflowClient(server.url), 8, 80)


# --- the local default storage (journal file + SQLite): interrupts and kills, then a re-run ---------------


def local_sweep(folder: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "sweep",
            str(sweep_file(folder, "local", 8)),
            "--quiet",
            "--no-report",
            *args,
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def journal(folder: Path):
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))


@pytest.mark.parametrize("how, workers", [(signal.SIGINT, 1), (signal.SIGTERM, 2), (signal.SIGKILL, 1)])
def test_a_stopped_local_sweep_resumes_to_exactly_the_budget(tmp_path, how, workers):
    proc = local_sweep(tmp_path, "epochs=300", f"workers={workers}")
    wait_for(
        lambda: (
            (tmp_path / "optuna.journal").exists()
            and (s := load("local", journal(tmp_path)))
            and len(s.get_trials(states=FINISHED)) >= 2
            and [t for t in s.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
        ),
        120,
        "a trial training (its run started)",
    )
    stopped_at = time.monotonic()
    proc.send_signal(how)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - stopped_at < 10
    if how == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("sweeplab: interrupted"), err
        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("local").experiment_id])
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert [r for r in runs if r.info.status == "KILLED" and r.data.tags.get("sweeplab.role") == "trial"]
    rerun = local_sweep(tmp_path, "epochs=300")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    study = load("local", journal(tmp_path))
    check_records(study, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), 8, 300)


# --- connection drops at the worst moments, injected into a real SQLite RDB storage ------------------------


class DroppedConnections:
    """Fails chosen SQL statements once each, as SQLAlchemy does when the database goes away mid-statement.
    `plan` is a list of (after, statement): once `after` has been executed (None: at once), the next statement
    starting with `statement` fails."""

    def __init__(self, engine, plan):
        import sqlalchemy

        self.plan = [[after, statement, after is None] for after, statement in plan]
        self.dropped: list[str] = []
        sqlalchemy.event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn, cursor, statement, parameters, context, executemany):
        import sqlalchemy.exc

        if threading.current_thread().name == "sweeplab-heartbeat":
            return  # the worker's own sequence of statements only, so the plan lands where it says
        for step in self.plan:
            after, prefix, armed = step
            if armed and statement.lstrip().startswith(prefix):
                step[2] = None  # spent
                self.dropped.append(statement.split("\n")[0])
                raise sqlalchemy.exc.OperationalError(
                    statement, parameters, Exception("server closed the connection unexpectedly")
                )
            if armed is False and statement.lstrip().startswith(after):
                step[2] = True


def test_dropped_connections_inside_ask_suggest_and_tell_lose_no_trial_and_leave_none_running(tmp_path, monkeypatch):
    """Each drop lands where a retry alone is not enough: inside `ask` after the trial row exists (its retry
    creates a second trial; the first is orphaned and must not hold a place of the budget forever), in the
    middle of the suggestions, and in the tell. Before the fix the orphan made the worker wait forever."""
    from sweeplab import stores
    from sweeplab.sweep import ledger
    from sweeplab.sweep.driver import prepare, start_parent_run, work
    from sweeplab.sweep.probes import settle
    from sweeplab.sweep.spec import load_sweep

    monkeypatch.setattr(ledger, "ORPHAN_AFTER_S", 0.5)
    monkeypatch.setattr(stores, "RETRY_WAITS_S", (0.05, 0.1))
    sweep = settle(load_sweep(sweep_file(tmp_path, "drops", 4), {"epochs": 4})).sweep
    tracking, storage_url = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    (ctx,) = prepare(sweep, tracking, storage_url)
    ctx.parent_run_id = start_parent_run(ctx.tracker, ctx.experiment_id, sweep, storage_url, 1)
    drops = DroppedConnections(
        ctx.ledger.storage.engine,
        [
            ("UPDATE trials SET number", "SELECT"),  # the read inside ask, once trial #0's row is committed
            ("INSERT INTO trial_params", "INSERT INTO trial_params"),  # the second suggestion of a trial
            ("UPDATE trials SET state", "UPDATE trials SET state"),  # the tell of the second trial told
        ],
    )
    worker = threading.Thread(target=work, args=(ctx,), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the worker is stuck: a trial it cannot finish holds a place of the budget"
    assert len(drops.dropped) == 3, drops.dropped
    ctx.tracker.end_run(ctx.parent_run_id, "completed")

    study = optuna.load_study(study_name="drops", storage=storage_url)
    orphan = study.trials[0]
    assert orphan.state == TrialState.FAIL and orphan.user_attrs["fail_reason"].startswith("orphaned")
    assert orphan.params == {} and "mlflow_run_id" not in orphan.user_attrs
    assert [t.state for t in study.trials[1:]] == [TrialState.COMPLETE] * 4  # every drop was retried through
    check_records(study, MlflowClient(tracking), 4, 4)
