"""A real sweep against real stores (temporary SQLite MLflow database, Optuna journal file): what it leaves
behind, checked against values recomputed independently (the seed's plain loop, plain torch arithmetic)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from sweeplab.cli import main

from reference import seed_run

ROOT = Path(__file__).resolve().parents[1]

LAB = "experiments/training_loop_lab.yaml"


def write_sweep(path, root, study, space, n_trials, sampler="random", pruner="none", extra="", engine="reference"):
    """A sweep file; the reference engine unless asked (these tests pin down its runtime: workers, resume,
    interrupts; test_vectorized.py and the user-level tests run the default, auto)."""
    path.write_text(
        f"study: {study}\nexperiment: {root / LAB}\nspace:\n{textwrap.indent(space, '  ')}"
        f"sampler: {{type: {sampler}, seed: 1}}\npruner: {{type: {pruner}}}\nn_trials: {n_trials}\n"
        f"engine: {engine}\n{extra}"
    )
    return path


SPACE = """\
optimizer: {choices: [Adam, AdamW, SGD, RMSprop]}
lr:
  by: optimizer
  cases:
    Adam: {low: 0.001, high: 0.1, log: true}
    AdamW: {low: 0.001, high: 0.1, log: true}
    SGD: {low: 0.001, high: 0.1, log: true}
    RMSprop: {low: 0.001, high: 0.03, log: true}
hidden: {choices: [4, 16]}
noise: {choices: [0.3, 1.0]}
"""
EPOCHS = 6


def runs_of(client, study):
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def study_of(tmp_path, name):
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """One 4-trial sweep shared by the read-only checks below."""
    import os
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("sweep")
    root = Path(__file__).resolve().parents[1]
    sweep = write_sweep(tmp / "s.yaml", root, "small", SPACE, 4)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["sweep", str(sweep), f"epochs={EPOCHS}", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    return tmp, client, runs_of(client, "small"), study_of(tmp, "small")


def test_one_parent_run_and_one_child_run_per_trial(small_sweep):
    _, _, runs, study = small_sweep
    parents = [r for r in runs if r.data.tags.get("sweeplab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sweeplab.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    by_run = {r.info.run_id: r for r in children}
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(by_run)
    for trial in trials:
        run = by_run[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["sweeplab.trial_number"] == str(trial.number)
        assert run.data.tags["sweeplab.study"] == "small" and run.data.tags["sweeplab.trial_state"] == "COMPLETE"
        assert run.data.tags["sweeplab.version"]
        # params: the full resolved config, the trial's suggestions included
        optimizer = trial.params["optimizer"]
        assert run.data.params["train.optimizer"] == optimizer
        assert float(run.data.params["train.lr"]) == trial.params[f"lr_{optimizer}"]
        assert run.data.params["model.hidden"] == str(trial.params["hidden"])
        assert run.data.params["train.epochs"] == str(EPOCHS) and run.data.params["data.n_samples"] == "240"
        assert run.info.run_name.endswith(f"#{trial.number}") and run.info.run_name.startswith(optimizer.lower())


def test_curves_summary_metrics_match_an_independent_run_of_the_seed_loop(small_sweep):
    _, client, runs, study = small_sweep
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        run_id = trial.user_attrs["mlflow_run_id"]
        history = {
            key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            for key in ("train_loss", "val_loss")
        }
        assert [m.step for m in history["val_loss"]] == list(range(1, EPOCHS + 1))
        optimizer = trial.params["optimizer"]
        expected = seed_run(
            optimizer=optimizer,
            lr=trial.params[f"lr_{optimizer}"],
            hidden=trial.params["hidden"],
            noise=trial.params["noise"],
            epochs=EPOCHS,
        )
        assert [m.value for m in history["train_loss"]] == expected["train_loss"]
        assert [m.value for m in history["val_loss"]] == expected["val_loss"]
        metrics = client.get_run(run_id).data.metrics
        val = [m.value for m in history["val_loss"]]
        assert metrics["best_val_loss"] == min(val) == trial.value
        assert metrics["best_epoch"] == val.index(min(val)) + 1


def test_logged_checkpoint_rebuilds_the_model_and_reproduces_best_val_loss(small_sweep, tmp_path):
    _, client, _, study = small_sweep
    trial = study.best_trial
    run_id = trial.user_attrs["mlflow_run_id"]
    folder = client.download_artifacts(run_id, "checkpoint", str(tmp_path))
    spec = json.loads(open(f"{folder}/model_spec.json").read())
    payload = torch.load(f"{folder}/best.pt", weights_only=True)
    # rebuild with plain torch from the logged spec, and regenerate the validation split as the seed does
    hidden = spec["hidden"][0]
    net = torch.nn.Sequential(
        torch.nn.Linear(spec["in_features"], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, spec["out_features"])
    )
    net.load_state_dict({k.removeprefix("net."): v for k, v in payload["state_dict"].items()})
    torch.manual_seed(42)
    x = torch.randn(240, 2)
    y = 3 * x[:, [0]] + 2 * x[:, [1]] + 5 + torch.randn(240, 1) * trial.params["noise"]
    val = torch.randperm(240, generator=torch.Generator().manual_seed(42))[192:]
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(net(x[val]), y[val]).item()
    assert loss == pytest.approx(trial.value, rel=1e-6)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].tags[0].value == "training"


@pytest.mark.slow
def test_champion_is_registered_and_predicts_without_sweeplab(small_sweep):
    tmp, client, _, study = small_sweep
    version = client.get_model_version_by_alias("small", "champion")
    assert version.tags["sweeplab.source_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    script = textwrap.dedent("""\
        import json, sys
        import numpy as np, mlflow
        mlflow.set_tracking_uri("sqlite:///mlflow.db")
        model = mlflow.pyfunc.load_model("models:/small@champion")
        rows = np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32)
        out = {n: np.asarray(model.predict(rows[:n])).ravel().tolist() for n in (1, 3, 1000)}
        assert "sweeplab" not in sys.modules
        print(json.dumps(out))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the same rows through the logged checkpoint, in plain torch
    folder = client.download_artifacts(version.tags["sweeplab.source_run_id"], "checkpoint", str(tmp / "dl"))
    state = torch.load(f"{folder}/best.pt", weights_only=True)["state_dict"]
    import numpy as np

    rows = torch.tensor(np.random.default_rng(0).normal(size=(1000, 2)).astype(np.float32))
    hidden = torch.relu(rows @ state["net.0.weight"].T + state["net.0.bias"])
    expected = (hidden @ state["net.2.weight"].T + state["net.2.bias"])[:, 0].tolist()
    for n in (1, 3, 1000):
        assert out[str(n)] == pytest.approx(expected[:n], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_resume_reaches_exactly_n_trials(store):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "resume", SPACE, 3)
    assert main(["sweep", str(sweep), "epochs=3", "--quiet"]) == 0
    assert main(["sweep", str(sweep), "epochs=3", "--quiet"]) == 0  # nothing left to do
    assert main(["sweep", str(sweep), "epochs=3", "n_trials=5", "--quiet"]) == 0
    study = study_of(store, "resume")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 5
    assert len(study.trials) == 5
    children = [
        r
        for r in runs_of(MlflowClient(f"sqlite:///{store}/mlflow.db"), "resume")
        if r.data.tags.get("sweeplab.role") == "trial"
    ]
    assert len(children) == 5


@pytest.mark.slow
def test_two_workers_finish_the_budget_without_duplicates(store):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "pair", SPACE, 6, sampler="tpe")
    assert main(["sweep", str(sweep), "epochs=4", "workers=2", "--quiet"]) == 0
    study = study_of(store, "pair")
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 6
    assert len({t.number for t in finished}) == 6
    runs = runs_of(MlflowClient(f"sqlite:///{store}/mlflow.db"), "pair")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    children = [r for r in runs if r.data.tags.get("sweeplab.role") == "trial" and r.info.status == "FINISHED"]
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in finished)


@pytest.mark.slow
def test_independent_worker_processes_share_one_budget(store):
    """Two `sweeplab worker` processes (as on two machines) against one study: exactly n_trials, no trial twice."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "shared", SPACE, 10, sampler="tpe")
    env = {
        **__import__("os").environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
        "SWEEPLAB_STORAGE": str(store / "optuna.journal"),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeplab", "worker", str(sweep), "epochs=20", "--worker-index", str(i)],
            cwd=store,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    study = study_of(store, "shared")
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    ran = sum(int(out.split("worker done: ")[1].split()[0]) for out in outputs)
    assert len(finished) == 10 and ran == 10
    runs = runs_of(MlflowClient(f"sqlite:///{store}/mlflow.db"), "shared")
    trial_runs = [r for r in runs if r.data.tags.get("sweeplab.role") == "trial"]
    assert sorted(r.data.tags["sweeplab.trial_number"] for r in trial_runs) == sorted(str(t.number) for t in finished)
    workers = [r for r in runs if r.data.tags.get("sweeplab.role") == "worker"]
    assert len(workers) == 2 and all(r.info.status == "FINISHED" for r in runs)


def test_diverged_and_pruned_trials_are_recorded_and_the_sweep_goes_on(store):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(
        store / "s.yaml",
        root,
        "outcomes",
        "optimizer: {choices: [SGD]}\nlr: {low: 0.0001, high: 10.0}\n",
        3,
        pruner="median",
        extra="",
    )
    sweep.write_text(
        sweep.read_text().replace(
            "pruner: {type: median}", "pruner: {type: median, n_startup_trials: 1, n_warmup_steps: 2}"
        )
    )
    # Fix the order with Optuna's own queue: a good trial, then SGD at lr=10 (diverges), then lr=1e-4, which
    # barely moves and is stopped by the median pruner as soon as its warm-up (2 epochs) allows.
    study = optuna.create_study(
        study_name="outcomes",
        storage=optuna.storages.JournalStorage(
            __import__("optuna.storages.journal", fromlist=["x"]).JournalFileBackend(str(store / "optuna.journal"))
        ),
        load_if_exists=True,
    )
    for lr in (0.05, 10.0, 0.0001):
        study.enqueue_trial({"optimizer": "SGD", "lr": lr})
    assert main(["sweep", str(sweep), "epochs=8", "--quiet"]) == 0
    study = study_of(store, "outcomes")
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    outcomes = {}
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        outcome = run.data.tags["sweeplab.outcome"]
        outcomes[trial.params["lr"]] = outcome
        curve = client.get_metric_history(run.info.run_id, "val_loss")
        epochs_run = int(run.data.metrics["epochs_run"])
        assert len(curve) == epochs_run - (outcome == "diverged")  # a diverged run's last, non-finite epoch is left out
        if outcome == "completed":
            assert trial.state == optuna.trial.TrialState.COMPLETE and run.info.status == "FINISHED"
            continue
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert run.data.tags["sweeplab.reason"] == trial.user_attrs["reason"]
        if outcome == "diverged":
            assert run.info.status == "FAILED" and trial.user_attrs["reason"].startswith(
                f"diverged at epoch {epochs_run}"
            )
        else:
            assert run.info.status == "KILLED" and trial.user_attrs["reason"].startswith(
                f"pruned at epoch {epochs_run}"
            )
            assert epochs_run == 2  # steps are epochs (1-based); MedianPruner may prune once step >= n_warmup_steps
    assert outcomes == {0.05: "completed", 10.0: "diverged", 0.0001: "pruned"}


def test_resuming_with_a_changed_space_fails_before_running(store, capsys):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    first = write_sweep(store / "a.yaml", root, "changed", "hidden: {choices: [4, 8]}\n", 1)
    assert main(["sweep", str(first), "epochs=2", "--quiet"]) == 0
    runs_before = len(runs_of(MlflowClient(f"sqlite:///{store}/mlflow.db"), "changed"))
    second = write_sweep(store / "b.yaml", root, "changed", "hidden: {choices: [16, 32]}\n", 2)
    assert main(["sweep", str(second), "epochs=2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already searched hidden over choices [4, 8]; this file gives choices [16, 32]" in err
    assert len(runs_of(MlflowClient(f"sqlite:///{store}/mlflow.db"), "changed")) == runs_before


@pytest.mark.slow
def test_resuming_with_settings_that_change_results_is_refused_and_others_resume(store, capsys):
    """#19.1: a re-run with another task and epochs joined the old study and ranked BCE against MSE."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "settings", "hidden: {choices: [4, 8]}\n", 2)
    assert main(["sweep", str(sweep), "epochs=2", "--quiet", "--no-report"]) == 0
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    runs_before, journal = len(runs_of(client, "settings")), (store / "optuna.journal").read_bytes()
    capsys.readouterr()
    for changed, said in (
        (["epochs=3", "task=binary"], "with task=regression, epochs=2; this sweep gives task=binary, epochs=3"),
        (["epochs=2", "loss=l1"], "with loss=mse; this sweep gives loss=l1"),
        (["epochs=2", "data.n_samples=200"], "with n_samples=240; this sweep gives n_samples=200"),
    ):
        assert main(["sweep", str(sweep), *changed, "n_trials=4", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err and "study=NAME" in err, err
    assert len(runs_of(client, "settings")) == runs_before  # nothing written: no run, no trial, no parent
    assert (store / "optuna.journal").read_bytes() == journal
    # what does not change a result resumes: workers, the engine, the report, the device
    assert main(["sweep", str(sweep), "epochs=2", "n_trials=3", "engine=vectorized", "--no-report", "--quiet"]) == 0
    assert main(["sweep", str(sweep), "epochs=2", "n_trials=4", "workers=2", "device=cpu", "--quiet"]) == 0
    assert len(study_of(store, "settings").get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 4


@pytest.mark.parametrize(
    "space, words",
    [
        ("optimizer: {choices: [Adam, Adamm]}\n", "space.optimizer: train.optimizer.class_path: 'Adamm' is not in"),
        ("lr: {low: 0.1, high: 0.01}\n", "low (0.1) must not exceed high (0.01)"),
        ("lr: {by: optimizer, cases: {Adam: {choices: [0.1]}}}\n", "must be a categorical parameter of the space"),
        ("hidden: {choices: [4, -1]}\n", "space.hidden: model.hidden"),
        ("widht: {choices: [4]}\n", "space.widht: widht: Extra inputs are not permitted"),
    ],
)
def test_a_bad_sweep_file_creates_nothing(store, capsys, space, words):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "bad.yaml", root, "bad", space, 2)
    assert main(["sweep", str(sweep)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"sweeplab: error: {sweep}: ") and words in err
    assert not (store / "mlflow.db").exists() and not (store / "optuna.journal").exists()


def test_sweeplab_run_tracks_one_run_with_the_same_names_and_artifacts(store, capsys):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    assert main(["run", str(root / LAB), "epochs=20"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    (run,) = runs_of(client, "training_loop_lab")
    assert f"mlflow run: {run.info.run_id}" in out and run.info.status == "FINISHED"
    assert run.data.tags["sweeplab.role"] == "run" and run.data.params["train.lr"] == "0.03"
    expected = seed_run(epochs=20)
    history = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)
    assert [m.value for m in history] == expected["val_loss"]
    assert run.data.metrics["best_val_loss"] == expected["best_val"]
    assert run.data.metrics["best_epoch"] == expected["best_epoch"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/best.pt", "checkpoint/model_spec.json", "checkpoint/config.json"} <= names


@pytest.mark.parametrize(
    "path", sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))
)
def test_shipped_sweep_files_are_valid(path, tmp_path):
    from sweeplab.api import weights_from
    from sweeplab.config import ConfigError, read_yaml
    from sweeplab.sweep.probes import settle
    from sweeplab.sweep.spec import load_sweep

    sweep = load_sweep(path)
    experiment = read_yaml(path.parent / read_yaml(path)["experiment"])
    assert sweep.config_for({}).name == experiment["name"]
    weights_from(f"sqlite:///{tmp_path / 'empty.db'}")
    source = (experiment.get("model") or {}).get("init_from")
    if source:  # it starts from a model another sweep registers (tests/test_finetune.py runs both): not here yet
        with pytest.raises(ConfigError, match=f"model.init_from: {source['uri']}.*no such registered model"):
            settle(sweep)
        return
    settle(sweep)  # its engine, its data and, for a user's model, the model on one batch


def test_seed_exercises_grid_runs_every_configuration_once(store):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    assert main(["sweep", str(root / "sweeps/seed_exercises.yaml"), "epochs=3", "--quiet"]) == 0
    study = study_of(store, "seed_exercises")
    configs = {
        (t.params["optimizer"], t.params[f"lr_{t.params['optimizer']}"], t.params["hidden"], t.params["noise"])
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }
    expected = {(o, lr, h, n) for o, lr in (("Adam", 0.03), ("SGD", 0.05)) for h in (4, 16, 32) for n in (0.3, 1.0)}
    assert configs == expected and len(study.trials) == 12


def test_repeats_run_every_grid_configuration_with_each_seed(store):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(
        store / "r.yaml", root, "rep", "hidden: {choices: [4, 16]}\n", 10, sampler="grid", extra="repeats: 3\n"
    )
    assert main(["sweep", str(sweep), "epochs=3", "--quiet", "--no-report"]) == 0
    study = study_of(store, "rep")
    pairs = sorted((t.params["hidden"], t.params["seed"]) for t in study.trials)
    assert pairs == [(h, s) for h in (4, 16) for s in (42, 43, 44)]  # budget capped at 2 x 3 grid points
    bad = write_sweep(store / "b.yaml", root, "rep2", "hidden: {choices: [4]}\n", 2, extra="repeats: 2\n")
    assert main(["sweep", str(bad)]) == 2


def test_an_unreachable_tracking_server_is_one_line_and_writes_nothing(store, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the line, not MLflow's 15 s of retries, is tested
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "nowhere", "hidden: {choices: [4]}\n", 1)
    assert main(["sweep", str(sweep), "--tracking-uri", "http://127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tracking-uri http://127.0.0.1:9: cannot reach the MLflow" in err
    assert not (store / "optuna.journal").exists()


def test_a_resumed_random_sweep_proposes_new_points(store):
    """Found while testing #11: a resumed study's sampler was seeded as the first run's, so it proposed the very
    points the first run had tried (trial 2 was trial 0 again)."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "again", "lr: {low: 0.001, high: 0.1, log: true}\n", 2)
    assert main(["sweep", str(sweep), "epochs=2", "--quiet", "--no-report"]) == 0
    assert main(["sweep", str(sweep), "n_trials=4", "epochs=2", "--quiet", "--no-report"]) == 0
    lrs = [trial.params["lr"] for trial in study_of(store, "again").trials]
    assert len(lrs) == 4 and len(set(lrs)) == 4


def test_conditions_run_side_by_side_each_searching_as_it_would_alone(store, monkeypatch):
    """With one worker, a sweep's conditions run at once in their own processes (one core each). Each condition is
    its own study, so its search must be exactly the one it gets run alone, one condition after the other: the
    same trials, parameters and values, run by run; and two processes must have done the work."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    space = SPACE.replace("noise: {choices: [0.3, 1.0]}\n", "")
    results = {}
    for at_once in (1, 2):
        folder = store / f"at_once_{at_once}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        monkeypatch.setenv("SWEEPLAB_CONDITIONS_AT_ONCE", str(at_once))
        sweep = write_sweep(
            folder / "s.yaml", root, "sides", space, 8, sampler="tpe", extra="conditions: {noise: [0.3, 1.0]}\n"
        )
        assert main(["sweep", str(sweep), "epochs=5", "--quiet", "--no-report"]) == 0
        runs = runs_of(MlflowClient(f"sqlite:///{folder}/mlflow.db"), "sides")
        assert all(r.info.status == "FINISHED" for r in runs)
        trials = {
            (r.data.params["data.noise"], int(r.data.tags["sweeplab.trial_number"])): (
                r.data.params["train.optimizer"],
                r.data.params["train.lr"],
                r.data.params["model.hidden"],
                r.data.metrics["best_val_loss"],
            )
            for r in runs
            if r.data.tags.get("sweeplab.role") == "trial"
        }
        workers = {
            noise: {
                r.data.tags["sweeplab.worker"]
                for r in runs
                if r.data.tags.get("sweeplab.role") == "trial" and r.data.params["data.noise"] == noise
            }
            for noise in ("0.3", "1.0")
        }
        results[at_once] = trials, workers
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        assert int(client.get_model_version_by_alias("sides", "champion").version) == 1  # noise 0.3, the base's own
        assert int(client.get_model_version_by_alias("sides", "champion-noise-1_0").version) == 2
    (alone, alone_workers), (side, side_workers) = results[1], results[2]
    assert len(alone) == 8 and sorted(alone) == sorted(side)
    assert side == alone  # every trial: the same optimizer, lr, hidden and best_val_loss
    assert all(len(process) == 1 for process in [*alone_workers.values(), *side_workers.values()])
    assert alone_workers["0.3"] == alone_workers["1.0"]  # one after the other, in one process
    assert side_workers["0.3"] != side_workers["1.0"]  # at once, in two


@pytest.mark.slow
def test_a_worker_killed_between_its_finished_run_and_the_tell_is_told_from_the_run(store):
    """SIGKILL in the window between a trial's run being FINISHED and Optuna being told: the next sweep tells the
    trial what its run recorded instead of failing it and training it again, so every finished trial has exactly
    one finished run, and the told value is the seed loop's best validation loss for those parameters."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "window", SPACE, 3)
    dies_before_telling = (
        "import os, signal, sys\nfrom sweeplab.sweep import ledger\nfrom sweeplab.cli import main\n"
        "ledger.Ledger.finish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", dies_before_telling, "sweep", str(sweep), f"epochs={EPOCHS}", "--quiet", "--no-report"],
        cwd=store,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9
    study = study_of(store, "window")
    (first,) = study.trials
    assert first.state == optuna.trial.TrialState.RUNNING  # never told
    assert main(["sweep", str(sweep), f"epochs={EPOCHS}", "--quiet", "--no-report"]) == 0
    study = study_of(store, "window")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3  # no FAIL, no retry
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    trial_runs = [r for r in runs_of(client, "window") if r.data.tags.get("sweeplab.role") == "trial"]
    assert sorted((r.data.tags["sweeplab.trial_number"], r.info.status) for r in trial_runs) == [
        ("0", "FINISHED"),
        ("1", "FINISHED"),
        ("2", "FINISHED"),
    ]
    told = study.trials[0]
    optimizer = told.params["optimizer"]
    expected = seed_run(
        optimizer=optimizer,
        lr=told.params[f"lr_{optimizer}"],
        hidden=told.params["hidden"],
        noise=told.params["noise"],
        epochs=EPOCHS,
    )
    assert (
        told.value
        == min(expected["val_loss"])
        == client.get_run(told.user_attrs["mlflow_run_id"]).data.metrics["best_val_loss"]
    )
    assert told.user_attrs["best_epoch"] == expected["val_loss"].index(min(expected["val_loss"])) + 1


@pytest.mark.parametrize("engine, pruner", [("reference", "median"), ("vectorized", "none")])
def test_optunas_own_tools_see_each_trials_curve_and_the_objectives_name(store, engine, pruner):
    """#19.4: optuna-dashboard and optuna.visualization showed "Objective 0" and no intermediate values."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(
        store / "s.yaml", root, "curves", "hidden: {choices: [4, 16]}\n", 3, pruner=pruner, engine=engine
    )
    assert main(["sweep", str(sweep), "epochs=6", "--quiet", "--no-report"]) == 0
    study = study_of(store, "curves")
    assert study.metric_names == ["best_val_loss"]
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        curve = {m.step: m.value for m in client.get_metric_history(run_id, "val_loss")}
        assert len(curve) == 6 and trial.intermediate_values == pytest.approx(curve, rel=1e-12)
    from optuna.visualization.matplotlib import plot_intermediate_values

    axes = plot_intermediate_values(study)
    assert len(axes.get_lines()) == 3 and all(len(line.get_xdata()) == 6 for line in axes.get_lines())


@pytest.mark.slow
def test_two_sweeps_at_once_on_one_study_each_count_their_own_trials(store):
    """#19.7: both printed "16 run now" for the study's total."""
    import re

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    sweep = write_sweep(store / "s.yaml", root, "both", SPACE, 6)
    command = [sys.executable, "-m", "sweeplab", "sweep", str(sweep), "epochs=20", "--quiet", "--no-report"]
    sweeps = [
        subprocess.Popen(command, cwd=store, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [process.communicate(timeout=300) for process in sweeps]
    assert all(process.returncode == 0 for process in sweeps), outs
    counts = [int(re.search(r"\((\d+) run now\)", out).group(1)) for out, _ in outs]
    assert sum(counts) == 6


def test_a_second_store_in_the_folder_does_not_resume_the_first_ones_study(tmp_path, monkeypatch, capsys):
    """Two MLflow stores in one folder share its default journal (optuna.journal): a sweep into the second store
    resumed the first one's study, then failed with MLflow's `Run with id=... not found`, exit 1. Now one line, exit
    2, before any trial runs."""
    monkeypatch.chdir(tmp_path)
    sweep = str(ROOT / "sweeps/optimizer_hidden_noise.yaml")
    first = ["sweep", sweep, "n_trials=2", "epochs=2", "--no-report", "--quiet"]
    assert main([*first, "--tracking-uri", f"sqlite:///{tmp_path}/a.db"]) == 0
    capsys.readouterr()
    assert (
        main(["sweep", sweep, "n_trials=4", "epochs=2", "--tracking-uri", f"sqlite:///{tmp_path}/b.db", "--quiet"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ran its trials against another MLflow store" in err and "b.db" in err
    assert MlflowClient(f"sqlite:///{tmp_path}/b.db").get_experiment_by_name("optimizer_hidden_noise") is None
