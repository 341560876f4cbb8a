"""A user's own model and data (issue #20): their nn.Module by `class_path`, their loader or scikit-learn's bundled
sets, their objective. Every plugin here is a real file the test writes, outside src/, as a user would; the stores
are real (SQLite MLflow, an Optuna journal). Expected numbers come from the seed (its printed table), from the
user's class itself (the checkpoint put back into it), or from a plain computation in the test."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import sklearn.datasets
import torch
from mlflow import MlflowClient

from sweeplab.cli import main
from sweeplab.config import load_experiment
from sweeplab.train.data import make_dataset

from reference import SEED_EXPECTED_OUTPUT

ROOT = Path(__file__).resolve().parents[1]

SEED_REGRESSOR = """\
import torch.nn as nn


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, 16),
            nn.ReLU(),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.net(x)
"""

MY_NETS = '''\
import torch
from torch import nn


class TinyCNN(nn.Module):
    """A user's CNN: in_channels and n_classes are left to sweeplab to fill from the data."""

    def __init__(self, in_channels, n_classes, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(channels * 4 * 4, n_classes)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self, in_features, n_classes):
        super().__init__()
        self.lin = nn.Linear(in_features, n_classes)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)
'''


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_seeds_regressor_as_a_users_class_prints_the_seeds_table(tmp_path):
    write(tmp_path, "seed_model.py", SEED_REGRESSOR)
    lab = (ROOT / "experiments/training_loop_lab.yaml").read_text()
    lab = lab.replace("  hidden: 16", "  class_path: seed_model.Regressor  #").replace("  activation: relu", "")
    experiment = write(tmp_path, "lab.yaml", lab)
    out = subprocess.run(
        [sys.executable, "-m", "sweeplab", "run", str(experiment), "--no-track"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[: len(SEED_EXPECTED_OUTPUT.splitlines())] == SEED_EXPECTED_OUTPUT.splitlines()
    assert "best_epoch: 71" in out


def cnn_project(folder: Path, n_trials: int = 4, epochs: int = 4, model: str = "TinyCNN") -> Path:
    write(folder, "my_nets.py", MY_NETS)
    write(
        folder,
        "cnn.yaml",
        f"""\
        name: tiny_cnn
        task: multiclass
        seed: 3
        data: {{source: sklearn, name: digits, val_size: 0.2}}
        model: {{class_path: my_nets.{model}}}
        train: {{optimizer: Adam, lr: 0.01, epochs: {epochs}, batch_size: 64}}
        objective: {{metric: val_accuracy}}
        """,
    )
    return write(
        folder,
        "sweep.yaml",
        f"""\
        study: tiny_cnn
        experiment: cnn.yaml
        space:
          channels: {{choices: [2, 4]}}
          lr: {{low: 0.002, high: 0.05, log: true}}
        sampler: {{type: random, seed: 1}}
        n_trials: {n_trials}
        """,
    )


@pytest.fixture(scope="module")
def cnn_sweep(tmp_path_factory):
    """The CNN swept from another folder into a store not named mlflow.db."""
    project = tmp_path_factory.mktemp("project")
    sweep = cnn_project(project)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    uri = f"sqlite:///{elsewhere}/tracking.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "sweep",
            str(sweep),
            "--tracking-uri",
            uri,
            "--storage",
            f"journal:{elsewhere}/optuna.journal",
            "--no-report",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return project, elsewhere, uri, proc


@pytest.mark.slow
def test_a_users_cnn_sweeps_with_its_objective(cnn_sweep):
    project, elsewhere, uri, proc = cnn_sweep
    assert "engine: vectorized (auto:" in proc.stdout + proc.stderr  # stacked by torch.func (#21)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny_cnn")
    runs = client.search_runs([experiment.experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    source = (project / "my_nets.py").read_bytes()
    study = optuna.load_study(
        study_name="tiny_cnn",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{elsewhere}/optuna.journal")
        ),
    )
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.metric_names == ["best_val_accuracy"]
    by_number = {t.number: t for t in study.trials}
    for run in runs:
        curve = [
            m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.step)
        ]
        losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)]
        assert len(curve) == len(losses) == 4
        best = max(range(4), key=lambda i: (curve[i], -i))  # the first epoch of the highest accuracy
        metrics = run.data.metrics
        assert metrics["best_epoch"] == best + 1
        assert metrics["best_val_accuracy"] == curve[best] and metrics["best_val_loss"] == losses[best]
        trial = by_number[int(run.data.tags["sweeplab.trial_number"])]
        assert trial.value == curve[best]
        assert list(trial.intermediate_values.values()) == curve
        # what code it trained: the module's source, and its hash as a tag
        assert run.data.tags["sweeplab.model_class"] == "my_nets.TinyCNN"
        assert run.data.tags["sweeplab.model_source_sha256"] == hashlib.sha256(source).hexdigest()
        downloads = elsewhere / "downloads" / run.info.run_id
        downloads.mkdir(parents=True)
        logged = client.download_artifacts(run.info.run_id, "code/my_nets.py", str(downloads))
        assert Path(logged).read_bytes() == source
    champion = client.get_model_version_by_alias("tiny_cnn", "champion")
    best_run = max(
        runs, key=lambda r: (r.data.metrics["best_val_accuracy"], -int(r.data.tags["sweeplab.trial_number"]))
    )
    assert champion.run_id == best_run.info.run_id
    spec = json.loads(champion.tags["sweeplab.model_spec"])  # #27.6: the user's class, not the MLP's sizes
    assert spec["class_path"] == "my_nets.TinyCNN" and spec["input_shape"] == [1, 8, 8]
    assert "hidden" not in spec and "activation" not in spec and spec["init_args"]["n_classes"] == 10


@pytest.mark.slow
def test_the_champion_loads_without_sweeplab_or_the_users_module(cnn_sweep):
    project, elsewhere, uri, _ = cnn_sweep
    client = MlflowClient(uri)
    run_id = client.get_model_version_by_alias("tiny_cnn", "champion").run_id
    images = sklearn.datasets.load_digits().images[:40].reshape(40, 1, 8, 8).astype(np.float64)
    np.save(elsewhere / "images.npy", images)
    # the expected classes: the best checkpoint put back into the user's own class
    downloads = elsewhere / "champion"
    downloads.mkdir()
    checkpoint = torch.load(client.download_artifacts(run_id, "checkpoint/best.pt", str(downloads)), weights_only=True)
    sys.path.insert(0, str(project))
    try:
        import my_nets
    finally:
        sys.path.remove(str(project))
    model = my_nets.TinyCNN(**checkpoint["model_spec"]["init_args"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    with torch.no_grad():
        expected = model(torch.tensor(images, dtype=torch.float32)).argmax(1).tolist()
    script = textwrap.dedent(f"""\
        import sys, json
        sys.modules['sweeplab'] = None; sys.modules['my_nets'] = None  # neither can be imported here
        import mlflow, numpy as np
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/tiny_cnn@champion")
        x = np.load("images.npy")
        labels = model.predict(x).tolist()
        probs = model.predict(x, params={{"output": "probabilities"}})
        inputs = model.metadata.signature.inputs
        alike = [model.predict(v).tolist() == labels for v in (x.astype("float32"), x.astype("int64"), x.reshape(len(x), 64))]
        refused = []
        for bad in (x.reshape(len(x), 8, 8), np.full((1, 64), 1e39)):
            try:
                model.predict(bad)
            except Exception as exc:
                refused.append(str(exc))
        print(json.dumps({{"labels": labels, "columns": list(probs.columns), "sums": probs.sum(axis=1).tolist(),
                          "inputs": inputs, "alike": alike, "refused": refused,
                          "metadata": sorted(model.metadata.metadata)}}))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["labels"] == expected
    assert out["columns"] == [str(c) for c in range(10)]
    assert all(abs(s - 1) < 1e-9 for s in out["sums"])
    assert out["inputs"] is None  # no schema: float32, integer and flat rows are taken too (#27.6)
    assert out["alike"] == [True, True, True]
    assert out["refused"] == [
        "input: an array of shape [40, 8, 8]; the model takes [N, 1, 8, 8] or rows of 64 values",
        "input: row 0, column pixel_0_0: '1e+39' is not a finite number (NaN, infinity, or beyond float32)",
    ]
    assert "feature_names" not in out["metadata"] and "input_shape" in out["metadata"]


@pytest.mark.slow
def test_predict_rebuilds_the_users_class_where_its_module_is(cnn_sweep, capsys, monkeypatch):
    project, elsewhere, uri, _ = cnn_sweep
    images = sklearn.datasets.load_digits().images[:3].reshape(3, 1, 8, 8).tolist()
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(json.dumps(images)))
    assert main(["predict", "tiny_cnn", "--tracking-uri", uri, "--json", "-"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["prediction"] for p in predictions] == [0, 1, 2]  # the first three digits, as a trained CNN reads them
    # in a fresh process, from a folder without the module: the champion needs none (issue #27.5), a run does
    champion = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "predict",
            "models:/tiny_cnn@champion",
            "--tracking-uri",
            uri,
            "--json",
            "-",
        ],
        cwd=elsewhere,
        input=json.dumps(images),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert champion.returncode == 0, champion.stderr
    assert [p["prediction"] for p in json.loads(champion.stdout)["predictions"]] == [0, 1, 2]
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "predict", "tiny_cnn", "--tracking-uri", uri, "-"],
        cwd=elsewhere,
        input=json.dumps(images),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (
        "sweeplab: error: the run trained my_nets.TinyCNN; no module 'my_nets' in this folder or on sys.path (run "
        "from the folder that holds it or predict through its registered champion, models:/tiny_cnn@champion)"
    )


@pytest.mark.slow
def test_predict_imports_a_runs_module_only_when_its_source_is_the_logged_one(cnn_sweep, tmp_path):
    """Issue #27.4: a module of the same name whose source differs from what the run logged is not imported (its
    top-level code would run before any check of the weights); the printed predict line without input predicts
    the run's own example inputs and says so."""
    project, elsewhere, uri, _ = cnn_sweep
    (tmp_path / "my_nets.py").write_text("print('EVIL RAN')\n" + (project / "my_nets.py").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "predict", "tiny_cnn", "--tracking-uri", uri, "--x", ",".join(["1"] * 64)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "EVIL RAN" not in proc.stdout + proc.stderr
    assert "my_nets.py: not the source the run trained my_nets from (its sha256 differs from the run's)" in proc.stderr
    # no input: the champion predicts the run's logged validation inputs (8 rows), from a folder without the module
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "predict", "models:/tiny_cnn@champion", "--tracking-uri", uri, "--json"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["predictions"]) == 8
    assert "note: no input given: predicting the 8 validation inputs logged with run" in proc.stderr


def _best_run(uri: str, study: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], "tags.`sweeplab.role` = 'trial'")
    return max(runs, key=lambda r: r.data.metrics.get("best_val_accuracy", -1))


def _artifacts(run) -> Path:
    return Path(run.info.artifact_uri.removeprefix("file://"))


@pytest.mark.slow
def test_predict_run_refuses_a_package_that_shadows_the_module_or_wraps_it_before_running_it(cnn_sweep, tmp_path):
    """#36.2: a package folder `my_nets/` beside the genuine my_nets.py was imported (the file was hashed), and a
    checkpoint whose class_path was `evilpkg.my_nets.TinyCNN` ran `evilpkg/__init__.py` (the leaf was hashed)."""
    project, _, uri, _ = cnn_sweep
    run = _best_run(uri, "tiny_cnn")
    recorded = json.loads(run.data.tags["sweeplab.model_sources"])
    assert recorded == {"my_nets": hashlib.sha256((project / "my_nets.py").read_bytes()).hexdigest()}
    shadow = tmp_path / "shadow"
    (shadow / "my_nets").mkdir(parents=True)
    (shadow / "my_nets.py").write_text((project / "my_nets.py").read_text())  # the genuine file, beside a package
    (shadow / "my_nets" / "__init__.py").write_text("print('EVIL RAN')\n" + (project / "my_nets.py").read_text())
    argv = [sys.executable, "-m", "sweeplab", "predict", run.info.run_id, "--tracking-uri", uri, "--x", "1," * 63 + "1"]
    proc = subprocess.run(argv, cwd=shadow, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "EVIL RAN" not in proc.stdout + proc.stderr and len(lines) == 1, proc.stderr
    assert f"{shadow}/my_nets/__init__.py: not the source the run trained my_nets from" in lines[0]
    # the checkpoint says evilpkg.my_nets.TinyCNN; evilpkg/my_nets.py is the genuine file, evilpkg/__init__.py not
    wrapped = tmp_path / "wrapped"
    (wrapped / "evilpkg").mkdir(parents=True)
    (wrapped / "evilpkg" / "__init__.py").write_text("print('EVIL RAN')\n")
    (wrapped / "evilpkg" / "my_nets.py").write_text((project / "my_nets.py").read_text())
    best = _artifacts(run) / "checkpoint" / "best.pt"
    original = best.read_bytes()
    payload = torch.load(best, weights_only=True)
    payload["model_spec"]["class_path"] = "evilpkg.my_nets.TinyCNN"
    try:
        torch.save(payload, best)
        proc = subprocess.run(argv, cwd=wrapped, capture_output=True, text=True, timeout=120)
    finally:
        best.write_bytes(original)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "EVIL RAN" not in proc.stdout + proc.stderr and len(lines) == 1, proc.stderr
    assert f"{wrapped}/evilpkg/__init__.py: the package evilpkg, which the run did not record" in lines[0]


@pytest.mark.slow
def test_a_model_torch_export_cannot_trace_gets_a_champion_rebuilt_from_its_logged_source(tmp_path):
    """#30: it was registered as its checkpoint, which mlflow.pyfunc.load_model refused (no MLmodel file); now its
    champion is a pyfunc with the logged module in code_paths, which mlflow loads where the module is not found."""
    sweep = cnn_project(tmp_path, n_trials=1, epochs=2, model="Branchy")
    sweep.write_text(sweep.read_text().replace("channels: {choices: [2, 4]}", "seed: {choices: [3]}"))
    uri = f"sqlite:///{tmp_path}/t.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "sweep",
            str(sweep),
            "--tracking-uri",
            uri,
            "--storage",
            f"journal:{tmp_path}/j.journal",
            "--no-report",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "torch.export cannot trace" in line]
    assert len(said) == 1 and "the champion rebuilds my_nets.Branchy from its logged source" in said[0]
    assert "def forward(" not in proc.stderr and "symbolic_shapes" not in proc.stderr  # #36.6: no FX graph dumped
    version = MlflowClient(uri).get_model_version_by_alias("tiny_cnn", "champion")
    assert "sweeplab.export" not in version.tags
    rows = sklearn.datasets.load_digits().data[:2].tolist()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import sys, json, numpy as np, mlflow; sys.modules['sweeplab'] = None; "
        "import importlib.util; assert importlib.util.find_spec('my_nets') is None; "
        f"mlflow.set_tracking_uri({uri!r}); model = mlflow.pyfunc.load_model('models:/tiny_cnn@champion'); "
        f"print(json.dumps(np.asarray(model.predict(np.array({rows!r}))).tolist()))"
    )
    loaded = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert len(json.loads(loaded.stdout.strip().splitlines()[-1])) == 2
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "predict",
            "models:/tiny_cnn@champion",
            "--tracking-uri",
            uri,
            "--json",
            "--x",
            ",".join(map(str, rows[0])),
            "--x",
            ",".join(map(str, rows[1])),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["predictions"]) == 2
    # #36.2: the logged source appended to in the artifact store: `predict` of the champion checks it against the
    # run's tag before importing it (it ran, exit 0); the pyfunc checks its shipped copy before importing it
    run_id = version.tags["sweeplab.source_run_id"]
    logged = _artifacts(MlflowClient(uri).get_run(run_id)) / "code" / "my_nets.py"
    logged.write_text(logged.read_text() + "\nprint('EVIL RAN')\n")
    argv = [sys.executable, "-m", "sweeplab", "predict", "models:/tiny_cnn@champion", "--tracking-uri", uri]
    out = subprocess.run([*argv, "--x", ",".join(map(str, rows[0]))], cwd=elsewhere, capture_output=True, text=True)
    assert out.returncode == 2 and "EVIL RAN" not in out.stdout + out.stderr, out.stderr
    assert "my_nets.py: not the source the run trained my_nets from (its sha256 differs" in out.stderr
    loaded = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stderr[-2000:]  # the pyfunc's own copy is intact: it still loads
    copies = [p for p in tmp_path.rglob("my_nets.py") if "code" in p.parts and p != logged]
    assert copies  # the registered model's own code/ folder
    for copy in copies:
        copy.write_text(copy.read_text() + "\nprint('EVIL RAN')\n")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=180)
    assert loaded.returncode != 0 and "EVIL RAN" not in loaded.stdout + loaded.stderr
    assert "is not the source this model was logged with" in loaded.stderr


BAD_MODELS = {
    "missing.Net": "model.class_path: no module 'missing' beside the experiment file",
    "my_nets.Nope": "model.class_path: module my_nets",
    "my_nets.NotAModule": "model.class_path: my_nets.NotAModule is a class, not a torch.nn.Module subclass",
    "my_nets.Raises": "model.class_path: my_nets.Raises() raised ValueError: no such width (my_nets.py line",
    "my_nets.Frozen": "model.class_path: my_nets.Frozen has no trainable parameters",
    "my_nets.ThreeOut": "forward gave [2, 3] for a batch of [2, 1, 8, 8]; task multiclass needs [2, 10]",
    "my_nets.BadForward": "model.class_path: my_nets.BadForward: forward on a batch of [2, 1, 8, 8] raised RuntimeError",
    "broken.Net": "model.class_path: importing broken raised RuntimeError: configure me first (broken.py line 1)",
    "my_nets": "model.class_path: an import path, module.ClassName",
}

BAD_NETS = """\
import torch
from torch import nn


class NotAModule:
    pass


class Raises(nn.Module):
    def __init__(self):
        raise ValueError("no such width")


class Frozen(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


class ThreeOut(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.lin = nn.Linear(in_features, 3)

    def forward(self, x):
        return self.lin(x.flatten(1))


class BadForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 10)

    def forward(self, x):
        return self.lin(x)


class Fine(nn.Module):
    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        if width < 1:
            raise ValueError("width must be positive")
        self.lin = nn.Linear(in_features, n_classes)

    def forward(self, x):
        return self.lin(x.flatten(1))
"""


def bad_project(folder: Path, model: str, space: str = "seed: {choices: [0]}") -> Path:
    write(folder, "my_nets.py", BAD_NETS)
    write(folder, "broken.py", 'raise RuntimeError("configure me first")\n')
    write(
        folder,
        "exp.yaml",
        f"""\
        name: bad
        data: {{source: sklearn, name: digits, val_size: 0.2}}
        model: {{class_path: {model}}}
        train: {{epochs: 1}}
        """,
    )
    return write(folder, "sweep.yaml", f"study: bad\nexperiment: exp.yaml\nspace:\n  {space}\nn_trials: 2\n")


def assert_refused_before_writing(folder: Path, argv: list[str], expected: str, capsys) -> None:
    before = sorted(p.name for p in folder.iterdir())
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == [
        n for n in before if n != "__pycache__"
    ]  # no store, journal or artifact folder


@pytest.mark.parametrize("model", BAD_MODELS)
def test_a_bad_plugin_is_one_line_and_nothing_written(store, capsys, model):
    sweep = bad_project(store, model)
    argv = [
        "sweep",
        str(sweep),
        "--tracking-uri",
        f"sqlite:///{store}/runs.db",
        "--storage",
        f"journal:{store}/optuna.journal",
    ]
    assert_refused_before_writing(store, argv, BAD_MODELS[model], capsys)
    assert capsys.readouterr().err == ""
    argv = ["run", str(store / "exp.yaml"), "--tracking-uri", f"sqlite:///{store}/runs.db"]
    assert_refused_before_writing(store, argv, BAD_MODELS[model], capsys)


@pytest.mark.parametrize(
    "space, expected",
    [
        (
            "width: {choices: [8, 0]}",
            "my_nets.Fine(width=0, in_features=64, n_classes=10) raised ValueError: width must be positive",
        ),
        ("widht: {choices: [8]}", "model.init_args: my_nets.Fine takes no argument 'widht'"),
    ],
)
def test_a_searched_init_arg_is_checked_at_both_ends(store, capsys, space, expected):
    sweep = bad_project(store, "my_nets.Fine", space)
    argv = [
        "sweep",
        str(sweep),
        "--tracking-uri",
        f"sqlite:///{store}/runs.db",
        "--storage",
        f"journal:{store}/optuna.journal",
    ]
    assert_refused_before_writing(store, argv, expected, capsys)


LOADERS = """\
import numpy as np
import torch
from sklearn.datasets import load_wine


def pair():
    d = load_wine()
    return torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)


def arrays():
    d = load_wine()
    return d.data, d.target


def split(n_val=30):
    x, y = pair()
    return {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])}


class Wine(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = pair()
        self.targets = self.y  # torchvision's convention: the labels, without reading the items

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def not_data():
    return "wine"


def with_nan():
    x, y = pair()
    x[5, 2] = float("nan")
    return x, y
"""


@pytest.mark.parametrize("loader", ["pair", "arrays", "Wine", "Wine-lazy"])
def test_a_users_loader_is_split_as_random_split_splits(tmp_path, loader, monkeypatch):
    """A small map-style Dataset is read into tensors once (#40: so it stacks); above the memory budget (here
    SWEEPLAB_IN_MEMORY_MB=0) it is split by indices and read lazily."""
    if loader == "Wine-lazy":
        monkeypatch.setenv("SWEEPLAB_IN_MEMORY_MB", "0")
        loader = "Wine"
    lazy = os.environ.get("SWEEPLAB_IN_MEMORY_MB") == "0"
    write(tmp_path, "loaders.py", LOADERS)
    path = write(
        tmp_path,
        "exp.yaml",
        f"""\
        task: multiclass
        data: {{source: python, class_path: loaders.{loader}, val_size: 0.25, split_seed: 5}}
        """,
    )
    dataset = make_dataset(load_experiment(path))
    wine = sklearn.datasets.load_wine()
    x, y = torch.tensor(wine.data, dtype=torch.float32), torch.tensor(wine.target)
    subsets = torch.utils.data.random_split(
        torch.utils.data.TensorDataset(x, y), [0.75, 0.25], generator=torch.Generator().manual_seed(5)
    )
    train_idx, val_idx = (torch.tensor(s.indices) for s in subsets)
    if lazy:  # a map-style Dataset is split by indices and read lazily, not read into tensors
        assert dataset.lazy and dataset.x_train is None
        assert dataset.train_set.indices.tolist() == train_idx.tolist()
        assert dataset.val_set.indices.tolist() == val_idx.tolist()
        xs = torch.stack([dataset.train_set[i][0] for i in range(len(dataset.train_set))])
        assert torch.equal(xs, x[train_idx]) and torch.equal(dataset.y_train, y[train_idx])
    else:
        assert not dataset.lazy
        assert torch.equal(dataset.x_train, x[train_idx]) and torch.equal(dataset.y_train, y[train_idx])
        assert torch.equal(dataset.x_val, x[val_idx]) and torch.equal(dataset.y_val, y[val_idx])
    assert dataset.n_outputs == 3 and dataset.input_shape == (13,)


def test_a_loader_may_give_its_own_split_and_a_condition_may_shrink_it(tmp_path):
    write(tmp_path, "loaders.py", LOADERS)
    path = write(
        tmp_path,
        "exp.yaml",
        """\
        task: multiclass
        data: {source: python, class_path: loaders.split, init_args: {n_val: 40}, train_fraction: 0.5}
        """,
    )
    dataset = make_dataset(load_experiment(path))
    x = torch.tensor(sklearn.datasets.load_wine().data, dtype=torch.float32)
    assert torch.equal(dataset.x_val, x[:40])
    assert torch.equal(dataset.x_train, x[40 : 40 + math.floor(138 * 0.5)])


@pytest.mark.parametrize(
    "loader, expected",
    [
        ("not_data", "data.class_path: loaders.not_data() returned str; give (X, y)"),
        ("with_nan", "data.class_path: loaders.with_nan(): X holds NaN or infinite values"),
        ("gone", "data.class_path: module loaders"),
    ],
)
def test_a_bad_loader_is_one_line_and_nothing_written(store, capsys, loader, expected):
    write(store, "loaders.py", LOADERS)
    write(store, "exp.yaml", f"task: multiclass\ndata: {{source: python, class_path: loaders.{loader}}}\n")
    assert_refused_before_writing(store, ["run", str(store / "exp.yaml")], expected, capsys)


@pytest.mark.parametrize(
    "name, task, shape, n_outputs",
    [
        ("digits", "multiclass", (1, 8, 8), 10),
        ("iris", "multiclass", (4,), 3),
        ("wine", "multiclass", (13,), 3),
        ("breast_cancer", "binary", (30,), 1),
        ("diabetes", "regression", (10,), 1),
    ],
)
def test_scikit_learns_bundled_sets_by_name(tmp_path, name, task, shape, n_outputs):
    path = write(tmp_path, "exp.yaml", f"data: {{source: sklearn, name: {name}, val_size: 0.2}}\n")
    config = load_experiment(path)
    assert config.task == task  # the set's own task, unless the file says otherwise
    dataset = make_dataset(config)
    bunch = getattr(sklearn.datasets, f"load_{name}")()
    assert dataset.input_shape == shape and dataset.n_outputs == n_outputs
    assert len(dataset.x_train) + len(dataset.x_val) == len(bunch.target)
    assert len(dataset.x_val) == math.floor(len(bunch.target) * 0.2)
    raw = bunch.images[:, None] if name == "digits" else bunch.data
    together = torch.cat([dataset.x_train, dataset.x_val]).double()
    assert sorted(together.sum(dim=tuple(range(1, together.dim()))).tolist()) == pytest.approx(
        sorted(raw.reshape(len(raw), -1).sum(1).tolist()), rel=1e-6, abs=1e-6
    )


def test_the_objective_follows_both_engines_for_the_mlp(tmp_path):
    """val_accuracy as the objective with the built-in MLP: the vectorized engine picks each member's best epoch by
    the first highest accuracy, as the reference loop does."""
    from sweeplab.sweep.spec import load_sweep
    from sweeplab.train.engines import Job, engine_named

    write(
        tmp_path,
        "exp.yaml",
        """\
        task: multiclass
        data: {source: sklearn, name: iris, val_size: 0.3}
        model: {hidden: 8}
        train: {epochs: 25, lr: 0.01}
        objective: {metric: val_accuracy}
        """,
    )
    sweep = load_sweep(
        write(
            tmp_path,
            "s.yaml",
            "study: s\nexperiment: exp.yaml\nspace:\n  lr: {choices: [0.003, 0.01, 0.03]}\nengine: vectorized\n",
        )
    )
    configs = [sweep.config_for({"lr": lr}) for lr in (0.003, 0.01, 0.03)]
    reference = [Job(None, c) for c in configs]
    vectorized = [Job(None, c) for c in configs]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(vectorized, None)
    for ref, vec in zip(reference, vectorized):
        accuracy = ref.result.history.metrics["val_accuracy"]
        first_best = max(range(len(accuracy)), key=lambda i: (accuracy[i], -i)) + 1
        assert ref.result.history.best_epoch == vec.result.history.best_epoch == first_best
        assert ref.result.history.best_value == vec.result.history.best_value == max(accuracy)


# --- issue #27.3: user code that tries to end, hang or print into the process -----------------------------------

MISBEHAVING = {
    "exits.py": "import sys\nsys.exit()\n",
    "interrupts.py": "raise KeyboardInterrupt\n",
    "exits_in_init.py": "import sys\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n"
    "        super().__init__()\n        sys.exit(3)\n",
    "lingers.py": "import threading\nimport time\n\nfrom torch import nn\n\n"
    "threading.Thread(target=lambda: time.sleep(10**6)).start()\nprint('hello from the module')\n\n\n"
    "class Net(nn.Module):\n    def __init__(self, in_features, out_features):\n        super().__init__()\n"
    "        self.lin = nn.Linear(in_features, out_features)\n\n    def forward(self, x):\n        return self.lin(x)\n",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, said",
    [
        ("exits", "importing exits called sys.exit(None) (exits.py line 2): user code must not end the process"),
        ("interrupts", "importing interrupts raised KeyboardInterrupt (interrupts.py line 1)"),
        (
            "exits_in_init",
            "exits_in_init.Net() called sys.exit(3) (exits_in_init.py line 8): user code must not end the process",
        ),
    ],
)
def test_a_module_that_ends_the_process_is_bad_input(tmp_path, module, said):
    for name, text in MISBEHAVING.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "exp.yaml").write_text(f"name: e\nmodel: {{class_path: {module}.Net}}\ntrain: {{epochs: 2}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "run", "exp.yaml", "--no-track"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(said), proc.stderr
    assert "exp.yaml: model.class_path" in proc.stderr


@pytest.mark.slow
def test_a_module_that_starts_a_thread_and_prints_neither_hangs_nor_corrupts_json(tmp_path):
    for name, text in MISBEHAVING.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "exp.yaml").write_text("name: e\nmodel: {class_path: lingers.Net}\ntrain: {epochs: 2}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "run", "exp.yaml", "--no-track", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,  # before the fix: never returned
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["status"] == "completed"  # the module's print went to stderr
    assert "hello from the module" in proc.stderr


def test_a_study_resumed_after_its_model_source_changed_is_refused(tmp_path, capsys):
    """#27.3: relu -> tanh in the user's file, then the same study resumed: both were ranked in one table (the runs'
    sweeplab.model_source_sha256 tags differed, and nothing was said). And a `sweeplab run` of an experiment
    named like the study is not one of its trials in the report."""
    sweep = cnn_project(tmp_path, n_trials=2, epochs=1)
    uri = f"sqlite:///{tmp_path}/t.db"
    storage = f"journal:{tmp_path}/j.journal"
    args = ["--tracking-uri", uri, "--storage", storage, "--no-report", "--quiet"]
    assert main(["sweep", str(sweep), *args]) == 0
    assert main(["run", str(tmp_path / "cnn.yaml"), "--tracking-uri", uri, "epochs=1"]) == 0  # experiment tiny_cnn
    from sweeplab.report.load import load_runs

    trials = load_runs("tiny_cnn", uri).trials
    assert sorted(trials["trial"]) == [0, 1]
    capsys.readouterr()
    nets = tmp_path / "my_nets.py"
    nets.write_text(nets.read_text().replace("torch.relu", "torch.tanh"))
    assert main(["sweep", str(sweep), "n_trials=4", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ran its trials with other code: module my_nets changed since" in err
    assert "Start a new study (study=NAME)" in err


@pytest.mark.slow
def test_ctrl_c_stops_a_slow_constructor_at_once(tmp_path):
    """#27.3: a model taking 60 s in __init__ held Ctrl-C for those 60 s and built another model after them (105 s
    to exit). A constructor writes to no store, so a stop raises there at once: exit 130 within seconds."""
    (tmp_path / "slow.py").write_text(
        "import time\nfrom torch import nn\n\nCALLS = [0]\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, in_features, out_features):\n        super().__init__()\n        CALLS[0] += 1\n"
        "        if CALLS[0] >= 4:  # the checks before any store build it 3 times; then the trial's build\n"
        "            time.sleep(600)\n        self.lin = nn.Linear(in_features, out_features)\n\n"
        "    def forward(self, x):\n        return self.lin(x)\n"
    )
    (tmp_path / "e.yaml").write_text("name: slow\nmodel: {class_path: slow.Net}\ntrain: {epochs: 2}\n")
    (tmp_path / "s.yaml").write_text(
        "study: slow\nexperiment: e.yaml\nspace:\n  lr: {choices: [0.01, 0.02]}\nsampler: {type: grid}\nn_trials: 2\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweeplab", "sweep", "s.yaml", "--no-report"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "mlflow.db").exists():  # the stores exist: the trials are building their models
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - started < 20, err
    assert err.strip().splitlines()[-1].startswith("sweeplab: interrupted")
