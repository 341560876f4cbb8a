from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAB = ROOT / "experiments" / "training_loop_lab.yaml"


@pytest.fixture
def lab_path() -> Path:
    return LAB


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh folder, entered, with no MLflow or Optuna store named by the environment: a user's new folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SWEEPLAB_STORAGE", raising=False)
    return tmp_path
