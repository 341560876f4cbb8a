"""One suite, both engines: the same cases run through the reference loop and the vectorized engine, as a user runs
them (`sweeplab sweep` against a fresh SQLite MLflow store and Optuna journal). What each leaves in MLflow and
Optuna is checked against values worked out apart from sweeplab: minima of the logged curves, a plain-torch
forward of the logged checkpoint, the seed's own loop (tests/reference.py), and counts by hand.

Cases: completion, pruning, divergence, resume, an interrupt (Ctrl-C's SIGINT on the reference engine, SIGTERM on the
vectorized one: one handler sets the one stop flag for both), a killed worker (SIGKILL)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweeplab.cli import main

from reference import seed_run

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "experiments" / "training_loop_lab.yaml"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

pytestmark = pytest.mark.parametrize("engine", ["reference", "vectorized"])


def sweep_file(folder: Path, study: str, space: str, n_trials: int, extra: str = "") -> Path:
    path = folder / f"{study}.yaml"
    path.write_text(
        f"study: {study}\nexperiment: {LAB}\nspace:\n{space}sampler: {{type: random, seed: 3}}\n"
        f"n_trials: {n_trials}\nbatch_trials: 4\n{extra}"
    )
    return path


def sweep_here(folder: Path, study: str, space: str, n_trials: int, engine: str, *args: str, extra: str = ""):
    path = sweep_file(folder, study, space, n_trials, extra)
    assert main(["sweep", str(path), f"engine={engine}", *args, "--quiet", "--no-report"]) == 0
    return study_in(folder, study), MlflowClient(f"sqlite:///{folder}/mlflow.db")


def study_in(folder: Path, study: str) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    return optuna.load_study(study_name=study, storage=storage)


def curve(client: MlflowClient, run_id: str, key: str = "val_loss") -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def checkpoint_val_loss(client: MlflowClient, run_id: str, folder: Path, noise: float) -> float:
    """The logged best state's validation loss, in plain torch on the seed's data and split (one batch of 48)."""
    state = torch.load(client.download_artifacts(run_id, "checkpoint/best.pt", str(folder)), weights_only=True)[
        "state_dict"
    ]
    torch.manual_seed(42)
    x = torch.randn(240, 2)
    y = 3 * x[:, [0]] + 2 * x[:, [1]] + 5 + torch.randn(240, 1) * noise
    split = torch.utils.data.random_split(range(240), [192, 48], generator=torch.Generator().manual_seed(42))
    val = list(split[1].indices)
    hidden = torch.relu(x[val] @ state["net.0.weight"].T + state["net.0.bias"])
    return float(((hidden @ state["net.2.weight"].T + state["net.2.bias"] - y[val]) ** 2).mean())


LEARNING = (
    "  optimizer: {choices: [Adam, SGD]}\n  lr: {low: 0.005, high: 0.05, log: true}\n  hidden: {choices: [8, 16]}\n"
)


def test_completion(engine, store):
    """Every trial COMPLETE with one FINISHED run: its curves, its best epoch and a checkpoint that scores it; and
    the values the seed's own loop gets for the same settings."""
    study, client = sweep_here(store, "done", LEARNING, 6, engine, "epochs=8")
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and tags["sweeplab.outcome"] == "completed"
        assert tags["sweeplab.trial_number"] == str(trial.number) and tags["sweeplab.engine"] == engine
        val = curve(client, run.info.run_id)
        assert len(val) == 8 == len(curve(client, run.info.run_id, "train_loss"))
        assert metrics["best_val_loss"] == min(val) == trial.value
        assert metrics["best_epoch"] == val.index(min(val)) + 1 == trial.user_attrs["best_epoch"]
        assert checkpoint_val_loss(client, run.info.run_id, store, 0.3) == pytest.approx(trial.value, rel=1e-5)
        seed = seed_run(trial.params["optimizer"], trial.params["lr"], trial.params["hidden"], epochs=8)
        assert trial.value == pytest.approx(seed["best_val"], rel=1e-4)
        assert trial.user_attrs["best_epoch"] == seed["best_epoch"]


@pytest.mark.slow
def test_pruning(engine, store):
    """lr from 1e-5 (val_loss stays ~35 for 12 epochs) to 0.05 (below 1): the median pruner stops the slow ones.
    (Issue #10: the pipelined vectorized engine told Optuna nothing before its last batch, so it pruned nothing.)
    A pruned trial is PRUNED in Optuna with fewer reports than epochs, and its run KILLED with the reason and a
    checkpoint that scores its logged best_val_loss."""
    study, client = sweep_here(
        store,
        "prune",
        "  lr: {low: 1.0e-5, high: 0.05, log: true}\n",
        16,
        engine,
        "epochs=12",
        extra="pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 3}\n",
    )
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(study.trials) == 16 and len(pruned) >= 3
    for trial in pruned:
        assert len(trial.intermediate_values) < 12 and trial.user_attrs["outcome"] == "pruned"
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["sweeplab.outcome"] == "pruned"
        assert run.data.tags["sweeplab.reason"].startswith("pruned at epoch")
        assert len(curve(client, run.info.run_id)) == run.data.metrics["epochs_run"] < 12
        assert checkpoint_val_loss(client, run.info.run_id, store, 0.3) == pytest.approx(
            run.data.metrics["best_val_loss"], rel=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_successive_halving_prunes_what_optunas_own_pruner_decides_for_the_same_values(engine, store, pruner):
    """#40: `pruner: successive_halving` at rungs 3, 9 and 27 epochs (min_resource 3, reduction factor 3), reported
    at its rungs only; `hyperband`, whose brackets are successive halvings starting at 3, 9 and 27, the same.
    Stacked, its members are pruned inside their group (4 a batch) and leave the stack. The decisions are replayed
    on a fresh in-memory study of the same name (hyperband's brackets follow the name and the trial's number) with
    Optuna's own pruner, fed the trials' reported values in the order the engine asked (the reference loop: trial
    after trial; stacked: batch after batch, each epoch's members in trial order): the same trials pruned at the
    same rungs."""
    study, client = sweep_here(
        store,
        "halving",
        "  lr: {low: 1.0e-4, high: 0.1, log: true}\n",
        12,
        engine,
        "epochs=27",
        extra=f"pruner: {{type: {pruner}, min_resource: 3, reduction_factor: 3}}\n",
    )
    trials = sorted(study.trials, key=lambda t: t.number)
    # a trial's whole curve is written at its end (optuna-dashboard's plots): the pruner was asked at the rungs
    rungs = {t.number: {s: v for s, v in t.intermediate_values.items() if s in (3, 9, 27)} for t in trials}
    pruned_at = {t.number: max(t.intermediate_values) for t in trials if t.state == TrialState.PRUNED}
    assert len(set(pruned_at.values()) & {3, 9, 27}) >= 2, pruned_at  # pruned at two rungs at least
    order = (lambda n, step: (n, step)) if engine == "reference" else (lambda n, step: (n // 4, step, n))
    own = (
        optuna.pruners.SuccessiveHalvingPruner(min_resource=3, reduction_factor=3)
        if pruner == "successive_halving"
        else optuna.pruners.HyperbandPruner(min_resource=3, max_resource=27, reduction_factor=3)
    )
    replay = optuna.create_study(study_name=study.study_name, pruner=own)
    asked = {t.number: replay.ask() for t in trials}
    events = sorted((order(n, step), n, step, v) for n, values in rungs.items() for step, v in values.items())
    decided: dict[int, int] = {}
    for _, number, step, value in events:
        if number not in decided:
            asked[number].report(value, step)
            if asked[number].should_prune():
                decided[number] = step
    assert decided == pruned_at
    runs = {
        int(r.data.tags["sweeplab.trial_number"]): r
        for r in client.search_runs([study_experiment(client)])
        if r.data.tags.get("sweeplab.role") == "trial"
    }
    for number, epoch in pruned_at.items():  # trained to its rung, then stopped: its curve ends there
        assert runs[number].data.metrics["epochs_run"] == epoch and runs[number].info.status == "KILLED"
    if engine == "vectorized":
        assert {r.data.tags.get("sweeplab.stacked_members") for r in runs.values()} == {"4"}


def study_experiment(client: MlflowClient) -> str:
    return client.get_experiment_by_name("halving").experiment_id


def test_divergence(engine, store):
    """SGD at lr 50 overflows within a few epochs: each trial ends "diverged" (PRUNED to Optuna, so it counts in
    the budget and is not retried), its run FAILED with the finite part of its curve and no best_*."""
    study, client = sweep_here(
        store, "blowup", "  optimizer: {choices: [SGD]}\n  lr: {low: 50, high: 60}\n", 4, engine, "epochs=30"
    )
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 4
    for trial in study.trials:
        assert trial.user_attrs["outcome"] == "diverged"
        # issue #27.8: no best_epoch in Optuna either, and no curve of millions to flatten the dashboard's plots
        assert "best_epoch" not in trial.user_attrs and trial.intermediate_values == {}
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["sweeplab.outcome"] == "diverged"
        assert run.data.tags["sweeplab.reason"].startswith("diverged at epoch")
        assert "best_val_loss" not in run.data.metrics
        assert all(map(torch.isfinite, torch.tensor(curve(client, run.info.run_id))))
        assert run.data.metrics["epochs_run"] < 30


@pytest.mark.slow
def test_resume(engine, store):
    """The same sweep again with a larger budget adds trials up to it: nothing redone, no setting drawn twice."""
    sweep_here(store, "more", LEARNING, 4, engine, "epochs=4")
    study, client = sweep_here(store, "more", LEARNING, 4, engine, "epochs=4", "n_trials=9")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 9
    assert len({(t.params["optimizer"], t.params["lr"], t.params["hidden"]) for t in study.trials}) == 9
    runs = [
        r
        for r in client.search_runs([client.get_experiment_by_name("more").experiment_id])
        if r.data.tags.get("sweeplab.role") == "trial"
    ]
    assert sorted(int(r.data.tags["sweeplab.trial_number"]) for r in runs) == list(range(9))


def background_sweep(folder: Path, engine: str, *args: str) -> subprocess.Popen:
    path = sweep_file(folder, "stopped", LEARNING, 8)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "sweep",
            str(path),
            f"engine={engine}",
            "batch_trials=2",
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


def wait_until_training(folder: Path, proc: subprocess.Popen) -> None:
    """Two trials finished and another one running: the sweep is in the middle of a batch."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            study = study_in(folder, "stopped")
        except (KeyError, FileNotFoundError, ValueError):
            study = None
        if study and len(study.get_trials(states=FINISHED)) >= 2 and study.get_trials(states=(TrialState.RUNNING,)):
            return
        time.sleep(0.1)
    raise AssertionError("the sweep never got to a second batch")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_stop_or_a_kill_loses_nothing_and_the_rerun_ends_at_the_budget(engine, how, tmp_path):
    """Stopped (Ctrl-C, SIGTERM) the sweep exits 130 within seconds and leaves nothing RUNNING: the trials in
    flight FAIL, their runs (where they exist) KILLED. Killed outright, the next sweep finds the dead process's
    trials and runs and ends them. Either way the rerun ends with exactly the budget, each finished trial with
    its one FINISHED run of full length."""
    if (engine, how) in (("reference", signal.SIGTERM), ("vectorized", signal.SIGINT)):
        pytest.skip("SIGINT and SIGTERM set the one stop flag (stop.py): each engine is stopped by one of them")
    proc = background_sweep(tmp_path, engine, "epochs=400")
    wait_until_training(tmp_path, proc)
    stopped_at = time.monotonic()
    proc.send_signal(how)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - stopped_at < 15
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    if how == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("sweeplab: interrupted"), err
        runs = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
        assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
        assert not study_in(tmp_path, "stopped").get_trials(states=(TrialState.RUNNING,))
    rerun = background_sweep(tmp_path, engine, "epochs=400")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    study = study_in(tmp_path, "stopped")
    finished = study.get_trials(states=FINISHED)
    assert len(finished) == 8 and not study.get_trials(states=(TrialState.RUNNING,))
    runs = client.search_runs([client.get_experiment_by_name("stopped").experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    done = sorted(
        r.data.tags["sweeplab.trial_number"]
        for r in runs
        if r.data.tags.get("sweeplab.role") == "trial" and r.info.status == "FINISHED"
    )
    assert done == sorted(str(t.number) for t in finished)
    for trial in finished:
        assert len(curve(client, trial.user_attrs["mlflow_run_id"])) == 400
