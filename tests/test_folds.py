"""#38: `data.folds: F`: each trial trained as F fold members on the training split, scored by their mean, and the
champion refit on the whole training split. Every expected number comes from a plain PyTorch loop written here
(the seed's DataLoader loop on scikit-learn's folds), read against what the runs logged to MLflow."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sklearn.model_selection import KFold, StratifiedKFold
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset, random_split

from sweeplab.cli import main

from reference import seed_run

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "experiments" / "training_loop_lab.yaml"
FOLDS, EPOCHS = 4, 12


def plain_folds(lr: float, binary: bool, epochs: int = EPOCHS, folds: int = FOLDS):
    """The seed's script, its 192 training samples in scikit-learn's folds: each fold's (train, val) curves."""
    out = []
    for fold in range(folds):
        torch.manual_seed(42)
        X = torch.randn(240, 2)
        y = 3 * X[:, [0]] + 2 * X[:, [1]] + 5 + torch.randn(240, 1) * 0.3
        if binary:
            y = (y > 5).float()
        train_split, _ = random_split(TensorDataset(X, y), [192, 48], generator=torch.Generator().manual_seed(42))
        labels = y[train_split.indices, 0].long().numpy() if binary else None
        splitter = (
            StratifiedKFold(folds, shuffle=True, random_state=42)
            if binary
            else KFold(folds, shuffle=True, random_state=42)
        )
        train_idx, held_idx = list(splitter.split(np.zeros(192), labels))[fold]
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
        loss_fn = nn.BCEWithLogitsLoss() if binary else nn.MSELoss()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        train_loader = DataLoader(
            Subset(train_split, train_idx.tolist()),
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(7),
        )
        val_loader = DataLoader(Subset(train_split, held_idx.tolist()), batch_size=48)

        def run_epoch(loader, train, model=model, loss_fn=loss_fn, opt=opt):
            model.train() if train else model.eval()
            total = 0.0
            with torch.enable_grad() if train else torch.no_grad():
                for xb, yb in loader:
                    loss = loss_fn(model(xb), yb)
                    if train:
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    total += loss.item() * len(xb)
            return total / len(loader.dataset)

        curves = {"train_loss": [], "val_loss": []}
        for _ in range(epochs):
            curves["train_loss"].append(run_epoch(train_loader, True))
            curves["val_loss"].append(run_epoch(val_loader, False))
        out.append(curves)
    return out


def _curve(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _sweep(store, engine: str, task: str) -> tuple[MlflowClient, list]:
    uri = f"sqlite:///{store / f'{engine}.db'}"
    (store / "s.yaml").write_text(
        f"study: cv\nexperiment: {LAB}\nengine: {engine}\n"
        f"base: {{task: {task}, data: {{folds: {FOLDS}}}, train: {{epochs: {EPOCHS}}}}}\n"
        "space:\n  lr: {choices: [0.01, 0.03]}\nsampler: {type: grid}\nn_trials: 2\n"
    )
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--quiet", "--no-report"]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cv").experiment_id])
    return client, runs


@pytest.mark.parametrize("engine, task, tolerance", [("reference", "regression", 0.0), ("vectorized", "binary", 1e-4)])
def test_fold_members_are_the_plain_loop_and_the_trial_their_mean(store, engine, task, tolerance):
    """Each fold member's curves against the plain loop (bit for bit on the reference loop, 1e-4 stacked: float
    rounding of a batched matmul: 2.4e-7 at worst over 12 epochs, measured); the trial's curves their mean, its best epoch and objective
    the mean curve's; the champion a refit run of the winner's configuration for that many epochs."""
    client, runs = _sweep(store, engine, task)
    trials = [r for r in runs if r.data.tags.get("sweeplab.role") == "trial"]
    assert len(trials) == 2 and {t.data.tags["sweeplab.engine"] for t in trials} == {engine}
    if engine == "vectorized":  # the folds of both trials stacked: 8 members of one group
        assert {t.data.tags["sweeplab.stacked_members"] for t in trials} == {str(2 * FOLDS)}
    means = {}
    for trial in trials:
        lr = float(trial.data.params["train.lr"])
        expected = plain_folds(lr, task == "binary")
        for i, fold in enumerate(expected):
            for key in ("train_loss", "val_loss"):
                got = _curve(client, trial.info.run_id, f"fold{i}_{key}")
                assert len(got) == EPOCHS
                if tolerance == 0.0:
                    assert got == fold[key]
                else:
                    assert max(abs(a - b) / abs(b) for a, b in zip(got, fold[key])) < tolerance
        mean_val = [math.fsum(f["val_loss"][e] for f in expected) / FOLDS for e in range(EPOCHS)]
        mean_train = [math.fsum(f["train_loss"][e] for f in expected) / FOLDS for e in range(EPOCHS)]
        logged_val = _curve(client, trial.info.run_id, "val_loss")
        assert logged_val == pytest.approx(mean_val, rel=tolerance or 1e-15)
        assert _curve(client, trial.info.run_id, "train_loss") == pytest.approx(mean_train, rel=tolerance or 1e-15)
        best = min(range(EPOCHS), key=lambda e: logged_val[e]) + 1  # the first of a tie, as the loop keeps it
        assert trial.data.metrics["best_epoch"] == best
        assert trial.data.metrics["best_val_loss"] == logged_val[best - 1]
        means[trial.info.run_id] = (logged_val[best - 1], best, lr)
    (refit,) = [r for r in runs if r.data.tags.get("sweeplab.role") == "refit"]
    winner = min(means, key=lambda run: means[run][0])
    assert refit.data.tags["sweeplab.refit_of"] == winner
    assert float(refit.data.params["train.lr"]) == means[winner][2]
    assert int(refit.data.params["train.epochs"]) == means[winner][1] == refit.data.metrics["best_epoch"]
    assert "data.folds" not in refit.data.params or refit.data.params["data.folds"] == "None"
    version = client.get_model_version_by_alias("cv", "champion")
    assert version.run_id == refit.info.run_id and version.tags["sweeplab.refit_of"] == winner


def test_a_fold_trial_without_enough_samples_of_a_class_is_one_line(store, capsys):
    (store / "e.yaml").write_text("name: few\ntask: multiclass\ndata: {source: sklearn, name: iris}\n")
    (store / "s.yaml").write_text(
        "study: few\nexperiment: e.yaml\nbase: {data: {folds: 60}}\nspace:\n  lr: {choices: [0.01]}\nn_trials: 1\n"
    )
    code = main(["sweep", str(store / "s.yaml"), "--tracking-uri", f"sqlite:///{store / 'f.db'}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "data.folds: 60 stratified folds" in err


def test_sweeplab_run_with_folds_scores_the_folds_and_refits_the_seed_loop(store, capsys):
    """`sweeplab run` with data.folds: the run's curves are the plain folds' mean, and the refit is the seed's own
    script on the whole training split for the mean curve's best epoch, bit for bit, its last epoch the model."""
    uri = f"sqlite:///{store / 'r.db'}"
    assert main(["run", str(LAB), f"data.folds={FOLDS}", f"epochs={EPOCHS}", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    expected = plain_folds(0.03, False)
    mean_val = [math.fsum(f["val_loss"][e] for f in expected) / FOLDS for e in range(EPOCHS)]
    best = min(range(EPOCHS), key=lambda e: mean_val[e]) + 1
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("training_loop_lab").experiment_id])
    (folds,) = [r for r in runs if r.data.tags["sweeplab.role"] == "run"]
    (refit,) = [r for r in runs if r.data.tags["sweeplab.role"] == "refit"]
    assert _curve(client, folds.info.run_id, "val_loss") == pytest.approx(mean_val, rel=1e-15)
    assert folds.data.metrics["best_epoch"] == best and refit.data.tags["sweeplab.refit_of"] == folds.info.run_id
    seed = seed_run(epochs=best)
    assert _curve(client, refit.info.run_id, "train_loss") == seed["train_loss"]
    assert _curve(client, refit.info.run_id, "val_loss") == seed["val_loss"]
    assert refit.data.metrics["best_epoch"] == best  # the last epoch, whatever the validation split says
    assert f"refit: {FOLDS} folds' mean above" in out and f"for {best} epochs" in out
