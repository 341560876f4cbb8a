"""ledger.py: one worker's dealings with its Optuna study, on a real journal storage: leasing, telling how a
trial ended (with its curve), giving back a surplus ask, recovering a dead worker's trial, reading the study."""

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from sweeplab.outcome import Outcome, RunEnd
from sweeplab.stores import this_host, worker_id
from sweeplab.sweep.ledger import (
    FAIL_REASON_ATTR,
    OUTCOME_ATTR,
    RUN_ID_ATTR,
    SURPLUS_ATTR,
    WORKER_ATTR,
    Ledger,
    Stock,
    best_trials,
    finished_count,
    outcome_counts,
)
from sweeplab.sweep.search import open_storage
from sweeplab.sweep.spec import ParamSpec
from sweeplab.track.tracker import Tracker

SPACE = {"hidden": ParamSpec(choices=[4, 16]), "lr": ParamSpec(low=1e-3, high=1e-1, log=True)}


@pytest.fixture
def study(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    study = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    return study, storage


def test_a_lease_is_a_claimed_trial_with_the_space_s_values(study):
    study, storage = study
    ledger = Ledger(study, storage, 3, SPACE)
    lease = ledger.lease()
    assert lease.number == 0 and set(lease.params) == {"hidden", "lr"}
    assert lease.params["hidden"] in (4, 16) and 1e-3 <= lease.params["lr"] <= 1e-1
    trial = study.trials[0]
    assert trial.state == TrialState.RUNNING and trial.user_attrs[WORKER_ATTR] == worker_id()
    assert ledger.take_stock() == Stock(0, 1, 0)  # finished, running, queued
    ledger.close()


def test_finishing_tells_the_value_the_curve_and_the_best_epoch(study):
    study, storage = study
    ledger = Ledger(study, storage, 3, SPACE)
    done, diverged = ledger.lease(), ledger.lease()
    ledger.finish(done, RunEnd(Outcome.COMPLETED, 0.25, 2, None, (0.5, 0.25, 0.3)))
    ledger.finish(diverged, RunEnd(Outcome.DIVERGED, float("nan"), 1, "val_loss is nan at epoch 2", (0.9,)))
    first, second = study.trials
    assert first.state == TrialState.COMPLETE and first.value == 0.25
    assert first.intermediate_values == {1: 0.5, 2: 0.25, 3: 0.3} and first.user_attrs["best_epoch"] == 2
    # diverged: PRUNED to Optuna (ended early by design, counted in the budget), told apart by its outcome
    assert second.state == TrialState.PRUNED and second.user_attrs[OUTCOME_ATTR] == "diverged"
    assert outcome_counts(study) == {"completed": 1, "diverged": 1} and finished_count(study) == 2
    ledger.close()


def test_a_failed_trial_keeps_its_reason(study):
    study, storage = study
    ledger = Ledger(study, storage, 3, SPACE)
    ledger.fail(ledger.lease(), "RuntimeError: CUDA out of memory")
    assert study.trials[0].state == TrialState.FAIL
    assert ledger.last_failure == "RuntimeError: CUDA out of memory"
    assert finished_count(study) == 0  # a failed trial does not use up the budget
    ledger.close()


def test_an_ask_for_a_place_another_worker_took_is_given_back_unrun(study):
    study, storage = study
    mine, theirs = Ledger(study, storage, 1, SPACE), Ledger(study, storage, 1, SPACE)
    assert mine.lease() is not None
    assert theirs.lease() is None  # the budget of one is held by trial 0
    surplus = study.trials[1]
    assert surplus.state == TrialState.FAIL and surplus.user_attrs[SURPLUS_ATTR] is True
    assert outcome_counts(study) == {"running": 1}  # a surplus ask is not a trial anyone ran
    mine.close(), theirs.close()


def test_a_dead_worker_s_trial_is_failed_queued_again_and_its_run_ended(tmp_path, study):
    study, storage = study
    tracker = Tracker(f"sqlite:///{tmp_path}/runs.db")
    run_id = tracker.start_run(tracker.experiment_id("s"), "trial 0")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    trial = study.ask()  # as a worker that has since died left it: claimed, linked to its run, RUNNING
    trial.set_user_attr(WORKER_ATTR, f"{this_host()}:{child.pid}")
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    ledger = Ledger(study, storage, 3, SPACE, runs=tracker)
    assert ledger.take_stock() == Stock(0, 0, 1)  # recovered: failed, and one trial queued to run again
    lost = study.trials[0]
    assert lost.state == TrialState.FAIL and "died during the trial" in lost.user_attrs[FAIL_REASON_ATTR]
    assert study.trials[1].state == TrialState.WAITING and study.trials[1].user_attrs["retry_of"] == 0
    assert tracker.client.get_run(run_id).info.status == "KILLED"
    ledger.close()


def test_a_dead_worker_s_trial_whose_run_finished_is_told_from_its_run(tmp_path, study):
    """Killed between finishing its run and telling Optuna: the run has the result, so the trial is told it, not
    trained again."""
    study, storage = study
    tracker = Tracker(f"sqlite:///{tmp_path}/runs.db")
    run_id = tracker.start_run(tracker.experiment_id("s"), "trial 0")
    tracker.client.log_metric(run_id, "best_val_loss", 0.125)
    tracker.client.log_metric(run_id, "best_epoch", 4)
    tracker.client.set_tag(run_id, "sweeplab.trial_state", "COMPLETE")
    tracker.end_run(run_id, Outcome.COMPLETED)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, f"{this_host()}:{child.pid}")
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    ledger = Ledger(study, storage, 3, SPACE, runs=tracker)
    assert ledger.take_stock() == Stock(1, 0, 0)
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].value == 0.125
    ledger.close()


def test_best_trials_follow_the_study_s_direction(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    for direction, expected in (("minimize", [1, 2, 0]), ("maximize", [0, 2, 1])):
        study = optuna.create_study(storage=storage, study_name=direction, direction=direction)
        for value in (0.9, 0.1, 0.5):
            study.add_trial(optuna.trial.create_trial(value=value))
        assert [t.number for t in best_trials(study, 3)] == expected
        assert len(best_trials(study, 1)) == 1
