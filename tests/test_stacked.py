"""The vectorized engine for a user's own model (issue #21): members of one architecture stacked by torch.func
(stack_module_state's layout, functional_call + vmap) agree with the reference loop trained one by one; a model
vmap cannot run goes to the reference loop with one line. The models are files the test writes, as a user would;
the expected numbers are the reference loop's (the seed's loop, which the lab's tests hold to the seed)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from sweeplab.config import build_experiment
from sweeplab.engines import Job, engine_named

NETS = """\
import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self, in_channels, n_classes, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 16, n_classes)

    def forward(self, x):
        return self.head(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


class WithBatchNorm(nn.Module):
    def __init__(self, in_channels, n_classes, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)  # BatchNorm brings its own
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * 16, n_classes)

    def forward(self, x):
        return self.head(torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


class CallsItem(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.lin = nn.Linear(in_features, n_classes)

    def forward(self, x):
        return self.lin(x.flatten(1) / float(x.abs().max().item()))
"""


def configs(folder: Path, model: str, settings: list[dict]):
    (folder / "nets.py").write_text(NETS)
    out = []
    for extra in settings:
        raw = {
            "task": "multiclass",
            "seed": 1,
            "data": {"source": "sklearn", "name": "digits", "val_size": 0.2, "train_fraction": 0.5},
            "model": {
                "class_path": f"nets.{model}",
                "init_args": {"channels": extra.pop("channels", 4)} if model != "CallsItem" else {},
            },
            "train": {"epochs": 6, "batch_size": 64, **extra},
        }
        out.append(build_experiment(raw, "test", folder))
    return out


SETTINGS = [
    {"optimizer": "Adam", "lr": 0.003},
    {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9},
    {"optimizer": "AdamW", "lr": 0.01, "channels": 6},
    {"optimizer": "RMSprop", "lr": 0.001},
    {"optimizer": "Adam", "lr": 0.01, "channels": 6},
]


@pytest.mark.parametrize("model", ["CNN", "WithBatchNorm"])
def test_stacked_members_agree_with_the_reference_loop(tmp_path, model):
    settings = [dict(s) for s in SETTINGS]
    reference = [Job(None, c) for c in configs(tmp_path, model, [dict(s) for s in settings])]
    stacked = [Job(None, c) for c in configs(tmp_path, model, [dict(s) for s in settings])]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    for ref, vec in zip(reference, stacked):
        a, b = ref.result.history, vec.result.history
        assert b.best_epoch == a.best_epoch
        assert b.best_val_loss == pytest.approx(a.best_val_loss, rel=1e-4)
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-3)  # every epoch; the bar (1e-4) is the best
        assert sorted(b.best_state) == sorted(a.best_state)  # BatchNorm's running statistics included
        # the best states answer alike
        outputs = []
        for state in (a.best_state, b.best_state):
            net = ref.result.model if state is a.best_state else type(ref.result.model)(**vec.result.spec.init_args)
            net.load_state_dict(state)
            net.eval()
            with torch.no_grad():
                outputs.append(net(ref.result.dataset.x_val))
        assert torch.allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)


def test_a_model_vmap_cannot_run_trains_on_the_reference_loop_with_one_line(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "exp.yaml").write_text(
        textwrap.dedent("""\
        name: items
        task: multiclass
        data: {source: sklearn, name: digits, val_size: 0.2, train_fraction: 0.3}
        model: {class_path: nets.CallsItem}
        train: {epochs: 2}
        """)
    )
    (tmp_path / "sweep.yaml").write_text(
        "study: items\nexperiment: exp.yaml\nspace:\n  lr: {choices: [0.01, 0.03, "
        "0.1]}\nsampler: {type: grid}\nn_trials: 3\n"
    )
    uri = f"sqlite:///{tmp_path}/t.db"
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "sweep", "sweep.yaml", "--tracking-uri", uri, "--no-report"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "cannot run under torch.func.vmap" in line]
    assert len(said) == 1 and ".item()" in said[0] and "its trials train on the reference loop" in said[0]
    assert "Traceback" not in proc.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("items").experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" and r.data.metrics["best_epoch"] >= 1 for r in runs)
