"""The private APIs sweeplab still uses, each pinned: when a new torch, MLflow or Optuna moves one, a test here
fails by name, instead of a sweep failing (or silently slowing down) somewhere else. Each says what it is for."""

import subprocess
import sys

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient


def test_torch_optimizer_wrappers_that_eager_skips():
    """_eager.skip_dynamo_wrappers: the Optimizer methods and each optimizer's step keep their plain function in
    `__wrapped__`, and with the patch a training run never loads torch._dynamo (its ~1.3 s import)."""
    from torch.optim import SGD, Adam, AdamW, Optimizer, RMSprop

    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        assert callable(getattr(getattr(Optimizer, name), "__wrapped__", None)), name
    for cls in (Adam, AdamW, SGD, RMSprop):
        assert callable(getattr(cls.step, "__wrapped__", None)), cls.__name__
    code = (
        "import sys; from sweeplab._eager import skip_dynamo_wrappers; assert skip_dynamo_wrappers(); "
        "from sweeplab.config import load_experiment; from sweeplab.train.experiment import run_experiment; "
        "run_experiment(load_experiment('experiments/training_loop_lab.yaml', {'epochs': 2})); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mlflow_metric_table_read_in_one_select(tmp_path):
    """report._select_curves reads every curve with one SELECT on MLflow's SqlMetric table through the store's
    engine (client._tracking_client.store.engine): it must return what the public per-run API returns."""
    from mlflow.entities import Metric

    from sweeplab.report.load import _select_curves

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pin")
    run_ids = []
    for offset in (0.0, 10.0):
        run_id = client.create_run(experiment).info.run_id
        client.log_batch(
            run_id,
            metrics=[
                Metric(key, offset + step + (0.5 if key == "val_loss" else 0), 0, step)
                for step in (1, 2, 3)
                for key in ("train_loss", "val_loss")
            ],
        )
        run_ids.append(run_id)
    frame = _select_curves(client._tracking_client.store, run_ids)
    assert frame is not None and len(frame) == 12
    for run_id in run_ids:
        for key, split in (("train_loss", "train"), ("val_loss", "val")):
            public = [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            mine = frame[(frame.run_id == run_id) & (frame.split == split)].sort_values("epoch")
            assert list(zip(mine.epoch, mine.loss)) == public


def test_mlflow_dataset_entity():
    """recorder.TrialRun.log_dataset: a NumpyDataset becomes the entity log_inputs takes via _to_mlflow_entity."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.entities import Dataset

    entity = from_numpy(np.zeros((3, 2)), targets=np.zeros(3), name="pin")._to_mlflow_entity()
    assert isinstance(entity, Dataset) and entity.name == "pin" and entity.digest


def test_optuna_trial_ids(tmp_path):
    """ledger.Ledger (the only code that handles them): a Trial's and a FrozenTrial's `_trial_id` is the id the
    storage API takes, and study.tell takes a trial number."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(storage=storage, study_name="pin")
    trial = study.ask()
    storage.set_trial_user_attr(trial._trial_id, "pinned", True)
    frozen = study.trials[0]
    assert frozen._trial_id == trial._trial_id and frozen.user_attrs == {"pinned": True}
    study.tell(trial.number, 1.0)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE


@pytest.mark.parametrize("kind", ["journal", "rdb"])
def test_optuna_batched_intermediate_values_equal_the_public_calls(tmp_path, kind):
    """ledger.write_curve writes a curve through Optuna's private journal and RDB write paths in one go; the
    trial must read back exactly as after one public set_trial_intermediate_value per step."""
    import math

    import optuna
    from optuna.storages.journal import JournalFileBackend

    from sweeplab.sweep.ledger import write_curve

    def storage(name):
        if kind == "journal":
            return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / f"{name}.journal")))
        return optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/{name}.db")

    curve = (3.5, 2.25, math.inf, 1.125, math.nan, 0.5)
    batched, public = storage("batched"), storage("public")
    results = []
    for each in (batched, public):
        study = optuna.create_study(storage=each, study_name="s")
        trial = study.ask()
        trial.report(9.0, 2)  # a pruner's report: kept, not written again
        if each is batched:
            write_curve(each, trial._trial_id, curve)
            write_curve(each, trial._trial_id, curve)  # a retry changes nothing
        else:
            for step, value in enumerate(curve, start=1):
                if math.isfinite(value) and step != 2:
                    each.set_trial_intermediate_value(trial._trial_id, step, value)
        study.tell(trial, 1.0)
        results.append(optuna.load_study(study_name="s", storage=each).trials[0].intermediate_values)
    assert results[0] == results[1] == {1: 3.5, 2: 9.0, 4: 1.125, 6: 0.5}
