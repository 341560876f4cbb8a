"""#38: every trial reproducible on its own: `sweeplab rerun RUN_ID` and `sweeplab.run(like=RUN_ID)` retrain a logged
run's configuration (its seed, its engine) into a run tagged `sweeplab.rerun_of`, and its curves equal the
original's, read back from MLflow here, epoch by epoch."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import sweeplab
from sweeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "experiments" / "training_loop_lab.yaml"
SWEEPLAB = str(Path(sys.executable).parent / "sweeplab")

# ArrowHead-like (the UCR set: 36 short series to train on): three noisy shapes, and a 1D CNN with BatchNorm
SERIES = """
import math
import torch
from torch import nn


def arrowhead():
    g = torch.Generator().manual_seed(7)

    def make(n):
        y = torch.arange(n) % 3
        t = torch.linspace(0, 1, 64)
        shapes = torch.stack([torch.sin(2 * math.pi * (k + 1) * t) for k in range(3)])
        return torch.utils.data.TensorDataset((shapes[y] + 0.8 * torch.randn(n, 64, generator=g))[:, None], y)

    return {"train": make(36), "val": make(60)}


class BNConv(nn.Module):
    def __init__(self, in_channels=1, n_classes=3, channels=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, padding=2, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(channels, channels, 5, padding=2, bias=False), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(channels, n_classes),
        )

    def forward(self, x):
        return self.net(x)
"""


def _curve(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _rerun_of(client, run_id):
    experiment = client.get_run(run_id).info.experiment_id
    (found,) = client.search_runs([experiment], f"tags.`sweeplab.rerun_of` = '{run_id}'")
    return found


def test_a_reference_run_is_reproduced_bit_for_bit(store, capsys):
    uri = f"sqlite:///{store / 'r.db'}"
    assert main(["run", str(LAB), "epochs=15", "seed=5", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    (original,) = client.search_runs([client.get_experiment_by_name("training_loop_lab").experiment_id])
    capsys.readouterr()
    assert main(["rerun", original.info.run_id, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    again = _rerun_of(client, original.info.run_id)
    for key in ("train_loss", "val_loss"):
        assert _curve(client, again.info.run_id, key) == _curve(client, original.info.run_id, key)
    assert again.data.params["seed"] == "5" and again.data.metrics["best_epoch"] == original.data.metrics["best_epoch"]
    assert "curves within 0 (relative)" in out and "the same best epoch" in out


def test_a_stacked_trial_reruns_bit_for_bit_whatever_its_group(store):
    """The MLP's stacked members: every trial of a group of six (hidden sizes 4 to 64 padded to the widest, Adam
    and SGD), rerun without its group. A member's numbers do not depend on the other members' values, but on the
    width its group padded it to (a matmul sums over it: 1.1e-6 relative apart by epoch 27 when a hidden-4 trial
    reruns unpadded) and on how the batched kernels block the members (4e-7 when the widest reruns alone), so the
    run records both and the rerun trains beside twins at that width, as many as its group had: bit for bit."""
    uri = f"sqlite:///{store / 's.db'}"
    (store / "s.yaml").write_text(
        f"study: st\nexperiment: {LAB}\nbase: {{train: {{epochs: 30}}}}\nengine: vectorized\n"
        "space:\n  lr: {low: 0.003, high: 0.1, log: true}\n  hidden: {choices: [4, 16, 64]}\n"
        "  optimizer: {choices: [Adam, SGD]}\nsampler: {type: random, seed: 2}\nn_trials: 6\n"
    )
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--quiet", "--no-report"]) == 0
    client = MlflowClient(uri)
    trials = client.search_runs([client.get_experiment_by_name("st").experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert len(trials) == 6 and {t.data.tags["sweeplab.engine"] for t in trials} == {"vectorized"}
    assert {(t.data.tags["sweeplab.stacked_width"], t.data.tags["sweeplab.stacked_members"]) for t in trials} == {
        ("64", "6")
    }
    for original in trials:
        result = sweeplab.run(like=original.info.run_id, tracking_uri=uri)
        again = _rerun_of(client, original.info.run_id)
        assert again.data.tags["sweeplab.engine"] == "vectorized"
        for key in ("train_loss", "val_loss"):
            mine, theirs = _curve(client, again.info.run_id, key), _curve(client, original.info.run_id, key)
            assert len(mine) == len(theirs) == 30
            assert mine == theirs
        assert result.best_epoch == original.data.metrics["best_epoch"]
        assert "curves within 0 (relative)" in result.rerun and "the same best epoch" in result.rerun


def test_rerun_of_a_missing_run_is_one_line(store, capsys):
    assert main(["rerun", "0123456789abcdef", "--tracking-uri", f"sqlite:///{store / 'x.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run '0123456789abcdef'" in err


@pytest.mark.slow
def test_a_stacked_batchnorm_trial_reruns_bit_for_bit_from_the_command(store):
    """ArrowHead-like: a BatchNorm CNN, batches of 4, 30 epochs, 12 trials stacked in one group by the sweeplab
    command (which pins torch's AVX2 kernels). Its batched kernels block members in eights: a trial of the 12 reran
    5.8e-5 apart by epoch 30 in a group of 2 to 6, and 0.36 apart (another trajectory) with AVX-512 kernels. The
    rerun trains in a group of the original's size, in a process with the original's kernels: bit for bit."""
    (store / "series.py").write_text(SERIES)
    (store / "arrow.yaml").write_text(
        "name: arrow\ntask: multiclass\nseed: 0\ndata: {source: python, class_path: series.arrowhead}\n"
        "model: {class_path: series.BNConv}\ntrain: {optimizer: Adam, lr: 0.01, epochs: 30, batch_size: 4}\n"
    )
    (store / "s.yaml").write_text(
        "study: arrow\nexperiment: arrow.yaml\nengine: vectorized\nspace:\n  lr: {low: 0.001, high: 0.05, log: true}\n"
        "sampler: {type: random, seed: 1}\nn_trials: 12\n"
    )
    uri = f"sqlite:///{store / 'a.db'}"
    proc = subprocess.run(
        [SWEEPLAB, "sweep", "s.yaml", "--tracking-uri", uri, "--quiet", "--no-report"],
        cwd=store,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    trials = client.search_runs(
        [client.get_experiment_by_name("arrow").experiment_id], "tags.`sweeplab.role` = 'trial'"
    )
    assert len(trials) == 12 and {t.data.tags["sweeplab.stacked_members"] for t in trials} == {"12"}
    kernels = {t.data.tags["sweeplab.cpu_kernels"] for t in trials}
    assert len(kernels) == 1
    for original in sorted(trials, key=lambda t: t.data.tags["sweeplab.trial_number"])[:2]:
        rerun = subprocess.run(
            [SWEEPLAB, "rerun", original.info.run_id, "--tracking-uri", uri],
            cwd=store,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert rerun.returncode == 0, rerun.stderr
        again = _rerun_of(client, original.info.run_id)
        assert (
            again.data.tags["sweeplab.stacked_members"] == "12" and again.data.tags["sweeplab.cpu_kernels"] in kernels
        )
        for key in ("train_loss", "val_loss"):
            mine, theirs = _curve(client, again.info.run_id, key), _curve(client, original.info.run_id, key)
            assert len(mine) == len(theirs) == 30
            assert max(abs(a - b) / abs(b) for a, b in zip(mine, theirs)) <= 1e-6
        assert again.data.metrics["best_epoch"] == original.data.metrics["best_epoch"]
        assert "the same best epoch" in rerun.stdout
    import torch

    if torch.backends.cpu.get_cpu_capability() not in kernels:  # this process's kernels are not the command's
        result = sweeplab.run(like=trials[0].info.run_id, tracking_uri=uri)
        assert f"the original ran torch's {kernels.pop()} CPU kernels" in result.rerun
