"""recorder.py: a trained trial becomes its MLflow run, then its trial is told, on real stores (SQLite, a journal):
the curves as the loop computed them, the summary by the best-epoch rule, the checkpoint, the outcome."""

import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sweeplab.config import load_experiment
from sweeplab.sweep.ledger import Ledger
from sweeplab.sweep.search import open_storage
from sweeplab.track.recorder import Recorder, RunTracker
from sweeplab.track.tracker import TAG_OUTCOME, TAG_STATE, Tracker
from sweeplab.train.experiment import run_experiment

LAB = Path(__file__).resolve().parents[1] / "experiments" / "training_loop_lab.yaml"


@pytest.fixture
def stores(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/runs.db")
    storage = open_storage(str(tmp_path / "optuna.journal"))
    study = optuna.create_study(storage=storage, study_name="s")
    ledger = Ledger(study, storage, 4, {})
    recorder = Recorder(tracker, tracker.experiment_id("s"), None, ledger, "s", ["hidden", "lr"], {"noise": 0.3})
    yield tracker, study, ledger, recorder
    ledger.close()


def history_of(tracker, run_id, key):
    return [m.value for m in sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_trained_trial_is_its_run_then_its_told_trial(stores):
    tracker, study, ledger, recorder = stores
    result = run_experiment(load_experiment(LAB, {"epochs": 6, "hidden": 8}))
    lease = ledger.lease()
    outcome = recorder.record(lease, result, time.time())
    assert outcome == "completed"
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    run = tracker.client.get_run(run_id)
    val = history_of(tracker, run_id, "val_loss")
    assert val == pytest.approx(result.history.val_loss, rel=1e-12) and len(val) == 6
    best_epoch = min(range(6), key=lambda i: val[i]) + 1  # the seed's rule, applied to what was logged
    assert run.data.metrics["best_epoch"] == best_epoch and run.data.metrics["best_val_loss"] == min(val)
    assert run.data.tags[TAG_OUTCOME] == "completed" and run.data.tags[TAG_STATE] == "COMPLETE"
    assert run.data.tags["sweeplab.condition"] == "noise=0.3" and run.info.run_name.endswith(" #0")
    assert run.data.params["model.hidden"] == "8" and run.data.params["train.epochs"] == "6"
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE and trial.value == min(val)
    assert [trial.intermediate_values[e] for e in range(1, 7)] == pytest.approx(val)
    saved = tracker.client.download_artifacts(run_id, "checkpoint/best.pt")
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert all(torch.equal(state[name], result.history.best_state[name]) for name in state)


def test_a_diverged_trial_keeps_its_curve_up_to_where_it_diverged_and_no_best(stores):
    tracker, study, ledger, recorder = stores
    result = run_experiment(load_experiment(LAB, {"epochs": 6, "optimizer": "SGD", "lr": 1.0e4}))
    assert result.history.status == "diverged"
    recorder.record(ledger.lease(), result, time.time())
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    run = tracker.client.get_run(run_id)
    assert "best_val_loss" not in run.data.metrics and run.data.tags[TAG_OUTCOME] == "diverged"
    finite = [v for v in result.history.val_loss if v == v and abs(v) != float("inf")]
    assert history_of(tracker, run_id, "val_loss") == pytest.approx(finite)
    assert study.trials[0].state == TrialState.PRUNED and study.trials[0].user_attrs["outcome"] == "diverged"


def test_a_trial_that_fails_while_training_ends_its_run_and_fails_its_trial(stores):
    tracker, study, ledger, recorder = stores
    lease = ledger.lease()
    run = recorder.begin(lease, load_experiment(LAB, {"epochs": 2}))
    recorder.fail(run, lease, "RuntimeError: out of memory")
    mlflow_run = tracker.client.get_run(run.run_id)
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags[TAG_STATE] == "FAIL"
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs["fail_reason"] == "RuntimeError: out of memory"


def test_a_tracked_run_is_created_only_once_an_epoch_has_trained(tmp_path):
    uri = f"sqlite:///{tmp_path}/runs.db"
    config = load_experiment(LAB, {"epochs": 2})
    tracker = RunTracker(uri, config, str(LAB))
    assert tracker.run_id is None  # nothing in MLflow yet: input rejected before training leaves no run
    result = run_experiment(config, callbacks=[tracker.epoch_callback])
    tracker.finish(result)
    run = Tracker(uri).client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["sweeplab.role"] == "run"
    assert history_of(Tracker(uri), tracker.run_id, "train_loss") == pytest.approx(result.history.train_loss)
