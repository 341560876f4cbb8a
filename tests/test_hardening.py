"""Issue #36: defects found trying sweeplab as users and as an attacker would. Each expectation here (the exit code,
the one line, what the stores hold) is written by hand from the issue, not read back from the code."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

SWEEPLAB = str(Path(sys.executable).parent / "sweeplab")

LOADERS = """\
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes


def _cancer():
    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(d.target)


def one_class_val():
    x, y = _cancer()
    val = (y == 0).nonzero().flatten()[:40]  # 40 malignant cases, no benign one
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    return {"train": (x[keep], y[keep]), "val": (x[val], y[val])}


def cancer():
    return _cancer()


def constant_val():
    d = load_diabetes()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32)
    return {"train": (x[30:], y[30:]), "val": (x[:30], torch.full((30,), 140.0))}
"""

METRICS = """\
def always_nan(outputs, targets):
    return float("nan")


def always_inf(outputs, targets):
    return float("inf")
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def sweeplab(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SWEEPLAB, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def project(folder: Path, task: str, loader: str, objective: str, extra: str = "", n_trials: int = 4) -> Path:
    write(folder, "loaders.py", LOADERS)
    write(folder, "my_metrics.py", METRICS)
    write(
        folder,
        "exp.yaml",
        f"name: e\ntask: {task}\ndata: {{source: python, class_path: loaders.{loader}}}\n"
        f"train: {{epochs: 3}}\nobjective: {{metric: {objective}}}\n{extra}",
    )
    return write(
        folder,
        "sweep.yaml",
        "study: nan_study\nexperiment: exp.yaml\nspace:\n  lr: {low: 1.0e-3, high: 1.0e-1, log: true}\n"
        f"sampler: {{type: random, seed: 0}}\nn_trials: {n_trials}\n",
    )


# --- 1. an objective that is undefined is bad input; one NaN at every epoch is a failed trial ---------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, loader, objective, expected",
    [
        (
            "binary",
            "one_class_val",
            "val_auroc",
            "sweep.yaml: objective.metric: val_auroc is undefined on the validation split: its 40 samples are all "
            "class 0",
        ),
        (
            "binary",
            "one_class_val",
            "val_average_precision",
            "objective.metric: val_average_precision is undefined on the validation split: its 40 samples are all "
            "class 0",
        ),
        (
            "regression",
            "constant_val",
            "val_r2",
            "objective.metric: val_r2 is undefined on the validation split: its 30 targets all equal 140",
        ),
    ],
)
def test_a_validation_split_that_leaves_the_objective_undefined_is_one_line_before_any_store(
    tmp_path, task, loader, objective, expected
):
    project(tmp_path, task, loader, objective)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = sweeplab("sweep", "sweep.yaml", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before  # no store, no journal
    run = sweeplab("run", "exp.yaml", "--no-track", cwd=tmp_path)  # `sweeplab run` checks it the same way
    assert run.returncode == 2 and expected.replace("sweep.yaml: ", "") in run.stderr, run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("metric, direction", [("always_nan", "maximize"), ("always_inf", "maximize")])
def test_a_trial_whose_objective_is_never_finite_fails_and_the_sweep_stops_after_three(tmp_path, metric, direction):
    """352 trials in 90 s for n_trials: 4 before the fix: Optuna failed each trial while its run said completed."""
    extra = f"metrics:\n  - {{name: val_odd, class_path: my_metrics.{metric}, direction: {direction}}}\n"
    project(tmp_path, "binary", "cancer", "val_odd", extra)
    proc = sweeplab("sweep", "sweep.yaml", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path, timeout=240)
    value = "nan" if metric == "always_nan" else "inf"
    reason = f"val_odd was not finite at any of its 3 epochs (the last: {value}): no best epoch"
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"sweeplab: error: 3 trials in a row failed; the last: {reason}"
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    trials = optuna.load_study(study_name="nan_study", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 3  # three tries, not hundreds
    client = MlflowClient(f"sqlite:///{tmp_path}/runs.db")
    runs = client.search_runs([client.get_experiment_by_name("nan_study").experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("sweeplab.role") == "trial"]
    assert len(trial_runs) == 3
    for run in trial_runs:  # MLflow and Optuna agree: the run FAILED with the same reason, and has no best_*
        assert run.info.status == "FAILED" and run.data.tags["sweeplab.outcome"] == "failed"
        assert run.data.tags["sweeplab.reason"] == reason
        assert "best_val_loss" not in run.data.metrics
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in trial_runs}


# --- 3. a resume that would mix incomparable trials is refused ---------------------------------------------------

LAB = Path(__file__).resolve().parents[1] / "experiments" / "training_loop_lab.yaml"

HELPER = "import torch\n\n\ndef act(x):\n    return torch.relu(x)\n"
NET = """\
from torch import nn

from layers import act


class Net(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.a, self.b = nn.Linear(in_features, 8), nn.Linear(8, out_features)

    def forward(self, x):
        return self.b(act(self.a(x)))
"""


def resumable(folder: Path, train: str = "", model: str = "") -> Path:
    lab = LAB.read_text().replace("  epochs: 80", "  epochs: 2")
    if model:
        lab = lab.replace("  hidden: 16", f"  class_path: {model}  #").replace("  activation: relu", "")
    write(folder, "exp.yaml", lab + (f"{train}\n" if train else ""))
    return write(
        folder,
        "sweep.yaml",
        "study: resumed\nexperiment: exp.yaml\nspace:\n  lr: {low: 1.0e-3, high: 1.0e-1, log: true}\n"
        "  seed: {choices: [1, 2]}\n"
        "sampler: {type: random, seed: 0}\nn_trials: 1\n",
    )


def with_train(folder: Path, lines: str) -> None:
    text = (folder / "exp.yaml").read_text()
    if lines.startswith("optimizer:"):
        text = text.replace("  optimizer: Adam\n", "")
    text = text.replace("train:\n", f"train:\n{textwrap.indent(lines, '  ')}")
    (folder / "exp.yaml").write_text(text)


RESUME_ARGS = ["--tracking-uri", "sqlite:///runs.db", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def swept_once(tmp_path_factory):
    """The resumable sweep's first run (1 trial), copied into each test that changes something else than the model."""
    folder = tmp_path_factory.mktemp("resumed")
    resumable(folder)
    first = sweeplab("sweep", "sweep.yaml", *RESUME_ARGS, cwd=folder)
    assert first.returncode == 0, first.stderr
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, said",
    [
        (
            "scheduler: {class_path: StepLR, init_args: {step_size: 1}}\n",
            "ran its trials with scheduler=null; this sweep gives scheduler={",
        ),
        ("early_stopping: {patience: 3}\n", "ran its trials with early_stopping=null"),
        (
            "loss: {class_path: HuberLoss}\n",
            'ran its trials with loss=mse; this sweep gives loss={"class_path": "HuberLoss"',
        ),
        ("optimizer: {class_path: NAdam}\n", "ran its trials with optimizer=Adam"),
        ("helper", "module layers changed since"),
        ("pinned", "already searched lr over"),
    ],
)
def test_a_resume_that_changes_what_a_trial_means_is_refused(tmp_path, swept_once, change, said):
    """Before the fix each of these resumed (exit 0) and ranked the new trials among the old."""
    args = RESUME_ARGS
    if change == "helper":  # its own first sweep, of a model in a module that imports another
        write(tmp_path, "layers.py", HELPER)
        write(tmp_path, "nets.py", NET)
        resumable(tmp_path, model="nets.Net")
        first = sweeplab("sweep", "sweep.yaml", *args, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
    else:
        shutil.copytree(swept_once, tmp_path, dirs_exist_ok=True)
    extra = []
    if change == "helper":  # the model's module is unchanged; the module it imports is not
        write(tmp_path, "layers.py", HELPER.replace("torch.relu", "torch.tanh"))
    elif change == "pinned":
        extra = ["lr=0.01"]
    else:
        with_train(tmp_path, change)
    again = sweeplab("sweep", "sweep.yaml", "n_trials=2", *extra, *args, cwd=tmp_path)
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode == 2 and len(lines) == 1 and said in lines[0], again.stderr
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))
    )
    assert len(optuna.load_study(study_name="resumed", storage=storage).trials) == 1  # nothing added


# --- 4. bad data found mid-run is one line naming the split and the item -----------------------------------------

ROWS = """\
import torch


class Rows(torch.utils.data.Dataset):
    def __init__(self, kind="ok", bad=-1):
        self.kind, self.bad = kind, bad
        self.x = torch.randn(120, 3, generator=torch.Generator().manual_seed(0))
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self):
        return 120

    def __getitem__(self, i):
        x = self.x[i].clone()
        if i == self.bad:
            if self.kind == "raises":
                raise RuntimeError(f"bad item {i}")
            if self.kind == "nan":
                x[1] = float("nan")
            if self.kind == "empty":
                x = torch.zeros(0, 3)
            if self.kind == "odd":
                x[0] = 99.0
        return x, int(self.y[i])


def pad(items):
    xs = [x.reshape(-1, 3) for x, _ in items]
    lengths = torch.tensor([len(x) for x in xs])
    return (torch.nn.utils.rnn.pad_sequence(xs, batch_first=True), lengths), torch.tensor([y for _, y in items])


def odd(items):
    x, y = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    return (x, y, "extra") if bool((x == 99.0).any()) else (x, y)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)


class Seq(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(3, 4, batch_first=True)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, padded, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        return self.lin(self.rnn(packed)[1][-1])


def only_negatives():
    x = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0] * 40 + [0, 1] * 10)
    return {"train": (x[:40], y[:40]), "val": (x[40:], y[40:])}
"""

# random_split's permutation of the 120 items by split_seed 42 (the default): the training split is its first 100;
# its last item is past the 2 training items the pre-flight reads (and not a validation item), so only the loop
# reads it
BAD = int(torch.randperm(120, generator=torch.Generator().manual_seed(42))[99])
RAISES_LINE = ROWS.splitlines().index('                raise RuntimeError(f"bad item {i}")') + 1
WHERE = "sweeplab: error: data.class_path: rows.Rows() (training split)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, workers, extra, expected",
    [
        (
            "raises",
            0,
            "",
            f"{WHERE}: reading item {BAD} raised RuntimeError: bad item {BAD} (rows.py line {RAISES_LINE})",
        ),
        (
            "raises",
            2,
            "",
            f"{WHERE}: reading item {BAD} raised RuntimeError: bad item {BAD} (rows.py line {RAISES_LINE})",
        ),
        ("nan", 0, "", f"{WHERE}: item {BAD}'s inputs hold NaN or infinite values"),
        ("nan", 2, "", f"{WHERE}: item {BAD}'s inputs hold NaN or infinite values"),
        (
            "empty",
            0,
            "collate_fn: rows.pad",
            f"{WHERE}: item {BAD}'s inputs [0, 3] are empty (a sequence of length 0?): every item needs at least one value",
        ),
        ("odd", 2, "collate_fn: rows.odd", "sweeplab: error: data.collate_fn: for items "),
    ],
)
def test_a_bad_item_read_mid_run_is_one_line_naming_its_split_and_index(tmp_path, kind, workers, extra, expected):
    """Before: `RuntimeError: bad item 5000` (exit 1; from workers, the cause lost), `too many values to unpack`,
    a NaN or a zero-length sequence ending the trial as "diverged" or deep in the model. Now each is named by its
    index in the user's Dataset and its split, exit 2, for `run` and for `sweep` (its trial FAILED with the line)."""
    write(tmp_path, "rows.py", ROWS)
    model = "rows.Seq" if kind == "empty" else "rows.Net"
    write(
        tmp_path,
        "exp.yaml",
        f"name: rows\ntask: binary\ndata: {{source: python, class_path: rows.Rows, init_args: {{kind: {kind}, "
        f"bad: {BAD}}}, val_size: 20, num_workers: {workers}{', ' + extra if extra else ''}}}\n"
        f"model: {{class_path: {model}}}\ntrain: {{epochs: 2, batch_size: 16}}\n",
    )
    run = sweeplab("run", "exp.yaml", "--no-track", cwd=tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), run.stderr
    if kind == "odd":
        assert lines[0].endswith("it returned a tuple of 3; a batch must be (inputs, target)")
    write(
        tmp_path, "sweep.yaml", "study: rows\nexperiment: exp.yaml\nspace:\n  lr: {choices: [0.01, 0.1]}\nn_trials: 2\n"
    )
    sweep = sweeplab("sweep", "sweep.yaml", "--tracking-uri", "sqlite:///runs.db", "--no-report", cwd=tmp_path)
    assert sweep.returncode == 2 and sweep.stderr.strip().splitlines()[-1] == lines[0], sweep.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/runs.db")
    runs = client.search_runs([client.get_experiment_by_name("rows").experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"  # the first trial, not one per trial
    assert runs[0].data.tags["sweeplab.reason"] == "BatchError: " + lines[0].removeprefix("sweeplab: error: ")


def test_balanced_weights_with_a_class_missing_from_the_training_split_is_one_line(tmp_path):
    """Before: every trial "diverged" (the missing class weighs n / 0 = inf)."""
    write(tmp_path, "rows.py", ROWS)
    write(
        tmp_path,
        "exp.yaml",
        "name: rows\ntask: binary\ndata: {source: python, class_path: rows.only_negatives}\n"
        "train: {epochs: 2, loss: {class_path: BCEWithLogitsLoss, init_args: {pos_weight: balanced}}}\n",
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = sweeplab("run", "exp.yaml", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "sweeplab: error: exp.yaml: train.loss.init_args.pos_weight: balanced weighs each class by 1 / its count in "
        "the training split, and class 1 has no sample there (40 samples, counts 40, 0); give the weights, or a "
        "split with every class"
    ), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before


# --- 5. option errors are found by the checks, not in training ---------------------------------------------------

BOOM = """\
import torch


class Boom(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer):
        self.calls = 0
        super().__init__(optimizer, lambda epoch: 1.0)

    def step(self, *args):
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError(f"scheduler boom at step {self.calls - 1}")
        return super().step(*args)
"""


def lab(folder: Path) -> Path:
    write(folder, "boom.py", BOOM)
    return write(folder, "lab.yaml", LAB.read_text().replace("  epochs: 80", "  epochs: 4"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "optimizer=LBFGS",
            "lab.yaml: train.optimizer: LBFGS.step() needs a closure that re-evaluates the loss; sweeplab's loop "
            "takes one step per batch",
        ),
        (
            "scheduler={class_path: StepLR, init_args: {step_size: abc}}",
            "lab.yaml: train.scheduler: StepLR.step() at step 1 raised TypeError: unsupported operand type(s) for %",
        ),
        (
            "scheduler={class_path: boom.Boom}",
            "lab.yaml: train.scheduler: boom.Boom.step() at step 3 raised RuntimeError: scheduler boom at step 3 "
            "(boom.py line 12)",
        ),
        ("optimizer={class_path: Adam, init_args: {eps: .nan}}", "train.optimizer.init_args: eps: not a finite number"),
        ("precision=bf16-true", "train.precision: bf16-true trains half-precision weights"),
        ("epochs=true", "epochs: true is not a number"),
    ],
)
def test_an_option_that_would_fail_in_training_is_one_line_before_anything_runs(tmp_path, override, expected):
    lab(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = sweeplab("run", "lab.yaml", override, "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == before


@pytest.mark.slow
def test_a_scheduler_that_raises_is_found_before_engine_auto_probes_it(tmp_path):
    """Before: `sweeplab: error: RuntimeError: scheduler boom at step 3`, exit 1 (the engine's probe stepped it)."""
    lab(tmp_path)
    write(
        tmp_path,
        "sweep.yaml",
        "study: boom\nexperiment: lab.yaml\nbase: {train: {scheduler: {class_path: boom.Boom}}}\n"
        "space:\n  lr: {low: 0.001, high: 0.1}\nn_trials: 2\n",
    )
    proc = sweeplab("sweep", "sweep.yaml", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "sweeplab: error: sweep.yaml: train.scheduler: boom.Boom.step() at step 3 raised RuntimeError: scheduler "
        "boom at step 3 (boom.py line 12)"
    ), proc.stderr
    assert not (tmp_path / "runs.db").exists() and not (tmp_path / "optuna.journal").exists()
    proc = sweeplab("sweep", "sweep.yaml", "n_trials=True", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "sweeplab: error: sweep.yaml: n_trials: true is not a number"


@pytest.mark.slow
@pytest.mark.parametrize("given", ["32", "32-true", "bf16", "bf16-mixed"])
def test_precision_takes_numbers_and_lightnings_names(tmp_path, given):
    """`precision: 32` in YAML is a number, refused before (`Input should be '32', 'bf16' or '16' (got 32)`)."""
    from sweeplab.config import load_experiment

    path = lab(tmp_path)
    path.write_text(path.read_text().replace("  epochs: 4\n", f"  epochs: 4\n  precision: {given}\n"))
    assert load_experiment(path).train.precision == {"32-true": "32", "bf16-mixed": "bf16"}.get(given, given)
    assert load_experiment(path, {"precision": 16}).train.precision == "16"  # a number on the command line
    assert load_experiment(path, {"precision": "16-mixed"}).train.precision == "16"
    proc = sweeplab("run", "lab.yaml", "--no-track", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# --- 6. left from the last round ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """The seed's lab, 4 epochs, tracked in a store not named mlflow.db: (folder, uri, run id)."""
    folder = tmp_path_factory.mktemp("lab")
    write(folder, "lab.yaml", LAB.read_text().replace("  epochs: 80", "  epochs: 4"))
    proc = sweeplab("run", "lab.yaml", "--tracking-uri", "sqlite:///lab.db", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1].split()[2]
    return folder, "sqlite:///lab.db", run_id


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, stdin, expected",
    [
        (["--x", "1e308,1"], None, "input row 0 holds a value beyond float32 (|v| > 3.4e38)"),
        (
            ["--x", "1e38,1e38", "--json"],
            None,
            "input row 0 gives a non-finite output (values far outside the training data?)",
        ),
        (["-"], "[]", "input: no rows to predict"),
        (["-"], "[[true, false]]", "stdin: row 0 holds a value that is not a number: [True, False]"),
        (["--json", "-"], '[[1.0, "2"]]', "stdin: row 0 holds a value that is not a number: [1.0, '2']"),
    ],
)
def test_predict_refuses_what_it_cannot_answer(lab_run, args, stdin, expected):
    """Before: `pred=inf`, `Infinity` in --json, `[]` answered with nothing (exit 0), true and "2" read as numbers."""
    folder, uri, run_id = lab_run
    proc = subprocess.run(
        [SWEEPLAB, "predict", run_id, "--tracking-uri", uri, *args],
        cwd=folder,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip() == f"sweeplab: error: {expected}"


@pytest.mark.slow
def test_predict_names_a_run_once(lab_run):
    folder, uri, run_id = lab_run
    proc = sweeplab("predict", run_id, "--tracking-uri", uri, cwd=folder)
    assert proc.returncode == 0 and f"model: run {run_id}\n" in proc.stderr, proc.stderr  # not `run X, run X`


def test_a_checkpoint_with_pickled_code_is_refused_without_torchs_advice(tmp_path):
    import builtins

    class Evil:
        def __reduce__(self):
            return (builtins.print, ("EVIL RAN",))

    torch.save({"state_dict": {}, "model_spec": Evil()}, tmp_path / "best.pt")
    from sweeplab.train.model import read_checkpoint

    with pytest.raises(ValueError) as caught:
        read_checkpoint(tmp_path / "best.pt")
    assert str(caught.value) == (
        "best.pt: holds pickled objects, not only tensors and plain values: Unsupported global: GLOBAL print; "
        "refused (sweeplab reads checkpoints with weights_only=True and never runs their code)"
    )
    assert "weights_only=False" not in str(caught.value)


@pytest.mark.slow
def test_a_report_that_cannot_be_written_is_one_line_and_leaves_no_cut_short_file(lab_run, tmp_path):
    folder, _, _ = lab_run
    write(folder, "sweep.yaml", "study: lab_report\nexperiment: lab.yaml\nspace:\n  lr: {choices: [0.01, 0.03]}\n")
    proc = sweeplab(
        "sweep", "sweep.yaml", "n_trials=2", "--tracking-uri", "sqlite:///lab.db", "--no-report", cwd=folder
    )
    assert proc.returncode == 0, proc.stderr
    bad = sweeplab("report", "lab_report", "--tracking-uri", "sqlite:///lab.db", "--out", "/proc/x", cwd=folder)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(
        "sweeplab: error: --out /proc/x: cannot make the report's folder there ("
    ), bad.stderr
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(tiny)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("no tmpfs to fill here (mounting one needs root)")
    try:
        full = sweeplab("report", "lab_report", "--tracking-uri", "sqlite:///lab.db", "--out", str(tiny), cwd=folder)
        files = {p.name: p.stat().st_size for p in tiny.iterdir()}
    finally:
        subprocess.run(["umount", str(tiny)], capture_output=True)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 1 and len(lines) == 1 and lines[0].startswith("sweeplab: error: report: "), full.stderr
    assert lines[0].endswith(" not written (No space left on device)")
    assert files and all(size > 0 for size in files.values()), files  # whole files, or none: no 0-byte trials.csv


def _until(predicate, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


@pytest.mark.slow
def test_the_ui_over_a_store_in_a_folder_with_a_percent_leaves_no_stray_folder_even_when_killed(tmp_path):
    """Before: MLflow's server made `p%2541 x` (the store's folder, still URL-quoted) beside `p%41 x`, and it stayed."""
    import os
    import signal

    from servers import free_port

    folder = tmp_path / "p%41 x"
    folder.mkdir()
    write(folder, "lab.yaml", LAB.read_text().replace("  epochs: 80", "  epochs: 2"))
    assert sweeplab("run", "lab.yaml", cwd=folder).returncode == 0  # the default store, mlflow.db, in that folder
    port = free_port()
    ui = subprocess.Popen(
        [SWEEPLAB, "ui", "training_loop_lab", "--port", str(port)],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "MLflow UI: http://127.0.0.1:" in ui.stdout.readline()  # printed once the server answers
    finally:
        os.kill(ui.pid, signal.SIGKILL)  # no clean-up of its own: the watchdog ends the server and tidies
        ui.wait()
    assert _until(lambda: sorted(p.name for p in tmp_path.iterdir()) == ["p%41 x"], 30), list(tmp_path.iterdir())


@pytest.mark.slow
def test_sweeplab_server_leaves_nothing_in_dev_shm(tmp_path):
    """Before: MLflow's GenAI job runner made a folder in /dev/shm that SIGTERM left behind."""
    import os
    import signal
    import urllib.request

    from servers import free_port

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    before = set(os.listdir(shm))
    port = free_port()
    server = subprocess.Popen(
        [SWEEPLAB, "server", "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path}/server.db"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def answers() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        assert _until(answers, 120)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert set(os.listdir(shm)) - before == set()


@pytest.mark.slow
def test_a_worker_killed_after_its_last_trial_has_its_parent_run_ended_by_the_survivors(tmp_path):
    """Before: its parent run (role worker) stayed RUNNING until the next `sweeplab sweep` in that folder: no trial
    of it was left to recover, only trial recovery ended a lost worker's parent, and a worker's start-up had
    looked for dead runs before that worker died. Here the "worker" is a process that is alive when the survivor
    starts and ends while the survivor trains (12 reference trials of 200 epochs: ~9 s here)."""
    from sweeplab.stores import this_host

    write(tmp_path, "lab.yaml", LAB.read_text().replace("  epochs: 80", "  epochs: 200"))
    write(
        tmp_path,
        "sweep.yaml",
        "study: late\nexperiment: lab.yaml\nspace:\n  lr: {low: 0.001, high: 0.1}\nsampler: {type: random, seed: 0}\n",
    )
    args = ["--tracking-uri", "sqlite:///runs.db", "--storage", "journal:late.journal", "--quiet"]
    assert sweeplab("sweep", "sweep.yaml", "n_trials=1", "--no-report", *args, cwd=tmp_path).returncode == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/runs.db")
    experiment = client.get_experiment_by_name("late").experiment_id
    # not a child of this process (a child would stay a zombie, alive to kill -0, until waited for)
    pid = int(subprocess.run(["sh", "-c", "sleep 3 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True).stdout)
    lost = client.create_run(
        experiment, tags={"sweeplab.role": "worker", "sweeplab.worker": f"{this_host()}:{pid}"}
    ).info.run_id
    survivor = sweeplab("worker", "sweep.yaml", "n_trials=13", "engine=reference", *args, cwd=tmp_path)
    assert survivor.returncode == 0, survivor.stderr
    assert not Path(f"/proc/{pid}").exists()  # it ended while the survivor worked
    run = client.get_run(lost)
    assert run.info.status == "KILLED" and run.data.tags["sweeplab.outcome"] == "killed"
    assert all(r.info.status != "RUNNING" for r in client.search_runs([experiment]))


# --- 7. what users hit --------------------------------------------------------------------------------------------


def _logged_baseline(folder: Path, experiment: str) -> float:
    client = MlflowClient(f"sqlite:///{folder}/runs.db")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.data.metrics["baseline_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["label_smoothing", "pos_weight", "huber"])
def test_a_loss_given_by_class_logs_the_baseline_of_its_own_constant_prediction(tmp_path, case):
    """Before: no baseline_val_loss for a loss by class, so the report's `learned` was blank. The expected values
    are the closed forms worked out by hand below (the Huber one numerically, by scipy), from the split's labels."""
    import numpy as np
    from scipy.optimize import minimize_scalar

    from sweeplab.config import load_experiment
    from sweeplab.train.data import make_dataset

    data, loss, task = {
        "label_smoothing": ("wine", "{class_path: CrossEntropyLoss, init_args: {label_smoothing: 0.1}}", "multiclass"),
        "pos_weight": ("breast_cancer", "{class_path: BCEWithLogitsLoss, init_args: {pos_weight: 2.0}}", "binary"),
        "huber": ("diabetes", "{class_path: HuberLoss, init_args: {delta: 50.0}}", "regression"),
    }[case]
    path = write(
        tmp_path,
        "exp.yaml",
        f"name: base\ntask: {task}\ndata: {{source: sklearn, name: {data}, val_size: 0.25}}\n"
        f"train: {{epochs: 1, loss: {loss}}}\n",
    )
    proc = sweeplab("run", "exp.yaml", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    dataset = make_dataset(load_experiment(path))
    train, val = dataset.y_train.double().numpy().reshape(-1), dataset.y_val.double().numpy().reshape(-1)
    if case == "label_smoothing":  # the best distribution is (1 - e) * frequencies + e / K
        k, e = 3, 0.1
        p = (1 - e) * np.bincount(train.astype(int), minlength=k) / len(train) + e / k
        expected = np.mean([-((1 - e) * np.log(p[int(y)]) + e / k * np.log(p).sum()) for y in val])
    elif case == "pos_weight":  # d/dc of the weighted log loss is zero where sigma(c) = w r / (w r + 1 - r)
        w, r = 2.0, train.mean()
        s = w * r / (w * r + 1 - r)
        expected = np.mean(-(w * val * np.log(s) + (1 - val) * np.log(1 - s)))
    else:

        def huber(c, y, delta=50.0):
            a = np.abs(y - c)
            return np.mean(np.where(a <= delta, 0.5 * a**2, delta * (a - 0.5 * delta)))

        c = minimize_scalar(lambda c: huber(c, train), bounds=(train.min(), train.max()), method="bounded").x
        expected = huber(c, val)
    assert _logged_baseline(tmp_path, "base") == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_sweeplab_serve_works_as_printed_without_the_venv_on_path(lab_run):
    """`mlflow models serve` as the README showed it failed unless the venv was on PATH (`exec: uvicorn: not found`,
    exit 127). The sweep now prints `serve:`, which runs it with this interpreter's scripts first on PATH."""
    import json
    import os
    import signal
    import urllib.request

    from servers import free_port

    folder, uri, _ = lab_run
    write(folder, "served.yaml", "study: lab_served\nexperiment: lab.yaml\nspace:\n  lr: {choices: [0.03]}\n")
    swept = sweeplab("sweep", "served.yaml", "n_trials=1", "--tracking-uri", uri, "--no-report", cwd=folder)
    line = next(line for line in swept.stdout.splitlines() if line.startswith("serve:"))
    assert f" serve models:/lab_served@champion --tracking-uri sqlite:///{folder}/lab.db" in line, line
    port = free_port()
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    bare["PATH"] = "/usr/bin:/bin"  # no venv on PATH, as in a fresh shell
    server = subprocess.Popen(
        [SWEEPLAB, "serve", "models:/lab_served@champion", "--tracking-uri", uri, "--port", str(port)],
        cwd=folder,
        env=bare,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        said = server.stdout.readline() + server.stdout.readline()
        assert f"on http://127.0.0.1:{port}/invocations" in said and '{"inputs": [[0.0, 0.0]]}' in said, said
        body = json.dumps({"inputs": [[1.0, 2.0], [0.0, 0.0]]}).encode()

        def answer():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            try:
                return json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                return None

        assert _until(lambda: answer() is not None or server.poll() is not None, 120) and server.poll() is None
        served = answer()["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    predicted = sweeplab(
        "predict",
        "models:/lab_served@champion",
        "--tracking-uri",
        uri,
        "--json",
        "--x",
        "1,2",
        "--x",
        "0,0",
        cwd=folder,
    )
    expected = [p["prediction"] for p in json.loads(predicted.stdout)["predictions"]]
    assert [row[0] if isinstance(row, list) else row for row in served] == pytest.approx(expected, abs=1e-5)


def test_a_sweep_from_python_prints_what_the_cli_prints_and_leaves_the_interpreter_as_it_was(tmp_path, capsys):
    """Before: torch's global RNG advanced, sqlalchemy and alembic loggers left at WARNING, no best-trials table
    nor commands printed, and `champions` keyed '' for a sweep without conditions."""
    import logging

    import sweeplab

    write(tmp_path, "lab.yaml", LAB.read_text().replace("  epochs: 80", "  epochs: 3"))
    write(tmp_path, "s.yaml", "study: from_python\nexperiment: lab.yaml\nspace:\n  lr: {low: 0.001, high: 0.1}\n")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    levels = {name: logging.getLogger(name).level for name in ("sqlalchemy", "sqlalchemy.engine", "alembic")}
    result = sweeplab.sweep(str(tmp_path / "s.yaml"), tracking_uri=f"sqlite:///{tmp_path}/py.db", n_trials=2)
    out = capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: logging.getLogger(name).level for name in levels} == levels
    assert result.champions == {"from_python": "models:/from_python@champion"}
    assert set(result.commands) == {"browse", "predict", "serve"}
    assert result.commands["predict"] == [
        f"{sys.executable} -m sweeplab predict models:/from_python@champion --tracking-uri sqlite:///{tmp_path}/py.db"
    ]
    assert "trial " in out and "best_val_loss" in out  # the best trials' table
    for line in (f"browse:   {result.commands['browse']}", f"predict:  {result.commands['predict'][0]}"):
        assert line in out.splitlines()
    sweeplab.sweep(str(tmp_path / "s.yaml"), tracking_uri=f"sqlite:///{tmp_path}/py.db", n_trials=3, quiet=True)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_sweeplab_run_names_a_users_model_by_its_class_and_prints_its_objective_first(tmp_path):
    """Before: `adam-hNone-lr0.003-n0.3` for a user's model on digits, and `best_val:` (the loss) first under an
    accuracy objective."""
    write(tmp_path, "rows.py", ROWS)
    write(
        tmp_path,
        "exp.yaml",
        "name: named\ntask: binary\ndata: {source: python, class_path: rows.Rows, val_size: 20}\n"
        "model: {class_path: rows.Net}\ntrain: {epochs: 2, batch_size: 16, lr: 0.003}\n"
        "objective: {metric: val_accuracy}\n",
    )
    proc = sweeplab("run", "exp.yaml", "--tracking-uri", "sqlite:///runs.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    best = next(line for line in lines if line.startswith("best_"))
    assert (
        best.startswith("best_val_accuracy: ")
        and "(val_loss " in best
        and not any(line.startswith("best_val:") for line in lines)
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/runs.db")
    (run,) = client.search_runs([client.get_experiment_by_name("named").experiment_id])
    assert run.info.run_name == "net-adam-lr0.003"
