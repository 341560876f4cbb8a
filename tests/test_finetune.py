"""#39: fine-tuning as practitioners write it: `model.init_from` (another run's weights, a new head left fresh),
`train.param_groups` (the backbone at a fraction of the head's rate) and `train.freeze` (the backbone frozen for its
first epochs), against a plain PyTorch loop written here (load_state_dict, optimizer(param_groups),
requires_grad_(False)), and each group's learning rate as logged."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sweeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from digits_halves import digits  # noqa: E402
from digits_nets import SmallCNN  # noqa: E402

EPOCHS, VAL = 6, 180


def finetune_config(init_from, **train) -> dict:
    return {
        "name": "ft",
        "task": "multiclass",
        "seed": 0,
        "data": {
            "source": "python",
            "class_path": "digits_halves.digits",
            "init_args": {"low": 5, "high": 9},
            "val_size": VAL,
        },
        "model": {"class_path": "digits_nets.SmallCNN", "init_args": {"channels": 8}, "init_from": init_from},
        "train": {"optimizer": "Adam", "lr": 0.003, "epochs": EPOCHS, "batch_size": 64, **train},
        "objective": {"metric": "val_accuracy"},
    }


def plain_finetune(pretrained: dict, lr: float, lr_scale: float | None, frozen_epochs: int, optimizer: str = "Adam"):
    """The plain loop: the data split as random_split's permutation, the model seeded, the pretrained weights loaded
    but the head's, Adam over (head, backbone * lr_scale), the backbone frozen by requires_grad_ for N epochs."""
    x, y = digits(5, 9)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
    train, val = perm[: len(y) - VAL], perm[len(y) - VAL :]
    model = SmallCNN(in_channels=1, n_classes=5, channels=8)
    state = model.state_dict()
    state.update({k: v for k, v in pretrained.items() if not k.startswith("head.")})
    model.load_state_dict(state)
    backbone = list(model.features.parameters())
    cls = getattr(torch.optim, optimizer)
    if lr_scale is None:
        opt = cls(model.parameters(), lr=lr)
    else:
        opt = cls([{"params": list(model.head.parameters())}, {"params": backbone, "lr": lr * lr_scale}], lr=lr)
    loader = DataLoader(
        TensorDataset(x[train], y[train]), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    loss_fn = nn.CrossEntropyLoss()
    curves = {"train_loss": [], "val_loss": [], "lr": [], "lr_backbone": []}
    for epoch in range(1, EPOCHS + 1):
        for p in backbone:
            p.requires_grad_(epoch > frozen_epochs)
        model.train()
        total = 0.0
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        curves["train_loss"].append(total / len(train))
        model.eval()
        with torch.no_grad():
            curves["val_loss"].append(loss_fn(model(x[val]), y[val]).item())
        curves["lr"].append(opt.param_groups[0]["lr"])
        curves["lr_backbone"].append(opt.param_groups[-1]["lr"])
    return curves


@pytest.fixture
def pretrained(store):
    """A pretrained SmallCNN's weights (a 10-class head: its shape is not the fine-tuned model's), as a .pt file."""
    for name in ("digits_nets.py", "digits_halves.py"):
        shutil.copy(ROOT / "experiments" / name, store / name)
    torch.manual_seed(123)
    state = SmallCNN(in_channels=1, n_classes=10, channels=8).state_dict()
    torch.save(state, store / "pretrained.pt")
    return state


def _curve(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _stacked_pair(store, rates: list[float], **train):
    """Two fine-tunes from pretrained.pt (the head fresh), one per rate, swept on the stacked engine: (client, their
    trial runs), asserted to have trained as one group of two."""
    (store / "ft.yaml").write_text(
        yaml.safe_dump(finetune_config({"uri": "pretrained.pt", "exclude": ["head.*"]}, **train))
    )
    (store / "s.yaml").write_text(
        f"study: stacked\nexperiment: ft.yaml\nengine: vectorized\nspace:\n  lr: {{choices: {rates}}}\n"
        "sampler: {type: grid}\nn_trials: 2\n"
    )
    uri = f"sqlite:///{store / 's.db'}"
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--quiet", "--no-report"]) == 0
    client = MlflowClient(uri)
    trials = client.search_runs(
        [client.get_experiment_by_name("stacked").experiment_id], "tags.`sweeplab.role` = 'trial'"
    )
    assert {t.data.tags["sweeplab.stacked_members"] for t in trials} == {"2"}
    return client, trials


def test_a_fine_tune_is_the_plain_loop_bit_for_bit(store, pretrained, capsys):
    train = {"param_groups": [{"name": "backbone", "params": "features.*", "lr_scale": 0.1}]}
    train["freeze"] = [{"params": ["features.*"], "epochs": 2}]
    (store / "ft.yaml").write_text(
        yaml.safe_dump(finetune_config({"uri": "pretrained.pt", "exclude": ["head.*"]}, **train))
    )
    uri = f"sqlite:///{store / 'f.db'}"
    assert main(["run", str(store / "ft.yaml"), "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    expected = plain_finetune(pretrained, 0.003, 0.1, 2)
    for key in ("train_loss", "val_loss", "lr", "lr_backbone"):
        assert _curve(client, run.info.run_id, key) == pytest.approx(expected[key], rel=0, abs=0), key
    assert run.data.tags["sweeplab.init_from"] == "pretrained.pt"
    assert _curve(client, run.info.run_id, "lr_backbone") == [pytest.approx(0.0003)] * EPOCHS


def test_init_from_stacks(store, pretrained):
    """Members of a stacked group start from the loaded weights: each trial within 1e-4 of the plain loop."""
    client, trials = _stacked_pair(store, [0.001, 0.003])
    for trial in trials:
        expected = plain_finetune(pretrained, float(trial.data.params["train.lr"]), None, 0)
        got = _curve(client, trial.info.run_id, "val_loss")
        assert np.max(np.abs(np.array(got) - expected["val_loss"]) / np.array(expected["val_loss"])) < 1e-4


def test_a_head_of_another_shape_is_one_line_naming_the_key(store, pretrained, capsys):
    (store / "ft.yaml").write_text(yaml.safe_dump(finetune_config("pretrained.pt")))
    assert main(["run", str(store / "ft.yaml"), "--tracking-uri", f"sqlite:///{store / 'x.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # the head: 2 x 8 channels x 2 x 2 features into 5 classes here, 10 in the file
    assert "model.init_from: head.2.weight: the model's [5, 64] against [10, 64] in pretrained.pt" in err
    assert not (store / "x.db").exists() and not (store / "mlruns").exists()


def test_init_from_a_run_and_a_glob_that_matches_nothing(store, pretrained, capsys):
    uri = f"sqlite:///{store / 'r.db'}"
    (store / "pre.yaml").write_text(yaml.safe_dump({**finetune_config(None), "name": "pre"}))
    assert main(["run", str(store / "pre.yaml"), "epochs=2", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    (pre,) = client.search_runs([client.get_experiment_by_name("pre").experiment_id])
    (store / "ft.yaml").write_text(yaml.safe_dump(finetune_config(f"runs:/{pre.info.run_id}")))
    assert main(["run", str(store / "ft.yaml"), "epochs=1", "--tracking-uri", uri]) == 0
    (run,) = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    assert run.data.tags["sweeplab.init_from"] == f"run {pre.info.run_id}"
    capsys.readouterr()
    bad = ["train.freeze=[{params: backbone.*, epochs: 1}]"]
    assert main(["run", str(store / "ft.yaml"), *bad, "--tracking-uri", uri]) == 2
    assert "train.freeze.0.params: ['backbone.*'] match no parameter of the model" in capsys.readouterr().err


def test_the_champion_answers_the_classes_names(store, pretrained, capsys):
    """data.classes: the champion's labels are the names (its signature's label a string), its probabilities named
    by them; a Dataset's `classes` names them too; a count that is not the classes' is one line."""
    config = finetune_config({"uri": "pretrained.pt", "exclude": ["head.*"]})
    config["data"]["classes"] = ["5", "6", "7", "8", "9"]
    (store / "ft.yaml").write_text(yaml.safe_dump(config))
    (store / "s.yaml").write_text("study: named\nexperiment: ft.yaml\nspace:\n  lr: {choices: [0.003]}\nn_trials: 1\n")
    uri = f"sqlite:///{store / 'n.db'}"
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--quiet", "--no-report"]) == 0
    # MLflow's own client, in a process that cannot import sweeplab
    script = f"""
import json, sys
sys.modules["sweeplab"] = None
import mlflow, numpy as np
mlflow.set_tracking_uri({uri!r})
champion = mlflow.pyfunc.load_model("models:/named@champion")
x = np.load({str(store / "x.npy")!r})
print(json.dumps({{
    "labels": [str(v) for v in champion.predict(x)],
    "columns": list(champion.predict(x[:3], params={{"output": "probabilities"}}).columns),
    "types": [t.name for t in champion.metadata.get_output_schema().input_types()],
}}))
"""
    x, y = digits(5, 9)
    np.save(store / "x.npy", x[:40])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["labels"]) <= set(config["data"]["classes"])
    assert np.mean(np.asarray(got["labels"]) == np.asarray([str(v + 5) for v in y[:40]])) > 0.5  # it learned
    assert got["columns"] == config["data"]["classes"] and got["types"] == ["string"]
    capsys.readouterr()
    config["data"]["classes"] = ["5", "6", "7"]
    (store / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(store / "bad.yaml"), "--no-track"]) == 2
    assert "data.classes: 3 names (5, 6, 7) for 5 classes" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["Adam", "SGD", "AdamW"])
def test_param_groups_and_freezing_stack(store, pretrained, optimizer):
    """The stacked engine's per-column lr scale and freeze mask against the plain loop: two trials stacked
    (backbone lr_scale 0.1, frozen 2 epochs), each within 1e-4 of its plain-loop curve (measured: 2.5e-7 at worst
    over 6 epochs for the three optimizers), per-group lr as logged."""
    train = {"optimizer": optimizer, "param_groups": [{"name": "backbone", "params": "features.*", "lr_scale": 0.1}]}
    train["freeze"] = [{"params": ["features.*"], "epochs": 2}]
    client, trials = _stacked_pair(store, [0.002, 0.004], **train)
    for trial in trials:
        lr = float(trial.data.params["train.lr"])
        expected = plain_finetune(pretrained, lr, 0.1, 2, optimizer)
        for key in ("train_loss", "val_loss"):
            got = np.array(_curve(client, trial.info.run_id, key))
            assert np.max(np.abs(got - expected[key]) / np.abs(expected[key])) < 1e-4, key
        assert _curve(client, trial.info.run_id, "lr_backbone") == pytest.approx(expected["lr_backbone"])


@pytest.mark.slow
def test_the_shipped_fine_tuning_example_from_a_new_folder(store, capsys):
    """As a user runs it: sweeps/digits_pretrain.yaml registers models:/digits_0_4@champion, then
    sweeps/digits_finetune.yaml starts from it (the head fresh, the backbone slower and frozen first); its champion
    is scored on the test split and answers the digits 5..9 by name."""
    uri = f"sqlite:///{store / 'runs.db'}"
    assert (
        main(
            [
                "sweep",
                str(ROOT / "sweeps/digits_pretrain.yaml"),
                "n_trials=1",
                "epochs=5",
                "--tracking-uri",
                uri,
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "sweep",
                str(ROOT / "sweeps/digits_finetune.yaml"),
                "n_trials=2",
                "epochs=4",
                "--tracking-uri",
                uri,
                "--no-report",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "champion: models:/digits_5_9@champion" in out and "  test: test_accuracy" in out
    client = MlflowClient(uri)
    trials = client.search_runs(
        [client.get_experiment_by_name("digits_5_9").experiment_id], "tags.`sweeplab.role` = 'trial'"
    )
    pretrained = client.get_model_version_by_alias("digits_0_4", "champion").run_id
    assert {t.data.tags["sweeplab.init_from"] for t in trials} == {f"models:/digits_0_4@champion (run {pretrained})"}
    x, y = digits(5, 9)
    row = ",".join(str(float(v)) for v in x[list(y).index(2)].reshape(-1))  # a 7
    assert main(["predict", "models:/digits_5_9@champion", "--tracking-uri", uri, "--x", row]) == 0
    said = capsys.readouterr().out
    assert re.search(r"row 0 -> label=([5-9]) p=", said), said  # a digit's name, not a label index 0..4
