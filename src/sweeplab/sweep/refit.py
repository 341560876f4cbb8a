"""The refit of a `data.folds` sweep's champion, as scikit-learn's GridSearchCV refits its best estimator.

A fold trial keeps no weights (its folds' best epochs differ, and each saw only part of the training split). So the
winning configuration is trained once more on the whole training split, for the mean curve's best epoch and no
more, on the reference loop, keeping its last epoch's weights (nothing is chosen by the validation split, which the
search never saw: its curves in the refit run are a held-out score). The run is a child of the sweep's parent
tagged `sweeplab.role=refit` and `sweeplab.refit_of=<the trial's run id>`; it is what the champion serves. A
resumed sweep reuses a finished refit of the same trial.
"""

from __future__ import annotations

import dataclasses

from sweeplab.outcome import Outcome
from sweeplab.sweep.ledger import TrialSummary
from sweeplab.track.recorder import RunTracker
from sweeplab.track.tracker import TAG_REFIT_OF, TAG_ROLE, TAG_STUDY, TAG_TRIAL, Tracker
from sweeplab.train.crossval import refit_config
from sweeplab.train.experiment import run_experiment


def refit(tracker: Tracker, trial, best: TrialSummary, experiment_id: str, parent_run_id: str | None, study: str):
    """`best` with its run the refit's (trained now, or found finished from an earlier run of this sweep); `trial`
    is the winner's configuration (its folds included)."""
    found = tracker.client.search_runs(
        [experiment_id],
        f"tags.`{TAG_REFIT_OF}` = '{best.run_id}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if found:
        return dataclasses.replace(best, run_id=found[0].info.run_id)
    config = refit_config(trial, best.best_epoch or 1)
    tags = {
        TAG_ROLE: "refit",
        TAG_REFIT_OF: best.run_id,
        TAG_STUDY: study,
        TAG_TRIAL: str(best.number),
        "sweeplab.engine": "reference",
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
    }
    run = RunTracker(tracker.tracking_uri, config, f"refit of trial #{best.number}", experiment_id, tags)
    try:
        result = run_experiment(config, keep_last=True)
        run.record(result)
    except BaseException as exc:
        run.fail(exc)
        raise
    if run.run is None or Outcome.of_history(result.history) != Outcome.COMPLETED:
        raise RuntimeError(f"the refit of trial #{best.number} did not complete ({result.history.stop_reason})")
    return dataclasses.replace(best, run_id=run.run_id)
