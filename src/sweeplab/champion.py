"""The sweep's best model as an MLflow model, registered under the study's name with the alias `champion`.

Built from what the best trial logged (its checkpoint artifact, loaded with weights_only=True), not from memory,
so it works the same for a sweep that ran in many processes. Saved in MLflow's pickle-free `pt2` format
(torch.export) with a signature and a multi-row input example, so
`mlflow.pyfunc.load_model("models:/STUDY@champion")` predicts any batch size without sweeplab installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from .tracking import CHECKPOINT_PATH, TAG_STUDY_TRIAL_ATTR, Tracker

ALIAS = "champion"
TAG_CHAMPION_RUN = "sweeplab.source_run_id"


def download_checkpoint(tracker: Tracker, run_id: str, dest: Path) -> Path:
    return Path(tracker.client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/best.pt", str(dest)))


def register_champion(tracker: Tracker, study: optuna.Study, name: str, parent_run_id: str) -> dict[str, Any]:
    """Log and register the best COMPLETE trial's model unless it already is the champion."""
    import mlflow
    import torch

    from .model import load_checkpoint

    best = study.best_trial
    run_id = best.user_attrs[TAG_STUDY_TRIAL_ATTR]
    current = _current_champion(tracker, name)
    if current is not None and current.tags.get(TAG_CHAMPION_RUN) == run_id:
        return {"name": name, "version": current.version, "trial": best.number, "run_id": run_id, "new": False,
                "best_val_loss": best.value}
    with tempfile.TemporaryDirectory(prefix="sweeplab-champion-") as tmp:
        model, spec = load_checkpoint(download_checkpoint(tracker, run_id, Path(tmp)))
    config = json.loads(_read_artifact(tracker, run_id, f"{CHECKPOINT_PATH}/config.json"))
    rows = config.get("predict_x") or []
    if len(rows) < 2:  # an example of one row would fix the batch dimension to 1
        rows = torch.randn(3, spec.in_features, generator=torch.Generator().manual_seed(0)).tolist()
    example = np.asarray(rows, dtype=np.float32)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                    f"numpy=={np.__version__}"]
    with _fluent_uri(tracker.tracking_uri), mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pytorch.log_model(model, name=ALIAS, input_example=example, pip_requirements=requirements,
                                        serialization_format="pt2")
    client = tracker.client
    if _registered_model(tracker, name) is None:
        try:
            client.create_registered_model(name, description=f"Best model of the sweeplab study {name!r}")
        except Exception:  # another process registered it first
            pass
    version = client.create_model_version(name, info.model_uri, run_id=parent_run_id, model_id=info.model_id, tags={
        TAG_CHAMPION_RUN: run_id, "sweeplab.trial_number": str(best.number), "best_val_loss": repr(best.value)})
    client.set_registered_model_alias(name, ALIAS, version.version)
    tracker.client.set_model_version_tag(name, version.version, "sweeplab.model_spec", json.dumps(spec.to_dict()))
    return {"name": name, "version": version.version, "trial": best.number, "run_id": run_id, "new": True,
            "best_val_loss": best.value}


@contextlib.contextmanager
def _fluent_uri(uri: str):
    """log_model only exists in MLflow's fluent API, whose tracking URI is process-global (and copied into
    $MLFLOW_TRACKING_URI): point it at our store for the call, then put back what the caller had."""
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved_uri = mlflow.get_tracking_uri() if saved_env else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if saved_env is None:
            mlflow.set_tracking_uri(None)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            mlflow.set_tracking_uri(saved_uri)
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _registered_model(tracker: Tracker, name: str):
    try:
        return tracker.client.get_registered_model(name)
    except Exception:
        return None


def _current_champion(tracker: Tracker, name: str):
    try:
        return tracker.client.get_model_version_by_alias(name, ALIAS)
    except Exception:  # no such model or alias yet
        return None


def _read_artifact(tracker: Tracker, run_id: str, path: str) -> str:
    with tempfile.TemporaryDirectory(prefix="sweeplab-") as tmp:
        return Path(tracker.client.download_artifacts(run_id, path, tmp)).read_text()
