"""tracking.py: the MLflow store as sweeplab uses it (real SQLite stores): experiments, runs and how they end,
the shared view the printed UI link opens, run names, and no Optuna."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweeplab.config import load_experiment
from sweeplab.outcome import Outcome, RunEnd
from sweeplab.stores import this_host
from sweeplab.track.tracker import (
    TAG_NOTE,
    TAG_OUTCOME,
    TAG_REASON,
    TAG_STATE,
    TAG_WORKER,
    VIEW_KEY,
    Tracker,
    run_name_for,
)

LAB = Path(__file__).resolve().parents[1] / "experiments" / "training_loop_lab.yaml"


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path}/store dir/runs.db")


def test_a_new_store_is_made_whole_with_its_artifacts_beside_it(tmp_path, tracker):
    assert (tmp_path / "store dir" / "runs.db").is_file()
    first = tracker.experiment_id("items")
    assert tracker.experiment_id("items") == first  # get, not create again
    location = tracker.client.get_experiment(first).artifact_location
    assert location == (tmp_path / "store dir" / "mlartifacts" / "items").as_uri()
    tracker.client.delete_experiment(first)
    assert tracker.experiment_id("items") == first  # a deleted experiment of that name is restored, not shadowed
    assert tracker.client.get_experiment(first).lifecycle_stage == "active"


def test_a_store_that_is_not_mlflow_is_one_line(tmp_path):
    from sweeplab.config import ConfigError

    (tmp_path / "notes.db").write_text("not a database")
    with pytest.raises(ConfigError, match=r"not a usable MLflow database"):
        Tracker(f"sqlite:///{tmp_path}/notes.db")


def test_artifacts_land_where_mlflow_lists_them_for_a_run_started_here_or_elsewhere(tracker, tmp_path):
    """Tracker.log_artifacts writes straight to the repository of a run it started (its create_run said where)
    and through MlflowClient for any other run: MLflow's own client lists and downloads the same files."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    experiment = tracker.experiment_id("e")
    mine = tracker.start_run(experiment, "here")
    theirs = MlflowClient(tracker.tracking_uri).create_run(experiment).info.run_id
    for run_id in (mine, theirs):
        tracker.log_artifacts(run_id, folder, "checkpoint")
        listed = [f.path for f in tracker.client.list_artifacts(run_id, "checkpoint")]
        assert listed == ["checkpoint/best.pt", "checkpoint/config.json"]
        got = Path(tracker.client.download_artifacts(run_id, "checkpoint/best.pt", str(tmp_path / run_id)))
        assert got.read_bytes() == b"weights"


@pytest.mark.parametrize(
    "outcome, status",
    [
        (Outcome.COMPLETED, "FINISHED"),
        (Outcome.PRUNED, "KILLED"),
        (Outcome.DIVERGED, "FAILED"),
        (Outcome.FAILED, "FAILED"),
        (Outcome.KILLED, "KILLED"),
    ],
)
def test_a_run_ends_with_the_status_and_tags_of_its_outcome(tracker, outcome, status):
    run_id = tracker.start_run(tracker.experiment_id("e"), "r", {"sweeplab.role": "trial"})
    tracker.end_run(run_id, outcome, "why" if outcome != Outcome.COMPLETED else None)
    run = tracker.client.get_run(run_id)
    assert run.info.status == status and run.data.tags[TAG_OUTCOME] == outcome.value
    assert run.data.tags.get(TAG_REASON) == ("why" if outcome != Outcome.COMPLETED else None)
    assert run.data.tags[TAG_WORKER].startswith(f"{this_host()}:")


def test_run_end_reads_how_a_finished_trial_ended_and_nothing_from_one_that_did_not(tracker):
    experiment = tracker.experiment_id("e")
    done = tracker.start_run(experiment, "done")
    client = tracker.client
    client.log_metric(done, "best_val_accuracy", 0.93)
    client.log_metric(done, "best_epoch", 7)
    client.set_tag(done, TAG_STATE, "COMPLETE")
    client.set_tag(done, "sweeplab.objective", "val_accuracy maximize")
    assert tracker.run_end(done) is None  # still RUNNING: it may yet fail
    tracker.end_run(done, Outcome.COMPLETED)
    assert tracker.run_end(done) == RunEnd(Outcome.COMPLETED, 0.93, 7, None)
    failed = tracker.start_run(experiment, "failed")
    tracker.end_run(failed, Outcome.FAILED, "boom")
    assert tracker.run_end(failed) is None  # no result to tell


def test_runs_left_running_by_a_dead_local_process_are_reaped(tracker):
    experiment = tracker.experiment_id("e")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tracker.client.create_run(experiment, tags={TAG_WORKER: f"{this_host()}:{child.pid}"}).info.run_id
    alive = tracker.start_run(experiment, "mine")  # this process: alive
    elsewhere = tracker.client.create_run(experiment, tags={TAG_WORKER: f"other-host:{child.pid}"}).info.run_id
    assert tracker.reap_dead_local_runs(experiment) == 1
    statuses = {run_id: tracker.client.get_run(run_id).info.status for run_id in (dead, alive, elsewhere)}
    assert statuses == {dead: "KILLED", alive: "RUNNING", elsewhere: "RUNNING"}
    assert "ended without closing the run" in tracker.client.get_run(dead).data.tags[TAG_REASON]


def test_a_lost_worker_s_trial_run_and_its_worker_run_are_ended_together(tracker):
    experiment = tracker.experiment_id("e")
    worker = tracker.start_run(experiment, "worker", {"sweeplab.role": "worker"})
    trial = tracker.start_run(experiment, "trial", parent_run_id=worker)
    tracker.end_if_running(trial, "heartbeat stale")
    assert tracker.client.get_run(trial).info.status == "KILLED"
    assert tracker.client.get_run(worker).data.tags[TAG_REASON] == "worker lost (heartbeat stale)"
    tracker.end_if_running(trial, "again")  # an ended run is left as it is
    assert tracker.client.get_run(trial).data.tags[TAG_REASON] == "heartbeat stale"


def test_the_experiment_description_and_the_view_its_link_opens(tracker):
    from sweeplab.config import ObjectiveConfig

    experiment = tracker.experiment_id("e")
    objective = ObjectiveConfig(metric="val_accuracy")
    tracker.describe_experiment(experiment, "what it compares", ["train.lr", "data.noise"], ["data.noise"], objective)
    tags = MlflowClient(tracker.tracking_uri).get_experiment(experiment).tags
    assert tags[TAG_NOTE] == "what it compares"
    view = json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert view["orderByKey"] == "metrics.`best_val_accuracy`" and view["orderByAsc"] is False  # best first
    assert view["groupBy"]["aggregateFunction"] == "max"  # each condition's group headed by its best accuracy
    assert view["selectedColumns"][:3] == [
        "metrics.`best_val_accuracy`",
        "metrics.`best_val_loss`",
        "metrics.`best_epoch`",
    ]
    assert "params.`train.lr`" in view["selectedColumns"]


RACE = """
import sys, time
from sweeplab.track.tracker import Tracker
tracker = Tracker(sys.argv[1])
ids = [tracker.experiment_id(f"e{i}") for i in range(40)]
start = float(sys.argv[2])
while time.time() < start:
    pass
for experiment in ids:
    tracker.describe_experiment(experiment, "note " + sys.argv[3], ["train.lr"])
"""


@pytest.mark.slow
def test_sweeps_describing_one_experiment_at_once_both_succeed(tracker, tmp_path):
    """CI stop 34: two sweeps started together on one experiment; the slower one's insert of the same experiment
    tag failed with SQLite's UNIQUE constraint and the sweep died. Four processes describe forty experiments in
    step (without the retry, most runs of this lose at least one race)."""
    import time

    for i in range(40):
        tracker.experiment_id(f"e{i}")  # made once, before the race
    start = str(time.time() + 6)
    workers = [
        subprocess.Popen([sys.executable, "-c", RACE, tracker.tracking_uri, start, str(n)], stderr=subprocess.PIPE)
        for n in range(4)
    ]
    errors = [worker.communicate(timeout=120)[1].decode() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), errors
    tags = tracker.client.get_experiment(tracker.experiment_id("e39")).tags
    assert tags[TAG_NOTE] in {f"note {n}" for n in range(4)}


def test_params_and_notes_through_the_tracker(tracker):
    run_id = tracker.start_run(tracker.experiment_id("e"), "parent")
    tracker.log_params(run_id, {"study": "s", "n_trials": "40"})
    tracker.set_note(run_id, "**best** is trial #3")
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"study": "s", "n_trials": "40"} and run.data.tags[TAG_NOTE] == "**best** is trial #3"


def test_a_run_is_named_by_what_the_sweep_varies():
    config = load_experiment(LAB, {"optimizer": "Adam", "lr": 0.0312, "hidden": 16, "noise": 0.3})
    assert run_name_for(config, 12) == "adam-h16-lr0.031-n0.3 #12"
    assert run_name_for(config, None, keys=("hidden",)) == "h16"


@pytest.mark.slow
def test_tracking_imports_no_optuna():
    code = "import sys, sweeplab.track.tracker, sweeplab.track.recorder; print('optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("objective, expected", [(None, "b"), ("val_accuracy maximize", "c")])
def test_the_best_trial_run_follows_the_study_s_objective(tracker, objective, expected):
    """predict STUDY loads the best completed trial: lowest best_val_loss, or by the objective its trials name."""
    experiment = tracker.experiment_id("s")
    assert tracker.find_experiment("s") == experiment and tracker.find_experiment("nope") is None
    assert tracker.best_trial_run(experiment) is None  # no completed trial yet
    values = {"a": (0.5, 0.80), "b": (0.2, 0.85), "c": (0.3, 0.90), "failed": (0.1, 0.99)}
    for name, (loss, accuracy) in values.items():
        run_id = tracker.start_run(experiment, name, {"sweeplab.objective": objective} if objective else {})
        tracker.client.log_metric(run_id, "best_val_loss", loss)
        tracker.client.log_metric(run_id, "best_val_accuracy", accuracy)
        tracker.end_run(run_id, Outcome.FAILED if name == "failed" else Outcome.COMPLETED)
    assert tracker.best_trial_run(experiment).info.run_name == expected


def test_a_model_version_sweeplab_did_not_register_is_one_line(tracker):
    with pytest.raises(LookupError, match=r"^models:/nobody@champion: no such registered model version$"):
        tracker.registered_run_id("models:/nobody@champion")
    run_id = tracker.start_run(tracker.experiment_id("e"), "r")
    tracker.client.create_registered_model("theirs")
    tracker.client.create_model_version("theirs", f"runs:/{run_id}/model", run_id=run_id)
    with pytest.raises(LookupError, match="not registered by sweeplab"):
        tracker.registered_run_id("models:/theirs/1")
