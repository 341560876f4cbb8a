"""Configs are validated at the edge: every mistake is one line naming the file and the field, exit code 2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sweeplab.cli import main
from sweeplab.config import ConfigError, load_experiment
from sweeplab.train.data import make_dataset
from sweeplab.train.experiment import run_experiment

from reference import seed_run


def _write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body, field, words",
    [
        ("train:\n  lrr: 0.1\n", "train.lrr", "Extra inputs are not permitted"),  # typo
        ("train:\n  epochs: many\n", "train.epochs", "valid integer"),  # wrong type
        ("model:\n  hidden: -4\n", "model.hidden", "positive"),  # negative size
        ("train:\n  batch_size: 0\n", "train.batch_size", "greater than 0"),
        ("train:\n  optimizer: Adamm\n", "train.optimizer", "'Adamm' is not in torch.optim"),
        ("task: ranking\n", "task", "'regression', 'binary' or 'multiclass'"),
        ("device: tpu\n", "device", "auto, cpu, cuda"),
        ("data:\n  source: csv\n", "data", "path: required when source is csv"),
    ],
)
def test_bad_experiment_is_one_line_naming_file_and_field(tmp_path, capsys, body, field, words):
    path = _write(tmp_path, body)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"sweeplab: error: {path}: {field}")
    assert words in err


def test_bad_override_names_the_field(lab_path, capsys):
    assert main(["run", str(lab_path), "lr=-1"]) == 2
    assert "train.lr: Input should be greater than 0 (got -1)" in capsys.readouterr().err
    assert main(["run", str(lab_path), "optimiser=SGD"]) == 2
    assert "optimiser: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["run", str(lab_path), "lr"]) == 2
    assert "override 'lr' is not key=value" in capsys.readouterr().err


def test_missing_file_and_broken_yaml(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"sweeplab: error: {tmp_path / 'nope.yaml'}: no such file"
    assert main(["run", str(_write(tmp_path, "train: [unclosed\n"))]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_exit_code_and_no_traceback_in_a_real_process(tmp_path):
    path = _write(tmp_path, "train:\n  optimizer: Adamm\n")
    proc = subprocess.run([sys.executable, "-m", "sweeplab", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_json_has_the_curves_and_matches_the_seed(lab_path, capsys):
    assert main(["run", str(lab_path), "--json", "epochs=20", "--no-track"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = seed_run(epochs=20)
    assert summary["train_loss"] == expected["train_loss"] and summary["val_loss"] == expected["val_loss"]
    assert summary["best_val"] == expected["best_val"] and summary["best_epoch"] == expected["best_epoch"]
    assert summary["predictions"] == expected["predictions"]


def test_flat_overrides_set_nested_fields(lab_path):
    config = load_experiment(
        lab_path, {"optimizer": "SGD", "lr": 0.05, "hidden": 32, "noise": 1.0, "data.val_size": 0.25, "device": "cpu"}
    )
    assert (config.train.optimizer, config.train.lr, config.model.hidden, config.data.noise) == ("SGD", 0.05, 32, 1.0)
    assert config.data.val_size == 0.25 and config.device == "cpu"


def test_csv_data_round_trips_and_trains(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(50, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 1
    frame = pd.DataFrame(
        {"a": x[:, 0].tolist(), "b": x[:, 1].tolist(), "c": x[:, 2].tolist(), "target": y[:, 0].tolist()}
    )
    frame.to_csv(tmp_path / "data.csv", index=False)
    path = _write(
        tmp_path,
        "data:\n  source: csv\n  path: data.csv\n  target: target\n  val_size: 10\n"
        "predict_x: [[1.0, 2.0, 3.0]]\ntrain:\n  epochs: 5\n",
    )
    config = load_experiment(path)
    dataset = make_dataset(config)
    assert dataset.feature_names == ("a", "b", "c") and dataset.x_train.shape == (40, 3)
    # the split is random_split's permutation with split_seed 42, applied to the rows as written
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(42))
    assert torch.equal(dataset.x_train, x[perm[:40]]) and torch.equal(dataset.y_val, y[perm[40:]])
    assert run_experiment(config).history.epochs_run == 5


def test_csv_errors_name_the_column(tmp_path):
    pd.DataFrame({"a": [1.0, "x"], "y": [1.0, 2.0]}).to_csv(tmp_path / "bad.csv", index=False)
    path = _write(tmp_path, "data:\n  source: csv\n  path: bad.csv\n  target: y\n  val_size: 1\n")
    with pytest.raises(ConfigError, match=r"bad.csv: column 'a' row 3 is not a number: 'x'"):
        make_dataset(load_experiment(path))
    path = _write(tmp_path, "data:\n  source: csv\n  path: bad.csv\n  target: label\n")
    with pytest.raises(ConfigError, match="data.target column 'label' not found"):
        make_dataset(load_experiment(path))


def test_engine_auto_chooses_vectorized_only_when_it_supports_every_trial(tmp_path):
    from sweeplab.sweep.probes import settle
    from sweeplab.sweep.spec import load_sweep as load

    def load_sweep(*args):
        plan = settle(load(*args))
        return plan.sweep, plan.reason

    lab = Path(__file__).resolve().parents[1] / "experiments" / "training_loop_lab.yaml"
    path = tmp_path / "s.yaml"
    path.write_text(f"study: a\nexperiment: {lab}\nspace:\n  hidden: {{choices: [4, 16]}}\nengine: auto\n")
    sweep, reason = load_sweep(path)
    assert sweep.spec.engine == "vectorized" and "supports every trial" in reason
    path.write_text(f"study: a\nexperiment: {lab}\nspace:\n  hidden: {{choices: [4, [8, 8]]}}\nengine: auto\n")
    sweep, reason = load_sweep(path)
    assert sweep.spec.engine == "reference" and "one-hidden-layer" in reason
    assert load_sweep(path, {"engine": "reference"}) == (sweep, "")


def test_tpe_is_asked_in_batches_it_can_learn_between(tmp_path):
    """By hand: 10 random start-up trials in one batch, then the other 10 of 20 in rounds of the TPE batch (8, the
    default; 2 when the file says so: a round is at least that, and ten rounds at most); of 1,000, the 990 after the
    start-up in batches of ceil(990 / 10) = 99. The driver leases no more than the places left."""
    from sweeplab.sweep.batching import batch_size
    from sweeplab.sweep.spec import SweepSpec

    spec = SweepSpec(study="b", space={"hidden": {"choices": [4]}}, n_trials=20, batch_trials=256)
    assert [batch_size(spec, True, asked, 20) for asked in (0, 4, 10, 18)] == [10, 6, 8, 8]
    two = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"batch": 2})})
    assert [batch_size(two, True, asked, 20) for asked in (10, 12)] == [2, 2]
    assert batch_size(spec, True, 10, 1000) == batch_size(two, True, 10, 1000) == 99
    random = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"type": "random"})})
    assert batch_size(random, True, 0, 20) == 256
    assert batch_size(random, False, 0, 20) == 1  # the reference loop trains one trial at a time: none waits


@pytest.mark.parametrize(
    "target, feature, words",
    [
        (["1.0", "", "3.0", "4.0", "5.0", "6.0"], None, "data.target column 'y' row 3 is missing"),
        (["1.0", "2.0", "two", "4.0", "5.0", "6.0"], None, "data.target column 'y' row 4 is not a number: 'two'"),
        (["1.0", "2.0", "3.0", "inf", "5.0", "6.0"], None, "data.target column 'y' row 5 is not a finite number: inf"),
        (["1.0", "2.0", "3.0", "4.0", "5.0", "6.0"], "-inf", "column 'b' row 2 is not a finite number: -inf"),
        # #27.3: finite in float64, infinite in the float32 it trains as
        (["1.0", "2.0", "3.0", "4.0", "5.0", "6.0"], "1e39", "column 'b' row 2 is not a finite number: 1e+39"),
        (
            ["1.0", "2.0", "-1e39", "4.0", "5.0", "6.0"],
            None,
            "data.target column 'y' row 4 is not a finite number: -1e+39",
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_bad_csv_values_are_one_line_before_any_store_is_written(store, capsys, target, feature, words, command):
    """#19.7: NaN, text or inf in the target ended in tracebacks' last lines (exit 1), inf in a feature trained to
    nan, `run` created mlflow.db first, and `sweep` failed its trials one by one."""
    b = [feature or "1.5", "2.5", "3.5", "4.5", "5.5", "6.5"]
    rows = "".join(f"{i},{b[i]},{t}\n" for i, t in enumerate(target))
    (store / "d.csv").write_text("a,b,y\n" + rows)
    (store / "e.yaml").write_text(
        "name: csv\ndata: {source: csv, path: d.csv, target: y, val_size: 2}\ntrain: {epochs: 2}\n"
    )
    (store / "s.yaml").write_text("study: csv\nexperiment: e.yaml\nspace:\n  hidden: {choices: [4, 8]}\nn_trials: 2\n")
    before = sorted(p.name for p in store.iterdir())
    assert main([command, str(store / ("e.yaml" if command == "run" else "s.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "d.csv" in err, err
    assert sorted(p.name for p in store.iterdir()) == before  # no mlflow.db, no journal, no reports


def test_run_on_csv_data_of_any_width_needs_no_predict_x(store, capsys):
    """#19.7: `run` on a CSV whose width is not 2 failed on the seed's default points unless predict_x=[]."""
    (store / "d.csv").write_text("a,b,c,y\n" + "".join(f"{i},{i % 3},{i % 5},{2 * i}\n" for i in range(12)))
    (store / "e.yaml").write_text("data: {source: csv, path: d.csv, target: y, val_size: 3}\ntrain: {epochs: 2}\n")
    assert main(["run", str(store / "e.yaml"), "--no-track"]) == 0
    out = capsys.readouterr().out
    assert "best_epoch:" in out and "predictions:" not in out  # #36.7: no empty `predictions:` line without points


def test_a_billion_laughs_file_is_refused_at_once(store, capsys):
    """#19.7: 1 KB of nested aliases grew to 5.5 GB for 112 s, then MemoryError, exit 1."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    (store / "laugh.yaml").write_text("\n".join(lines) + "\nstudy: x\nspace: {hidden: {choices: [4]}}\n")
    assert main(["sweep", str(store / "laugh.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "laugh.yaml: its aliases (*name) expand to more than 100,000 values; a sweep or experiment "
        "file is a page of YAML"
    )
    (store / "anchors.yaml").write_text("x: &lr {low: 0.001, high: 0.1, log: true}\n")  # a few aliases stay fine
    from sweeplab.config import read_yaml

    assert read_yaml(store / "anchors.yaml")["x"]["low"] == 0.001


def test_a_study_name_that_would_not_fit_a_path_is_refused(store, capsys, lab_path):
    """#19.7: a 300-character study name failed every trial on `File name too long`, leaving runs RUNNING."""
    (store / "s.yaml").write_text(f"study: {'s' * 101}\nexperiment: {lab_path}\nspace: {{hidden: {{choices: [4]}}}}\n")
    assert main(["sweep", str(store / "s.yaml")]) == 2
    assert "study: String should match pattern" in capsys.readouterr().err
    assert sorted(p.name for p in store.iterdir()) == ["s.yaml"]


def test_the_config_layer_imports_neither_torch_nor_optuna_nor_mlflow():
    """Reading and validating an experiment or a sweep is schema work: engine choice lives in engines.py."""
    code = (
        "import sys, sweeplab.sweep.spec as s; s.load_sweep(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'optuna', 'mlflow') if m in sys.modules))"
    )
    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "optimizer_hidden_noise.yaml"
    out = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_training_layer_trains_without_mlflow_or_optuna():
    """#28: `import sweeplab.train` (and everything under it) loads neither MLflow nor Optuna, and trains a run."""
    code = (
        "import sys, pkgutil, importlib, sweeplab.train as t\n"
        "for m in pkgutil.walk_packages(t.__path__, 'sweeplab.train.'): importlib.import_module(m.name)\n"
        "from sweeplab.config import load_experiment\n"
        "from sweeplab.train.experiment import run_experiment\n"
        "run = run_experiment(load_experiment(sys.argv[1], {'epochs': 2}))\n"
        "print(run.history.epochs_run, sorted(m for m in ('optuna', 'mlflow') if m in sys.modules))"
    )
    lab = Path(__file__).resolve().parents[1] / "experiments" / "training_loop_lab.yaml"
    out = subprocess.run([sys.executable, "-c", code, str(lab)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 []"


LAYERS = {"train": 1, "track": 2, "sweep": 3, "report": 3}  # the ground floor is 0; cli, console and the face 4


def _layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else ""
    return LAYERS.get(head, 4 if head in ("", "api", "cli", "console", "__main__") else 0)


def test_no_module_imports_a_layer_above_its_own():
    """#28: train <- track <- sweep, report <- the commands; the ground floor (config, stores, stop, outcome, process)
    imports none of them, and sweep and report import nothing of each other. Every import counts, in a function too."""
    src = Path(__file__).resolve().parents[1] / "src"
    pattern = re.compile(r"^\s*(?:from (sweeplab[\w.]*) import ([\w, ()\n]+)|import (sweeplab[\w.]*))", re.M)
    climbs = []
    for path in (src / "sweeplab").rglob("*.py"):
        module = ".".join(path.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for match in pattern.finditer(path.read_text()):
            targets = [match[1] or match[3]]
            if targets == ["sweeplab"] and match[2]:
                targets = [f"sweeplab.{name.strip()}" for name in match[2].strip("()").split(",") if name.strip()]
            for target in targets:
                if target == "sweeplab.__version__":
                    continue
                mine, theirs = _layer(module), _layer(target)
                sibling = mine == theirs == 3 and module.split(".")[1] != target.split(".")[1]
                if theirs > mine or sibling:
                    climbs.append(f"{module} -> {target}")
    assert climbs == []
    beside = sorted(p.name for p in (src / "sweeplab").iterdir() if not p.name.startswith((".", "__pycache__")))
    assert {"train", "sweep", "track", "report"} <= set(beside) and len(beside) <= 4 + 12


@pytest.mark.parametrize("metric, direction", [("val_loss", "maximize"), ("val_accuracy", "minimize")])
def test_a_direction_that_contradicts_its_metric_is_refused(store, capsys, metric, direction):
    """#27.3: `maximize` with val_loss was accepted, and the champion was then the worst model."""
    (store / "e.yaml").write_text(
        f"name: d\ntask: multiclass\nobjective: {{metric: {metric}, direction: {direction}}}\ntrain: {{epochs: 1}}\n"
    )
    assert main(["run", str(store / "e.yaml"), "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"objective: direction {direction} contradicts {metric}" in err


def test_a_nul_byte_in_a_file_is_one_line(store, capsys):
    """#27.3: a path with a NUL byte ended in `embedded null byte`, exit 1."""
    (store / "e.yaml").write_text('name: n\ndata: {source: csv, path: "a\\0b.csv", target: y}\n')
    assert main(["run", str(store / "e.yaml"), "--no-track"]) == 2
    assert capsys.readouterr().err.strip().endswith("e.yaml: data.path: holds a NUL byte (\\0)")


LABEL_LOADERS = """\
import numpy as np

X = np.random.default_rng(0).normal(size=(60, 3)).astype("float32")


def one_to_k():
    return X, np.arange(60) % 3 + 1


def sparse():
    return X, np.array([0, 5, 1000] * 20)


def strings():
    return X, np.array(["cat", "dog"] * 30)


def cube():
    return X, np.zeros((60, 1, 1))
"""


@pytest.mark.parametrize(
    "loader, task, words",
    [
        ("one_to_k", "multiclass", "got {1, 2, 3}, with no sample of class 0: map them to 0..K-1 first"),
        ("sparse", "multiclass", "got {0, 5, 1000}, with no sample of class 1 and 997 more"),
        ("strings", "multiclass", "y holds <U3 values such as ['cat', 'dog', 'cat'], not numbers: map labels"),
        ("cube", "regression", "targets of shape [60, 1, 1]; task regression takes [N] or [N, outputs]"),
    ],
)
def test_labels_that_are_not_what_the_task_takes_are_one_line_naming_the_loader(store, capsys, loader, task, words):
    """#27.3: labels 1..K trained a head with a never-seen class 0; {0, 5, 1000} a 1001-way head logged as 3 classes;
    strings ended in TypeError (exit 1); [N, 1, 1] targets were blamed on model.class_path."""
    (store / "labels.py").write_text(LABEL_LOADERS)
    (store / "e.yaml").write_text(
        f"name: l\ntask: {task}\ndata: {{source: python, class_path: labels.{loader}}}\ntrain: {{epochs: 1}}\n"
    )
    assert main(["run", str(store / "e.yaml"), "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "data.class_path" in err, err
