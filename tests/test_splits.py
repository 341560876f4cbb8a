"""#39: `data.stratify` and the test split (`data.test_size`): the splits against scikit-learn's own, and the
champion's test scores recomputed here from its logged weights with scikit-learn's metrics."""

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from sweeplab.cli import main
from sweeplab.config import ConfigError, build_experiment
from sweeplab.train.data import make_dataset

EXPERIMENT = {
    "name": "bc",
    "task": "binary",
    "data": {"source": "sklearn", "name": "breast_cancer", "val_size": 0.25, "test_size": 0.2, "stratify": True},
    "model": {"hidden": 8},
    "train": {"epochs": 15, "lr": 0.003, "batch_size": 32},
    "objective": {"metric": "val_auroc"},
}


def _sklearn_split(seed_test=0, seed_val=42):
    """The rows scikit-learn's stratified train_test_split gives: test first (114 of 569), then validation."""
    bunch = load_breast_cancer()
    x, y = bunch.data.astype(np.float32), bunch.target
    rest, test = train_test_split(np.arange(569), test_size=113, train_size=456, stratify=y, random_state=seed_test)
    train, val = train_test_split(rest, test_size=114, train_size=342, stratify=y[rest], random_state=seed_val)
    return x, y, train, val, test


def test_a_stratified_split_with_a_test_split_is_scikit_learns():
    dataset = make_dataset(build_experiment(EXPERIMENT, "test"))
    x, y, train, val, test = _sklearn_split()
    for rows, (xs, ys) in ((train, (dataset.x_train, dataset.y_train)), (val, (dataset.x_val, dataset.y_val))):
        assert torch.equal(xs, torch.from_numpy(x[rows])) and ys[:, 0].long().tolist() == y[rows].tolist()
    assert torch.equal(dataset.x_test, torch.from_numpy(x[test]))
    counts = [np.bincount(y[rows]).tolist() for rows in (train, val, test)]
    for n0, n1 in counts:  # 212 malignant of 569 (37.3%): each split holds its share, to within one row
        assert abs(n0 - (n0 + n1) * 212 / 569) < 1
    assert [
        np.bincount(part[:, 0].long().numpy()).tolist() for part in (dataset.y_train, dataset.y_val, dataset.y_test)
    ] == counts


def test_stratify_is_refused_for_regression():
    raw = {**EXPERIMENT, "task": "regression", "data": {"source": "sklearn", "name": "diabetes", "stratify": True}}
    raw.pop("objective")
    with pytest.raises(ConfigError, match="data.stratify: task regression has no classes"):
        build_experiment(raw, "test")


def test_the_champion_is_scored_on_the_test_split_once(store, capsys):
    """The champion's logged weights, rebuilt here as a plain nn.Sequential, on scikit-learn's test rows: the
    logged test_loss, test_accuracy and test_auroc are scikit-learn's log_loss, accuracy and ROC AUC of them."""
    import yaml

    (store / "e.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    (store / "s.yaml").write_text(
        "study: bc\nexperiment: e.yaml\nspace:\n  lr: {low: 0.001, high: 0.03, log: true}\n"
        "sampler: {type: random, seed: 0}\nn_trials: 3\n"
    )
    uri = f"sqlite:///{store / 'b.db'}"
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--no-report"]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("bc", "champion")
    run = client.get_run(version.run_id)
    trials = client.search_runs([run.info.experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert not any(
        name.startswith("test_") for t in trials if t.info.run_id != run.info.run_id for name in t.data.metrics
    )
    path = client.download_artifacts(version.run_id, "checkpoint/best.pt", str(store))
    state = torch.load(path, weights_only=True)["state_dict"]
    model = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 1))
    model.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    x, y, _, _, test = _sklearn_split()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.from_numpy(x[test])))[:, 0].double().numpy()
    metrics = run.data.metrics
    assert metrics["test_auroc"] == pytest.approx(roc_auc_score(y[test], p), abs=1e-12)
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(y[test], p > 0.5), abs=1e-12)
    assert metrics["test_loss"] == pytest.approx(log_loss(y[test], p), rel=1e-5)
    assert version.tags["test_auroc"] == repr(metrics["test_auroc"])
    assert f"test: test_auroc {metrics['test_auroc']:.4g}" in out
    assert main(["report", "bc", "--tracking-uri", uri]) == 0
    said = (
        f"the champion (trial #{run.data.tags['sweeplab.trial_number']}) scores test_auroc {metrics['test_auroc']:.4g}"
    )
    assert said in capsys.readouterr().out
