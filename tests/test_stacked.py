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
from sweeplab.train.engines import Job, engine_named
from sweeplab.train.experiment import RunResult

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
        assert not isinstance(
            vec.result, RunResult
        )  # it stacked (a silent fallback would compare the loop with itself)
        assert b.val_loss[:2] == pytest.approx(a.val_loss[:2], rel=1e-5)  # early epochs tightly; later, rounding grows
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


@pytest.mark.slow
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
    said = [line for line in proc.stderr.splitlines() if "cannot be stacked by torch.func" in line]
    assert len(said) == 1 and ".item()" in said[0] and said[0].startswith("engine: reference (auto: nets.CallsItem")
    assert len([line for line in proc.stderr.splitlines() if line.startswith("engine:")]) == 1
    assert "Traceback" not in proc.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("items").experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" and r.data.metrics["best_epoch"] >= 1 for r in runs)


# --- issue #27: every setting a sweep can vary, each member against its reference twin; auto never worse ---------

SETTINGS_NETS = """\
import torch
from torch import nn


class Configurable(nn.Module):
    # init args that are not shapes: an activation's name, a dropout rate, a flag and a number
    def __init__(self, in_channels, n_classes, activation="relu", dropout=0.0, residual=False, scale=1.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[activation]
        self.drop = nn.Dropout(dropout)
        self.residual, self.scale = residual, scale
        self.head = nn.Linear(4 * 16, n_classes)

    def forward(self, x):
        h = self.act(self.conv(x))
        if self.residual:
            h = h + x
        return self.head(self.drop(torch.max_pool2d(h, 2).flatten(1))) * self.scale


class DropElsewhere(nn.Module):  # an init arg named like a dropout rate that also scales the output
    def __init__(self, in_channels, n_classes, drop_rate=0.0, lam=None):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.keep = 1 - drop_rate
        self.head = nn.Linear(in_channels * 64, n_classes)
        self.extra = (lambda t: t) if lam else None  # a function of its own: not a value behaviour compares

    def forward(self, x):
        return self.head(self.drop(x.flatten(1))) * self.keep


class Noisy(nn.Module):  # draws random numbers in its forward, not by an nn.Dropout module
    def __init__(self, in_channels, n_classes):
        super().__init__()
        self.head = nn.Linear(in_channels * 64, n_classes)

    def forward(self, x):
        return self.head(nn.functional.dropout(x.flatten(1), 0.5, self.training))


class Tied(nn.Module):  # one module registered under two names
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.shared = nn.Linear(in_features, 16)
        self.again = nn.Linear(16, 16)
        self.again2 = self.again
        self.head = nn.Linear(16, n_classes)

    def forward(self, x):
        return self.head(torch.relu(self.again2(torch.relu(self.again(torch.relu(self.shared(x.flatten(1))))))))


class Double(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.lin = nn.Linear(in_features, n_classes).double()

    def forward(self, x):
        return self.lin(x.flatten(1).double()).float()


class Clamped(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.lin = nn.Linear(in_features, n_classes)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.05, 0.05)
        return self.lin(x.flatten(1))


class Lazy(nn.Module):
    def __init__(self, n_classes):
        super().__init__()
        self.lin = nn.LazyLinear(n_classes)

    def forward(self, x):
        return self.lin(x.flatten(1))


class FailsLater(nn.Module):  # passes the probe (a few batches), fails in its second epoch on either engine
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.lin = nn.Linear(in_features, n_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 12:
            raise RuntimeError("the user's forward gave up")
        return self.lin(x.flatten(1))
"""


def settings_configs(folder: Path, model: str, settings: list[dict], epochs: int = 5):
    (folder / "snets.py").write_text(SETTINGS_NETS)
    out = []
    for extra in settings:
        extra = dict(extra)
        raw = {
            "task": "multiclass",
            "seed": 1,
            "data": {"source": "sklearn", "name": "digits", "val_size": 0.2, "train_fraction": 0.4},
            "model": {"class_path": f"snets.{model}", "init_args": extra.pop("init_args", {})},
            "train": {"epochs": epochs, "batch_size": 64, **extra},
        }
        out.append(build_experiment(raw, "test", folder))
    return out


def test_members_with_other_init_args_train_with_their_own(tmp_path):
    """Issue #27.1: one batch of members whose init args differ only in what is not a shape (activation, a flag, a
    number, dropout 0). Before the fix they shared the first member's module: every member ran relu, no residual,
    scale 1. Each must equal its own reference twin (the reference loop builds each member's own module)."""
    variants = [
        {"activation": "relu"},
        {"activation": "tanh"},
        {"activation": "relu", "residual": True},
        {"activation": "tanh", "scale": 0.5},
    ]
    settings = []
    for args in variants:  # two optimizers each, so every variant is a stacked group of two
        settings.append({"optimizer": "Adam", "lr": 0.003, "init_args": dict(args)})
        settings.append({"optimizer": "SGD", "lr": 0.002, "momentum": 0.5, "init_args": dict(args)})
    reference = [Job(None, c) for c in settings_configs(tmp_path, "Configurable", settings)]
    stacked = [Job(None, c) for c in settings_configs(tmp_path, "Configurable", settings)]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    for ref, vec in zip(reference, stacked):
        a, b = ref.result.history, vec.result.history
        assert not isinstance(
            vec.result, RunResult
        )  # it stacked (a silent fallback would compare the loop with itself)
        assert b.val_loss[:2] == pytest.approx(a.val_loss[:2], rel=1e-5)  # early epochs tightly; later, rounding grows
        assert b.best_epoch == a.best_epoch
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-4)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
    # and the variants differ from each other (so the comparison above could fail)
    finals = {round(job.result.history.val_loss[-1], 4) for job in reference}
    assert len(finals) == len(settings)


def test_nn_dropout_stacks_with_each_members_masks_and_other_random_draws_train_on_the_reference_loop(tmp_path):
    """#40: an nn.Dropout stacks: each member's noise is drawn from its own generator where the reference loop's
    forward draws it, so a dropout-0.6 member is its reference twin to float rounding (1e-5 over the first 2
    epochs), and its dropout is applied (a higher training loss
    than its dropout-0 twin's). Members whose rates differ (0, 0.3, 0.6, 1) stack in one group, each at its own
    rate: the module they build differs in nothing else (model.behaviour). Before #27 members shared the first
    member's rate; before #40 they trained on the reference loop, and until later in #40 each rate was a group of
    its own. A model drawing otherwise (F.dropout in its forward) is found by the probe (vmap's
    randomness="error") and trains on the reference loop, said once."""
    from sweeplab.train.engines import choose

    settings = [
        {"optimizer": "Adam", "lr": 0.01, "init_args": {"dropout": 0.0}},
        {"optimizer": "Adam", "lr": 0.02, "init_args": {"dropout": 0.3}},
        {"optimizer": "Adam", "lr": 0.01, "init_args": {"dropout": 0.6}},
        {"optimizer": "SGD", "lr": 0.02, "init_args": {"dropout": 0.6}},
        {"optimizer": "SGD", "lr": 0.02, "init_args": {"dropout": 1.0}},
    ]
    engine, why = choose(settings_configs(tmp_path, "Configurable", settings))
    assert engine == "vectorized" and "random numbers" not in why
    reference = [Job(None, c) for c in settings_configs(tmp_path, "Configurable", settings)]
    stacked = [Job(None, c) for c in settings_configs(tmp_path, "Configurable", settings)]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    for ref, vec in zip(reference, stacked):
        a, b = ref.result.history, vec.result.history
        assert not isinstance(vec.result, RunResult) and b.stacked_members == len(settings)  # all in one group
        assert b.train_loss[:2] == pytest.approx(a.train_loss[:2], rel=1e-5)
        assert b.val_loss[:2] == pytest.approx(a.val_loss[:2], rel=1e-5)
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-4) and b.best_epoch == a.best_epoch
    assert stacked[2].result.history.train_loss[-1] > stacked[0].result.history.train_loss[-1] * 1.1
    noisy = [{"optimizer": "Adam", "lr": lr} for lr in (0.01, 0.02)]
    engine, why = choose(settings_configs(tmp_path, "Noisy", noisy))
    assert why.count("snets.Noisy draws random numbers in training (not by nn.Dropout") == 1, why
    jobs = [Job(None, c) for c in settings_configs(tmp_path, "Noisy", noisy)]
    engine_named(engine).train(jobs, None)
    assert all(isinstance(job.result, RunResult) for job in jobs)  # the reference loop's, model and all


def test_a_rate_arg_groups_members_only_when_it_sets_nothing_but_dropout_rates(tmp_path):
    """Members whose init args differ in a dropout rate share a group when the modules they build differ in
    nothing else; an arg named like a rate that also sets an attribute (here `keep`, scaling the output) keeps
    members apart, as every other init arg does; a module holding a function of its own is grouped by its init
    args, as before."""
    from sweeplab.train.stacked.epochs import group_members, prepare_member

    def groups(model, args):
        configs = settings_configs(tmp_path, model, [{"init_args": a} for a in args])
        return sorted(len(g) for g in group_members([prepare_member(None, c) for c in configs]))

    assert groups("Configurable", [{"dropout": r} for r in (0.0, 0.2, 0.5)]) == [3]
    assert groups("Configurable", [{"dropout": 0.2}, {"dropout": 0.5, "activation": "tanh"}]) == [1, 1]
    assert groups("DropElsewhere", [{"drop_rate": r} for r in (0.2, 0.5)]) == [1, 1]
    assert groups("DropElsewhere", [{"drop_rate": 0.2}, {"drop_rate": 0.2}]) == [2]
    assert groups("DropElsewhere", [{"drop_rate": 0.2, "lam": True}] * 2 + [{"drop_rate": 0.5, "lam": True}]) == [1, 2]


@pytest.mark.parametrize(
    "model, stacks, reason",
    [
        ("Tied", True, None),
        ("Double", False, "float64 parameters"),
        ("Clamped", False, "cannot be stacked by torch.func"),
        ("Lazy", False, "lazy parameters"),
    ],
)
def test_auto_is_never_worse_than_the_reference_loop(tmp_path, model, stacks, reason):
    """Issue #27.2: models the reference loop trains (tied weights, float64 parameters, a weight clamped in place in
    forward, a lazy module) train under the vectorized engine too: stacked, each member equal to its twin, or sent
    to the reference loop by the probe with its reason (engines.choose says it in the one `engine:` line)."""
    from sweeplab.train.engines import choose

    settings = [{"optimizer": "Adam", "lr": 0.01}, {"optimizer": "SGD", "lr": 0.05}, {"optimizer": "Adam", "lr": 0.03}]
    engine, why = choose(settings_configs(tmp_path, model, settings))
    assert engine == ("vectorized" if stacks else "reference")
    if reason:
        assert reason in why and f"snets.{model}" in why
    reference = [Job(None, c) for c in settings_configs(tmp_path, model, settings)]
    stacked = [Job(None, c) for c in settings_configs(tmp_path, model, settings)]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    for ref, vec in zip(reference, stacked):
        assert vec.error is None and vec.result is not None
        assert isinstance(vec.result, RunResult) == (not stacks)  # stacked, or sent to the reference loop
        assert vec.result.history.best_epoch == ref.result.history.best_epoch
        assert vec.result.history.val_loss == pytest.approx(ref.result.history.val_loss, rel=1e-4)
        if stacks:  # every state_dict name, the tied alias included, with the reference's values
            assert sorted(vec.result.history.best_state) == sorted(ref.result.history.best_state)
            for name, value in ref.result.history.best_state.items():
                assert torch.allclose(vec.result.history.best_state[name], value, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_a_trial_that_fails_in_stacked_training_gets_its_failed_run(tmp_path):
    """A model that passes the probe and fails later: the reference loop tries each trial (never worse), and each
    failed trial has its FAILED run with the reason, as the reference engine gives it."""
    (tmp_path / "snets.py").write_text(SETTINGS_NETS)
    (tmp_path / "exp.yaml").write_text(
        "name: fails\ntask: multiclass\ndata: {source: sklearn, name: digits, val_size: 0.2, train_fraction: 0.4}\n"
        "model: {class_path: snets.FailsLater}\ntrain: {epochs: 3, batch_size: 64}\n"
    )
    (tmp_path / "sweep.yaml").write_text(
        "study: fails\nexperiment: exp.yaml\nspace:\n  lr: {choices: [0.01, 0.03]}\nsampler: {type: grid}\nn_trials: 2\n"
    )
    uri = f"sqlite:///{tmp_path}/t.db"
    proc = subprocess.run(
        [sys.executable, "-m", "sweeplab", "sweep", "sweep.yaml", "--tracking-uri", uri, "--no-report"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr
    engine_lines = [line for line in proc.stderr.splitlines() if line.startswith("engine:")]
    assert len(engine_lines) == 2  # the header, then its update: not a second line that contradicts it
    assert engine_lines[0].startswith("engine: vectorized (auto: the vectorized engine supports every trial")
    assert engine_lines[1].startswith("engine: not stacked after all: snets.FailsLater cannot be stacked by torch.func")
    assert engine_lines[1].endswith("(met in training, not in its probe); its trials train on the reference loop")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert proc.returncode == 1 and "trials in a row failed" in proc.stderr.splitlines()[-1]
    assert len(runs) >= 2 and all(r.info.status == "FAILED" for r in runs)
    assert all("the user's forward gave up" in r.data.tags.get("sweeplab.reason", "") for r in runs)


OPTIONS = [  # #29: the 1D-CNN user's options, on a user's model stacked by torch.func
    {"optimizer": "Adam", "lr": 0.003},
    {
        "optimizer": "Adam",
        "lr": 0.01,
        "loss": {"class_path": "CrossEntropyLoss", "init_args": {"label_smoothing": 0.1}},
        "scheduler": {"class_path": "CosineAnnealingLR", "init_args": {"T_max": 6}},
        "clip_grad_norm": 0.5,
        "early_stopping": {"patience": 2},
    },
    {
        "optimizer": "SGD",
        "lr": 0.05,
        "loss": {"class_path": "CrossEntropyLoss", "init_args": {"label_smoothing": 0.2}},
        "scheduler": {"class_path": "StepLR", "init_args": {"step_size": 2, "gamma": 0.5}},
        "clip_grad_value": 0.05,
    },
]


def test_stacked_user_models_apply_the_loops_options_as_the_reference_loop_does(tmp_path):
    reference = [Job(None, c) for c in configs(tmp_path, "CNN", [dict(s) for s in OPTIONS])]
    stacked = [Job(None, c) for c in configs(tmp_path, "CNN", [dict(s) for s in OPTIONS])]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    assert not isinstance(stacked[1].result, RunResult)  # stacked, not sent to the reference loop
    for ref, vec in zip(reference, stacked):
        a, b = ref.result.history, vec.result.history
        assert (b.best_epoch, b.epochs_run, b.stop_reason) == (a.best_epoch, a.epochs_run, a.stop_reason)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-4)
        assert b.lr == pytest.approx(a.lr, rel=1e-6)
