"""sweeplab as a new user runs it: the installed `sweeplab` command, from a folder outside the checkout, with a
store not named mlflow.db, pasting the commands it prints. Each test here failed on 53f890a (issue #10).

The sweep: SGD on the seed's lab at three learning rates (grid). lr=0.3 diverges at epoch 2 after a
val_loss of ~923 at epoch 1 (`sweeplab run ... optimizer=SGD lr=0.3 epochs=8` prints so); 0.03 and 0.2 learn."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
SWEEPLAB = str(Path(sys.executable).parent / "sweeplab")
EPOCHS = 8


def user_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    env["PATH"] = "/usr/bin:/bin"  # sweeplab is not on PATH: the printed commands must say where it is
    return {**env, **extra}


def write_sweep(folder: Path) -> Path:
    path = folder / "sgd.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        study: sgd_lr
        experiment: {ROOT / "experiments/training_loop_lab.yaml"}
        base: {{train: {{optimizer: SGD, epochs: {EPOCHS}}}}}
        space:
          lr: {{choices: [0.03, 0.2, 0.3]}}
        sampler: {{type: grid}}
        n_trials: 3
        """)
    )
    return path


@pytest.fixture(scope="module")
def user_sweep(tmp_path_factory):
    """`sweeplab sweep` run from ~/work with its store in ~/stores/experiments.db."""
    home = tmp_path_factory.mktemp("home")
    (home / "work").mkdir()
    (home / "stores").mkdir()
    sweep = write_sweep(home)
    uri = f"sqlite:///{home}/stores/experiments.db"
    proc = subprocess.run(
        [SWEEPLAB, "sweep", str(sweep), "--tracking-uri", uri, "--no-report"],
        cwd=home / "work",
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return home, uri, proc.stdout, MlflowClient(uri)


def trial_runs(client):
    experiment = client.get_experiment_by_name("sgd_lr")
    runs = client.search_runs([experiment.experiment_id], "tags.`sweeplab.role` = 'trial'")
    return {float(run.data.params["train.lr"]): run for run in runs}


@pytest.mark.slow
def test_a_store_of_any_name_gets_its_champion_and_nothing_is_written_elsewhere(user_sweep):
    home, uri, out, client = user_sweep
    assert "champion: models:/sgd_lr@champion (version 1" in out
    assert list((home / "work").iterdir()) == []  # no stray mlflow.db (or anything) where the command ran
    assert sorted(p.name for p in (home / "stores").iterdir()) == [
        ".experiments.db.lock",  # #36.7: hidden, no longer beside every store in plain sight
        "experiments.db",
        "mlartifacts",
        "optuna.journal",
    ]


def test_the_champion_is_logged_from_the_best_trials_own_run(user_sweep):
    _, _, _, client = user_sweep
    runs = trial_runs(client)
    best = min(
        (run for run in runs.values() if "best_val_loss" in run.data.metrics),
        key=lambda run: run.data.metrics["best_val_loss"],
    )
    version = client.get_model_version_by_alias("sgd_lr", "champion")
    assert version.run_id == best.info.run_id == version.tags["sweeplab.source_run_id"]
    assert f"run {best.info.run_id}" in version.description
    (output,) = client.get_run(best.info.run_id).outputs.model_outputs  # the trial's page lists the model
    assert client.get_logged_model(output.model_id).artifact_location == version.source


@pytest.mark.slow
def test_the_champion_takes_the_inputs_people_try_first_without_sweeplab(user_sweep):
    home, uri, _, client = user_sweep
    script = textwrap.dedent(f"""\
        import json, sys
        import numpy as np, pandas as pd, mlflow
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/sgd_lr@champion")
        rows = [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]]
        tries = {{"float64 array": np.array(rows), "float32 array": np.array(rows, dtype=np.float32),
                 "list of rows": rows, "DataFrame x1, x2": pd.DataFrame(rows, columns=["x1", "x2"])}}
        out = {{name: np.asarray(model.predict(x)).ravel().tolist() for name, x in tries.items()}}
        assert "sweeplab" not in sys.modules
        print(json.dumps(out))
        """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=home / "work", capture_output=True, text=True, env=user_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    version = client.get_model_version_by_alias("sgd_lr", "champion")
    folder = client.download_artifacts(version.run_id, "checkpoint", str(home / "dl"))
    state = torch.load(f"{folder}/best.pt", weights_only=True)["state_dict"]
    rows = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]])
    expected = (
        torch.relu(rows @ state["net.0.weight"].T + state["net.0.bias"]) @ state["net.2.weight"].T + state["net.2.bias"]
    )[:, 0].tolist()
    assert set(out) == {"float64 array", "float32 array", "list of rows", "DataFrame x1, x2"}
    for values in out.values():
        assert values == pytest.approx(expected, rel=1e-6)


def printed(out: str, label: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith(f"{label}:")]
    return line.split(":", 1)[1].strip()


@pytest.mark.slow
def test_the_printed_predict_command_works_pasted_where_the_sweep_ran(user_sweep):
    home, _, out, _ = user_sweep
    command = printed(out, "predict")
    assert not command.startswith(".venv/") and "make " not in out
    proc = subprocess.run(
        command, shell=True, cwd=home / "work", env=user_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert [line.split(" -> ")[0] for line in proc.stdout.splitlines()] == [
        "x=[1.0, 2.0]",
        "x=[-1.0, 0.5]",
        "x=[0.0, 0.0]",
    ]


@pytest.mark.slow
def test_the_printed_ui_command_answers_when_it_says_so_and_links_the_runs_best_first(user_sweep):
    home, _, out, client = user_sweep
    command = printed(out, "browse")
    assert "ui sgd_lr --tracking-uri" in command
    port = free_port()
    ui = subprocess.Popen(
        shlex.split(command) + ["--port", str(port)],
        cwd=home / "work",
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = ui.stdout.readline()  # blocks until sweeplab says the UI is there
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert response.status == 200  # ... and it is, at once
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # sweeplab and the MLflow server it started
        ui.wait(timeout=30)
    experiment_id = client.get_experiment_by_name("sgd_lr").experiment_id
    assert line.startswith(
        f"MLflow UI: http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?"
        "viewStateShareKey=sweeplab&workflowType=machine_learning"
    )
    view = json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.sweeplab"])
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`best_val_loss`", True)
    assert {"metrics.`best_val_loss`", "params.`train.lr`"} <= set(view["selectedColumns"])


def test_runs_record_the_commit_of_the_running_source(user_sweep):
    _, _, _, client = user_sweep
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the checkout under test is not a git repository")
    for run in trial_runs(client).values():
        assert run.data.tags["sweeplab.git_commit"] == head.stdout.strip()
        assert run.data.tags["sweeplab.version"]


def test_no_commit_is_recorded_for_a_copy_inside_another_repository(tmp_path):
    """An installed copy inside somebody's repository must not record that repository's commit."""
    import shutil

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copytree(ROOT / "src" / "sweeplab", tmp_path / "lib" / "sweeplab")
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=a",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    script = "from sweeplab.track.tracker import common_tags; print(sorted(common_tags()))"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "lib")},
        check=True,
    )
    assert proc.stdout.strip() == "['sweeplab.version']"


def test_a_diverged_run_shows_its_finite_curve_and_no_result(user_sweep):
    _, _, _, client = user_sweep
    run = trial_runs(client)[0.3]
    assert run.info.status == "FAILED" and run.data.tags["sweeplab.outcome"] == "diverged"
    assert run.data.tags["sweeplab.reason"].startswith("diverged at epoch 2")
    assert "best_val_loss" not in run.data.metrics and "best_epoch" not in run.data.metrics
    val = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val] == [1] and np.isfinite(val[0].value) and val[0].value > 100
    assert run.data.metrics["epochs_run"] == 2


def test_summaries_are_logged_at_one_step(user_sweep):
    _, _, _, client = user_sweep
    run = trial_runs(client)[0.03]
    for key in ("best_val_loss", "best_epoch", "epochs_run", "train_seconds", "baseline_val_loss"):
        (metric,) = client.get_metric_history(run.info.run_id, key)
        assert metric.step == 0, key
    assert run.data.metrics["best_epoch"] > 1  # a value, not the step it was logged at


@pytest.mark.slow
def test_mlflow_tracking_uri_from_the_environment(tmp_path):
    (tmp_path / "work").mkdir()
    sweep = write_sweep(tmp_path)
    uri = f"sqlite:///{tmp_path}/env store.db"  # a space, too
    proc = subprocess.run(
        [SWEEPLAB, "sweep", str(sweep), "--no-report", "--quiet"],
        cwd=tmp_path / "work",
        env=user_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "work").iterdir()) == []
    assert MlflowClient(uri).get_model_version_by_alias("sgd_lr", "champion").version == 1
    proc = subprocess.run(
        printed(proc.stdout, "predict"),
        shell=True,
        cwd=tmp_path / "work",
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 3, proc.stderr


def test_a_new_store_is_a_copy_of_a_cached_empty_one_and_the_same_as_a_migrated_one(tmp_path, monkeypatch):
    """Issue #14: a new SQLite store costs ~2 s of MLflow migrations; the first one made on a machine is kept (in
    $XDG_CACHE_HOME/sweeplab) and later stores are copies. A copy must be what migrating would have made here."""
    import sqlite3

    from sweeplab.track.tracker import Tracker

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def schema(database):
        with sqlite3.connect(database) as connection:
            tables = connection.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
            version = connection.execute("SELECT version_num FROM alembic_version").fetchall()
            default = connection.execute("SELECT name, artifact_location FROM experiments").fetchall()
        return tables, version, default

    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        Tracker(f"sqlite:///{tmp_path / folder / 'mlflow.db'}").experiment_id("study")
    assert len(list((tmp_path / "cache" / "sweeplab").glob("empty-mlflow-*.db"))) == 1
    first, second = schema(tmp_path / "first" / "mlflow.db"), schema(tmp_path / "second" / "mlflow.db")
    assert first[:2] == second[:2]  # tables, indexes and migration version
    assert second[2][0] == ("Default", str(tmp_path / "second" / "mlruns" / "0"))  # as MLflow puts it, here
    assert second[2][1][0] == "study"


def test_a_damaged_cached_store_is_migrated_again_and_replaced(tmp_path, monkeypatch):
    """The cached empty store is only a shortcut: garbage there costs a migration, not a broken store."""
    from sweeplab.track.tracker import Tracker, _empty_store_template

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    template = _empty_store_template()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database")
    assert Tracker(f"sqlite:///{tmp_path / 'a.db'}").experiment_id("study")
    assert template.read_bytes().startswith(b"SQLite format 3")


def start_ui(command: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    ui = subprocess.Popen(
        command, cwd=cwd, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    return ui, ui.stdout.readline()  # blocks until sweeplab says the UI is there


def group_of_server(port: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and f"--port\0{port}\0" in (proc / "cmdline").read_text()
                and "mlflow" in (proc / "cmdline").read_text()
            ):
                return os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return None


def group_alive(pgid: int) -> bool:
    members = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    for proc in members:
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_the_ui_server_and_its_children_end_with_sweeplab_ui(user_sweep, how):
    """#19.7: SIGKILL and SIGHUP left the MLflow server answering, SIGTERM left its huey consumers for ~40 s."""
    home, uri, _, _ = user_sweep
    port = free_port()
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    ui, line = start_ui([SWEEPLAB, "ui", "sgd_lr", "--tracking-uri", uri, "--port", str(port)], home / "work")
    assert line.startswith("MLflow UI:")
    group = group_of_server(port)
    assert group is not None and group != os.getpgid(ui.pid)
    ui.send_signal(how)
    ui.wait(timeout=30)
    deadline = time.monotonic() + 20
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(group)
    if shm or os.path.isdir("/dev/shm"):  # no job-runner store left in /dev/shm by each UI
        assert set(os.listdir("/dev/shm")) - shm == set()


@pytest.mark.slow
def test_sweeplab_ui_on_a_port_another_ui_holds_is_one_line(user_sweep, tmp_path):
    """#19.7: it printed a link into the other server's store and exited 0."""
    home, uri, _, _ = user_sweep
    port = free_port()
    ui, line = start_ui([SWEEPLAB, "ui", "sgd_lr", "--tracking-uri", uri, "--port", str(port)], home / "work")
    try:
        assert line.startswith("MLflow UI:")
        proc = subprocess.run(
            [SWEEPLAB, "ui", "--tracking-uri", uri, "--port", str(port)],
            cwd=tmp_path,
            env=user_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip() == f"sweeplab: error: --port {port}: already in use on 127.0.0.1 (another MLflow UI?); "
        f"try --port {port + 1}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["report", "sgd_lr"],
        ["predict", "sgd_lr"],
        ["ui", "sgd_lr"],
        ["report", "sgd_lr", "--tracking-uri", "sqlite:///sub/dir/x.db"],
    ],
)
def test_read_only_commands_in_a_folder_without_a_store_write_nothing(tmp_path, command):
    """#19.7: report, predict and ui left a new 954 KB mlflow.db and its lock (and made sub/dir/)."""
    proc = subprocess.run(
        [SWEEPLAB, *command], cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "no MLflow store there" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_report_out_under_a_file_is_bad_input(user_sweep, tmp_path):
    home, uri, _, _ = user_sweep
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run(
        [SWEEPLAB, "report", "sgd_lr", "--tracking-uri", uri, "--out", str(tmp_path / "afile/r")],
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and f"{tmp_path / 'afile'} is a file" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["a#b?c=1", "p%41"])
def test_a_sweep_in_a_folder_with_an_odd_name_keeps_its_store_there(tmp_path, name):
    """#19.7: in /tmp/a#b?c=1 the runs went into a new file /tmp/a#b; in p%41 the sweep wrote mlflow.db and an
    empty journal, then failed."""
    folder = tmp_path / name
    folder.mkdir()
    proc = subprocess.run(
        [SWEEPLAB, "sweep", str(write_sweep(tmp_path)), "--no-report"],
        cwd=folder,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "sgd.yaml"])  # nothing beside the folder
    assert {"mlflow.db", "optuna.journal", "mlartifacts"} <= {p.name for p in folder.iterdir()}
    pasted = subprocess.run(
        printed(proc.stdout, "predict"),
        shell=True,
        cwd=folder,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pasted.returncode == 0 and pasted.stdout.startswith("x=[1.0, 2.0] -> pred="), pasted.stderr
