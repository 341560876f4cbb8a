"""The sweep's answer (issue #13): conditions with equal budgets and their own searches, a champion per condition
from the best trial's own run, a report and `--json` that name the right best run for each condition (worked out
here from the raw metric histories in MLflow, not from the report's code), descriptions in the MLflow UI, and the
printed UI link and the report as a browser shows them (headless Chromium)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
SWEEPLAB = str(Path(sys.executable).parent / "sweeplab")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Three optimizers and a range of lr searched separately at two noise levels, 8 trials each."""
    tmp = tmp_path_factory.mktemp("compared")
    (tmp / "c.yaml").write_text(
        textwrap.dedent(f"""\
        study: cmp
        experiment: {ROOT / "experiments/training_loop_lab.yaml"}
        space:
          optimizer: {{choices: [Adam, SGD, RMSprop]}}
          lr: {{low: 0.001, high: 0.1, log: true}}
        conditions:
          noise: [0.3, 1.0]
        sampler: {{type: random, seed: 4}}
        n_trials: 16
        """)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    proc = subprocess.run(
        [SWEEPLAB, "sweep", "c.yaml", "epochs=15", "--quiet"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return tmp, f"sqlite:///{tmp}/mlflow.db", proc.stdout, env


def best_by_hand(client, experiment_id):
    """Per noise level: the completed run with the lowest validation loss in its logged curve."""
    best = {}
    for run in client.search_runs([experiment_id], "tags.`sweeplab.role` = 'trial'", max_results=1000):
        if run.data.tags["sweeplab.outcome"] != "completed":
            continue
        low = min(m.value for m in client.get_metric_history(run.info.run_id, "val_loss"))
        noise = float(run.data.params["data.noise"])
        if noise not in best or low < best[noise][1]:
            best[noise] = (run.info.run_id, low)
    return best


@pytest.mark.slow
def test_each_condition_gets_its_own_study_and_an_equal_share(compared):
    tmp, _, _, _ = compared
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp / "optuna.journal")))
    for noise in ("0.3", "1.0"):
        study = optuna.load_study(study_name=f"cmp[noise={noise}]", storage=storage)
        assert len(study.trials) == 8 and set(study.trials[0].params) == {"optimizer", "lr"}


@pytest.mark.slow
def test_each_condition_has_a_champion_from_its_best_trials_own_run(compared):
    _, uri, out, _ = compared
    client = MlflowClient(uri)
    best = best_by_hand(client, client.get_experiment_by_name("cmp").experiment_id)
    own = client.get_model_version_by_alias("cmp", "champion")  # the lab's own noise, 0.3
    other = client.get_model_version_by_alias("cmp", "champion-noise-1_0")
    assert own.run_id == best[0.3][0] and other.run_id == best[1.0][0]
    assert "noise=1.0" in other.description and "models:/cmp@champion-noise-1_0" in out
    for version in (own, other):
        assert client.get_run(version.run_id).data.tags["sweeplab.role"] == "trial"


@pytest.mark.slow
def test_the_report_answers_per_condition_and_its_json_names_the_right_runs(compared):
    tmp, uri, out, env = compared
    client = MlflowClient(uri)
    best = best_by_hand(client, client.get_experiment_by_name("cmp").experiment_id)
    first = out.split("report for cmp", 1)[1].splitlines()[2:4]  # the answer comes first
    assert first[0].startswith("noise=0.3: best is") and first[1].startswith("noise=1.0: best is")
    proc = subprocess.run(
        [SWEEPLAB, "report", "cmp", "--json"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    answer = json.loads(proc.stdout)
    assert [a["condition"] for a in answer["answers"]] == [{"noise": 0.3}, {"noise": 1.0}]
    for item in answer["answers"]:
        run_id, low = best[item["condition"]["noise"]]
        assert item["best"]["run_id"] == run_id and item["best"]["best_val_loss"] == pytest.approx(low, rel=1e-12)
        assert sum(item["trials"].values()) == 8 and set(item["best"]["params"]) == {"optimizer", "lr"}


def test_the_study_and_its_runs_describe_themselves(compared):
    _, uri, _, _ = compared
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cmp")
    assert "noise in [0.3, 1.0]" in experiment.tags["mlflow.note.content"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("sweeplab.role") == "sweep"]
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("noise=0.3: best is") and "\n\nnoise=1.0: best is" in note
    assert note.count("fANOVA importance") == 2  # the report's answer (logged after the sweep's own short note)
    for run in runs:
        if run.data.tags.get("sweeplab.role") == "trial":
            assert run.data.tags["mlflow.note.content"].startswith(
                f"Trial #{run.data.tags['sweeplab.trial_number']} (noise={run.data.params['data.noise']})"
            )


def chromium(*args: str) -> str:
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1600,1000",
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc.stdout


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Chromium is not installed here (.ci/run installs Debian's chromium)",
)
@pytest.mark.slow
def test_the_printed_link_and_the_report_in_a_browser(compared):
    tmp, uri, out, env = compared
    client = MlflowClient(uri)
    best = best_by_hand(client, client.get_experiment_by_name("cmp").experiment_id)
    page = chromium("--dump-dom", (tmp / "reports/cmp/report.html").as_uri())
    assert "The answer" in page and "noise=0.3: best is" in page and page.count("<img") >= 3
    browse = next(line for line in out.splitlines() if line.startswith("browse:")).split(":", 1)[1].split()
    port = free_port()
    ui = subprocess.Popen(
        [*browse, "--port", str(port)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        link = ui.stdout.readline().split()[2]
        dom = chromium("--dump-dom", link)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    # the runs table, sorted best first, with best_val_loss and the searched parameters as columns
    for column in ("best_val_loss", "train.lr", "train.optimizer", "data.noise"):
        assert column in dom, column
    names = {
        run.info.run_name: run.info.run_id
        for run in client.search_runs(
            [client.get_experiment_by_name("cmp").experiment_id], "tags.`sweeplab.role` = 'trial'"
        )
    }
    positions = {run_id: dom.find(name) for name, run_id in names.items() if dom.find(name) >= 0}
    overall = min(best.values(), key=lambda item: item[1])[0]
    assert positions and min(positions, key=positions.get) == overall
    assert "sweep 20" not in dom  # the parent runs are filtered out of the trials' table
    assert dom.find("Group: 0.3") < dom.find("Group: 1.0")  # grouped by condition
