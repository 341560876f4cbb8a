"""sweeplab from Python (issue #31): `sweeplab.sweep` and `sweeplab.run` with objects where files have import paths,
as a notebook user calls them: in a fresh interpreter, a class defined in `__main__`, the data as arrays from a plain
function; the results as DataFrames; the interpreter left as it was (signal handlers, sys.stdout, torch's
optimizers, thread counts); Ctrl-C as KeyboardInterrupt after the trials in flight end KILLED; bad input as
sweeplab.ConfigError with the CLI's line; and the notebook in docs/ executed by a Jupyter kernel (nbclient)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

import sweeplab
from sweeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]

NOTEBOOK_USER = """\
import json, signal, sys
import numpy as np
import torch
from torch import nn


class InlineNet(nn.Module):
    def __init__(self, n_classes, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels * 16, n_classes)

    def forward(self, x):
        return self.head(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images[:, None] / 16.0).astype(np.float32), data.target


before = [signal.getsignal(signal.SIGINT), sys.stdout, torch.optim.Adam.step, torch.get_num_threads()]
import sweeplab  # noqa: E402

experiment = {
    "task": "multiclass",
    "seed": 0,
    "data": {"source": "python", "class_path": digits, "val_size": 0.2},
    "model": {"class_path": InlineNet},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
    "objective": {"metric": "val_accuracy"},
}
spec = {
    "study": "inline",
    "experiment": experiment,
    "space": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}},
    "sampler": {"type": "random", "seed": 0},
    "n_trials": 4,
}
result = sweeplab.sweep(spec, tracking_uri=URI, storage=STORAGE, quiet=True)
import mlflow  # noqa: E402

mlflow.set_tracking_uri(URI)
champion = mlflow.pyfunc.load_model(result.champion)
images, labels = digits()
predicted = champion.predict(images[:20].astype("float64")).tolist()
run = sweeplab.run(experiment, tracking_uri=URI, epochs=4)
# before this script builds an optimizer of its own (torch then wraps Adam.step with its profiler hook itself)
after = [signal.getsignal(signal.SIGINT), sys.stdout, torch.optim.Adam.step, torch.get_num_threads()]

# the user's own loop for the same experiment: the seed's split, shuffle and order of draws
torch.manual_seed(0)
x, y = torch.from_numpy(images), torch.from_numpy(labels)
perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
n_val = int(len(y) * 0.2)
train_idx, val_idx = perm[: len(y) - n_val], perm[len(y) - n_val :]
model = InlineNet(n_classes=10)
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
loader = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(x[train_idx], y[train_idx]), batch_size=64, shuffle=True,
    generator=torch.Generator().manual_seed(7),
)
val_loss = []
for epoch in range(4):
    model.train()
    for xb, yb in loader:
        loss = nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        val_loss.append(nn.functional.cross_entropy(model(x[val_idx]), y[val_idx]).item())
    torch.empty((), dtype=torch.int64).random_()  # a validation DataLoader's pass draws a base seed, as the loop's

print(json.dumps({
    "columns": list(result.trials.columns),
    "rows": len(result.trials),
    "lr": result.trials["lr"].tolist(),
    "accuracy": result.trials["best_val_accuracy"].tolist(),
    "run_ids": result.trials["run_id"].tolist(),
    "best_trial": int(result.best["trial"].iloc[0]),
    "champion": result.champion,
    "study": result.study_name,
    "predicted": predicted,
    "labels": labels[:20].tolist(),
    "history_columns": list(run.history.columns),
    "history_val_loss": run.history["val_loss"].tolist(),
    "plain_val_loss": val_loss,
    "best_epoch": run.best_epoch,
    "run_id": run.run_id,
    "same": [a is b for a, b in zip(before, after)],
    "report": result.report(),
}))
"""


def run_script(folder: Path, body: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = folder / "notebook_user.py"
    script.write_text(body)
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def notebook_user(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebook user")
    uri = f"sqlite:///{folder / 'my runs.db'}"
    body = f"URI = {uri!r}\nSTORAGE = {'journal:' + str(folder / 'study.journal')!r}\n" + NOTEBOOK_USER
    proc = run_script(folder, body)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, uri, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_sweep_of_a_class_defined_in_main_returns_its_trials_as_a_dataframe(notebook_user):
    folder, uri, out = notebook_user
    assert out["rows"] == 4 and {"trial", "state", "lr", "best_epoch", "best_val_accuracy", "run_id"} <= set(
        out["columns"]
    )
    client = MlflowClient(uri)
    for run_id, lr, accuracy in zip(out["run_ids"], out["lr"], out["accuracy"]):
        run = client.get_run(run_id)  # each row is its own run's
        assert float(run.data.params["train.lr"]) == pytest.approx(lr)
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(accuracy)
    assert out["accuracy"][out["best_trial"]] == max(out["accuracy"])
    assert out["champion"] == "models:/inline@champion"
    right = sum(p == t for p, t in zip(out["predicted"], out["labels"]))
    assert right >= 14  # the champion (loaded by mlflow.pyfunc) learned digits: chance is 2 of 20
    assert out["report"].startswith("best is lr ")


@pytest.mark.slow
def test_run_returns_the_history_the_users_own_loop_gives_and_the_interpreter_is_as_it_was(notebook_user):
    folder, uri, out = notebook_user
    assert (
        out["history_columns"][:3] == ["epoch", "train_loss", "val_loss"] and "val_accuracy" in out["history_columns"]
    )
    assert out["history_val_loss"] == pytest.approx(out["plain_val_loss"], rel=1e-5)
    assert 1 <= out["best_epoch"] <= 4
    assert out["same"] == [True, True, True, True]  # SIGINT handler, sys.stdout, Adam.step, torch's threads


def test_a_notebook_class_is_logged_as_source_and_predict_from_a_shell_points_to_the_champion(
    notebook_user, capsys, monkeypatch
):
    folder, uri, out = notebook_user
    client = MlflowClient(uri)
    for run_id in (out["run_id"], out["run_ids"][0]):  # sweeplab.run's, and a trial's of sweeplab.sweep
        path = client.download_artifacts(run_id, "code/__main__.InlineNet.py", str(folder))
        assert Path(path).read_text().startswith("class InlineNet(nn.Module):")
    monkeypatch.chdir(folder)
    capsys.readouterr()
    assert main(["predict", out["run_ids"][0], "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a class defined in a notebook" in err[0] and "models:/inline@champion" in err[0]


def test_bad_input_raises_config_error_with_the_line_the_cli_prints(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: multiclass\ntrain: {lr: -1}\n")
    with pytest.raises(sweeplab.ConfigError) as caught:
        sweeplab.run(str(bad), track=False)
    assert main(["run", str(bad), "--no-track"]) == 2
    assert capsys.readouterr().err.strip() == f"sweeplab: error: {caught.value}"
    with pytest.raises(sweeplab.ConfigError, match="experiment: model.class_path: Input should be a valid string"):
        sweeplab.run({"task": "multiclass", "model": {"class_path": 3}}, track=False)


CTRL_C = """\
import json, os, signal
import torch
from torch import nn
import sweeplab
from mlflow import MlflowClient


class Slow(nn.Module):
    calls = 0

    def __init__(self, in_features, n_classes):
        super().__init__()
        self.lin = nn.Linear(in_features, n_classes)

    def forward(self, x):
        Slow.calls += 1
        if Slow.calls == 30:  # a Ctrl-C in the middle of the first trial
            os.kill(os.getpid(), signal.SIGINT)
        return self.lin(x.flatten(1))


spec = {
    "study": "interrupted",
    "engine": "reference",
    "experiment": {"task": "multiclass", "data": {"source": "sklearn", "name": "digits"},
                   "model": {"class_path": Slow}, "train": {"epochs": 50}},
    "space": {"lr": {"low": 1e-3, "high": 1e-2}},
    "n_trials": 3,
}
handler = signal.getsignal(signal.SIGINT)
try:
    sweeplab.sweep(spec, tracking_uri=URI, storage=STORAGE, quiet=True)
    raised = None
except KeyboardInterrupt as exc:
    raised = type(exc).__name__
client = MlflowClient(URI)
runs = client.search_runs([client.get_experiment_by_name("interrupted").experiment_id])
print(json.dumps({
    "raised": raised,
    "statuses": sorted(r.info.status for r in runs if r.data.tags.get("sweeplab.role") == "trial"),
    "handler_back": signal.getsignal(signal.SIGINT) is handler,
}))
"""


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_raises_keyboard_interrupt_after_the_trial_in_flight_ends_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    body = f"URI = {uri!r}\nSTORAGE = {'journal:' + str(tmp_path / 'o.journal')!r}\n" + CTRL_C
    proc = run_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["raised"] in ("KeyboardInterrupt", "Stopped")  # Stopped is a KeyboardInterrupt
    assert out["statuses"] == ["KILLED"]  # the trial in flight, and no other started
    assert out["handler_back"]


@pytest.mark.slow
def test_objects_with_a_remote_storage_say_that_workers_elsewhere_need_import_paths(tmp_path, capsys):
    def load():
        import numpy as np

        return np.zeros((10, 2), dtype="float32"), np.zeros(10)

    spec = {
        "study": "remote",
        "experiment": {"data": {"source": "python", "class_path": load, "val_size": 2}},
        "space": {"lr": {"low": 0.001, "high": 0.01}},
        "n_trials": 1,
    }
    try:  # nothing listens there: the sweep then fails, after the line
        sweeplab.sweep(spec, tracking_uri=f"sqlite:///{tmp_path / 'r.db'}", storage="postgresql://u@127.0.0.1:9/x")
    except Exception:
        pass
    err = capsys.readouterr().err
    assert "need import paths" in err and "load_" in err


@pytest.mark.slow
def test_the_notebook_in_docs_runs_in_a_jupyter_kernel(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    import make_notebook

    done = make_notebook.execute(make_notebook.notebook(), tmp_path)
    outputs = [o for cell in done.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stderr")
    # what the reader sees: the engine line and the bars; no library warning with a path into site-packages
    # (tqdm's "IProgress not found" without ipywidgets was)
    assert "engine: vectorized" in stderr and "Warning" not in stderr and "site-packages" not in stderr, stderr
    images = [o for o in outputs if "data" in o and "image/png" in o.data]
    assert len(images) == 2  # the trials' scatter and the retrained history
    tables = [
        o.data["text/plain"] for o in outputs if "data" in o and "best_val_accuracy" in o.data.get("text/plain", "")
    ]
    assert tables and "lr" in tables[0] and (tmp_path / "notebook-runs.db").exists()
    # the committed notebook is this one, executed
    committed = json.loads((ROOT / "docs" / "sweeplab_notebook.ipynb").read_text())
    assert ["".join(c["source"]) for c in committed["cells"]] == [c.source for c in done.cells]


MAIN_WRITERS = """\
import json
import numpy as np
from torch import nn
import sweeplab


class Tiny(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, x):
        return self.linear(x)


def wine():
    from sklearn.datasets import load_wine

    data = load_wine()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    return x.astype(np.float32), data.target


spec = {
    "study": "writers",
    "engine": "vectorized",
    "experiment": {
        "task": "multiclass",
        "data": {"source": "python", "class_path": wine},
        "model": {"class_path": Tiny},
        "train": {"epochs": 3},
    },
    "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}},
    "sampler": {"type": "random", "seed": 0},
    "n_trials": 3,
}
result = sweeplab.sweep(spec, tracking_uri=URI, storage=STORAGE, quiet=True)
print(json.dumps({
    "run_ids": result.trials["run_id"].tolist(),
    "columns": list(result.trials.columns),
    "losses": result.trials["best_val_loss"].tolist(),
    "best": float(result.best["best_val_loss"].iloc[0]),
}))
"""


@pytest.mark.slow
def test_trials_written_by_spawned_writer_processes_log_the_notebook_class_s_source(tmp_path, monkeypatch):
    """Vectorized sweeps of more than SWEEPLAB_WRITERS_FROM_TRIALS trials (100 by default; 1 here) write their runs
    in spawned writer processes, which cannot see the notebook's `__main__`: their runs had no code/ and no source
    hash for a class defined there, and a script without `if __name__ == "__main__":` ran its sweep again in each
    writer (spawn re-runs the main module). The sweep process now hands the sources over and hides its main
    module from spawn."""
    import hashlib

    monkeypatch.setenv("SWEEPLAB_WRITERS_FROM_TRIALS", "1")
    uri = f"sqlite:///{tmp_path / 'w.db'}"
    body = f"URI = {uri!r}\nSTORAGE = {'journal:' + str(tmp_path / 'w.journal')!r}\n" + MAIN_WRITERS
    proc = run_script(tmp_path, body)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run_ids = out["run_ids"]
    assert len(run_ids) == 3
    # the default objective (best_val_loss) once, not twice (sort_values refused the doubled column)
    assert out["columns"] == ["trial", "state", "lr", "best_epoch", "best_val_loss", "run_id"]
    assert out["best"] == min(out["losses"])
    client = MlflowClient(uri)
    expected = MAIN_WRITERS[MAIN_WRITERS.index("class Tiny") : MAIN_WRITERS.index("def wine")].rstrip() + "\n"
    for run_id in run_ids:
        text = Path(client.download_artifacts(run_id, "code/__main__.Tiny.py", str(tmp_path))).read_text()
        assert text == expected
        tags = client.get_run(run_id).data.tags
        assert tags["sweeplab.model_source_sha256"] == hashlib.sha256(expected.encode()).hexdigest()
