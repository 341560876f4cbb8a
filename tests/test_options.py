"""#29: the loop's options (schedule, early stopping, clipping, accumulation, precision, losses, optimizers, metrics)
against a plain PyTorch loop written here, the seed's script with each option added as its user would add it
(torch's own schedulers, clip_grad_norm_, autocast, loss classes, Keras' early stopping); and the metrics against
scikit-learn's on the same predictions. The reference loop must match bit for bit, a stacked member its reference
twin to 1e-4."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from sweeplab.cli import main
from sweeplab.config import ConfigError, load_experiment
from sweeplab.train.engines import Job, engine_named
from sweeplab.train.epoch import ranking_metrics, stacked_regression_metrics
from sweeplab.train.experiment import check_config, run_experiment

LAB = Path(__file__).resolve().parents[1] / "experiments" / "training_loop_lab.yaml"
EPOCHS = 12


def plain_run(
    optimizer=lambda params: torch.optim.Adam(params, lr=0.03),
    scheduler=None,
    interval="epoch",
    plateau=False,
    loss_fn=None,
    clip_norm=None,
    clip_value=None,
    accumulate=1,
    dtype=None,
    patience=None,
    min_delta=0.0,
    binary=False,
):
    """The seed's script (its data, split, loaders and model), with the options a user adds to it by hand."""
    torch.manual_seed(42)
    X = torch.randn(240, 2)
    eps = torch.randn(240, 1) * 0.3
    y = 3 * X[:, [0]] + 2 * X[:, [1]] + 5 + eps
    if binary:
        y = (y > 5).float()  # the seed's binary labels
    train_set, val_set = random_split(TensorDataset(X, y), [192, 48], generator=torch.Generator().manual_seed(42))
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(7))
    val_loader = DataLoader(val_set, batch_size=48, shuffle=False)

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x)

    model = Regressor()
    loss_fn = loss_fn or (nn.BCEWithLogitsLoss() if binary else nn.MSELoss())
    opt = optimizer(model.parameters())
    sched = scheduler(opt) if scheduler else None
    cast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    train_losses, val_losses, lrs = [], [], []
    best, wait = math.inf, 0
    for _ in range(EPOCHS):
        model.train()
        total = 0.0
        for i, (bx, by) in enumerate(train_loader):
            with cast():
                loss = loss_fn(model(bx), by)
            if i % accumulate == 0:
                opt.zero_grad()
            (loss / accumulate if accumulate > 1 else loss).backward()
            if (i + 1) % accumulate == 0 or i + 1 == len(train_loader):
                if clip_value:
                    nn.utils.clip_grad_value_(model.parameters(), clip_value)
                if clip_norm:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                last_lr = opt.param_groups[0]["lr"]
                opt.step()
                if sched and interval == "step":
                    sched.step()
            total += loss.item() * bx.size(0)
        train_losses.append(total / len(train_loader.dataset))
        model.eval()
        total = 0.0
        with torch.no_grad(), cast():
            for bx, by in val_loader:
                total += loss_fn(model(bx), by).item() * bx.size(0)
        val_losses.append(total / len(val_loader.dataset))
        if sched:
            lrs.append(last_lr)
            if interval == "epoch":
                sched.step(val_losses[-1]) if plateau else sched.step()
        if patience is not None:  # Keras' EarlyStopping on val_loss
            wait += 1
            if val_losses[-1] < best - min_delta:
                best, wait = val_losses[-1], 0
            if wait >= patience:
                break
    return train_losses, val_losses, lrs


def sweeplab_run(binary=False, metrics=(), **train):
    overrides = {"epochs": EPOCHS, "metrics": list(metrics), **{f"train.{key}": value for key, value in train.items()}}
    if binary:
        overrides["task"] = "binary"
    return run_experiment(load_experiment(LAB, overrides))


CASES = {
    "cosine schedule per epoch": (
        dict(scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS)),
        dict(scheduler={"class_path": "CosineAnnealingLR", "init_args": {"T_max": EPOCHS}}),
    ),
    "OneCycleLR per step, total_steps filled in": (
        dict(
            scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=EPOCHS * 6),
            interval="step",
        ),
        dict(scheduler={"class_path": "OneCycleLR", "init_args": {"max_lr": 0.05}, "interval": "step"}),
    ),
    "ReduceLROnPlateau on val_loss": (
        dict(
            scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1),
            plateau=True,
        ),
        dict(scheduler={"class_path": "ReduceLROnPlateau", "init_args": {"factor": 0.5, "patience": 1}}),
    ),
    "clip_grad_norm_": (dict(clip_norm=0.5), dict(clip_grad_norm=0.5)),
    "clip_grad_value_": (dict(clip_value=0.1), dict(clip_grad_value=0.1)),
    "accumulation over 4 batches (the last 2 of 6 a short window)": (
        dict(accumulate=4),
        dict(accumulate_grad_batches=4),
    ),
    "bf16 autocast": (dict(dtype=torch.bfloat16), dict(precision="bf16")),
    "HuberLoss(delta=0.5)": (
        dict(loss_fn=nn.HuberLoss(delta=0.5)),
        dict(loss={"class_path": "HuberLoss", "init_args": {"delta": 0.5}}),
    ),
    "huber by name": (dict(loss_fn=nn.HuberLoss()), dict(loss="huber")),
    "NAdam by class_path": (
        dict(optimizer=lambda p: torch.optim.NAdam(p, lr=0.03, momentum_decay=0.002)),
        dict(optimizer={"class_path": "NAdam", "init_args": {"momentum_decay": 0.002}}),
    ),
    "early stopping (patience 2, min_delta 0.3)": (
        dict(patience=2, min_delta=0.3),
        dict(early_stopping={"patience": 2, "min_delta": 0.3}),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_option_matches_a_plain_pytorch_loop_bit_for_bit(case):
    plain, ours = CASES[case]
    train_losses, val_losses, lrs = plain_run(**plain)
    result = sweeplab_run(**ours)
    assert result.history.train_loss == train_losses
    assert result.history.val_loss == val_losses
    assert result.history.lr == lrs
    if "early" in case:
        assert len(val_losses) < EPOCHS and result.history.status == "completed"
        assert "early stopping" in result.history.stop_reason


def test_a_weighted_binary_loss_matches_and_balanced_is_scikit_learns():
    train_losses, val_losses, _ = plain_run(binary=True, loss_fn=nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0])))
    result = sweeplab_run(binary=True, loss={"class_path": "BCEWithLogitsLoss", "init_args": {"pos_weight": 2.0}})
    assert result.history.train_loss == train_losses and result.history.val_loss == val_losses
    # `balanced`: negatives / positives over the training labels, as class_weight="balanced" weighs the classes
    balanced = sweeplab_run(
        binary=True, loss={"class_path": "BCEWithLogitsLoss", "init_args": {"pos_weight": "balanced"}}
    )
    y = balanced.dataset.y_train.reshape(-1).numpy().astype(int)
    weights = __import__("sklearn.utils.class_weight", fromlist=["x"]).compute_class_weight(
        "balanced", classes=np.array([0, 1]), y=y
    )
    ratio = weights[1] / weights[0]
    train_losses, _, _ = plain_run(
        binary=True, loss_fn=nn.BCEWithLogitsLoss(pos_weight=torch.tensor([ratio], dtype=torch.float32))
    )
    assert balanced.history.train_loss == pytest.approx(train_losses, rel=1e-6)


def test_regression_and_ranking_metrics_equal_scikit_learns():
    generator = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 50, 2, generator=generator), torch.randn(2, 50, 2, generator=generator)
    ours = stacked_regression_metrics(pred, target)
    for k in range(2):
        p, t = pred[k].double().numpy(), target[k].double().numpy()
        assert float(ours["val_mae"][k]) == pytest.approx(skm.mean_absolute_error(t, p), rel=1e-12)
        assert float(ours["val_rmse"][k]) == pytest.approx(skm.root_mean_squared_error(t, p), rel=1e-12)
        assert float(ours["val_r2"][k]) == pytest.approx(skm.r2_score(t, p), rel=1e-12)
    scores = torch.round(torch.randn(3, 60, generator=generator) * 2) / 2  # ties: one threshold each
    labels = (torch.rand(3, 60, generator=generator) < 0.3).double()
    ranked = ranking_metrics(scores, labels)
    for k in range(3):
        s, y = scores[k].numpy(), labels[k].numpy()
        assert float(ranked["val_auroc"][k]) == pytest.approx(skm.roc_auc_score(y, s), rel=1e-12)
        assert float(ranked["val_average_precision"][k]) == pytest.approx(skm.average_precision_score(y, s), rel=1e-12)


def test_the_logged_best_metrics_are_what_the_best_checkpoint_scores():
    result = sweeplab_run(binary=True, metrics=["val_auroc", "val_average_precision"])
    history, data = result.history, result.dataset
    logits = result.model(data.x_val).detach()[:, 0].numpy()  # the model is restored to its best state
    y = data.y_val[:, 0].numpy()
    assert history.best_metrics["val_auroc"] == pytest.approx(skm.roc_auc_score(y, logits), rel=1e-9)
    assert history.best_metrics["val_average_precision"] == pytest.approx(
        skm.average_precision_score(y, logits), rel=1e-9
    )
    regression = sweeplab_run(metrics=["val_mae", "val_r2"])
    assert sorted(regression.history.metrics) == ["val_mae", "val_r2"]  # what it asked for, no more
    assert sweeplab_run().history.metrics == {}  # the seed's run logs its losses only, as always
    pred = regression.model(regression.dataset.x_val).detach().numpy()
    y = regression.dataset.y_val.numpy()
    assert regression.history.best_metrics["val_mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-6)
    assert regression.history.best_metrics["val_r2"] == pytest.approx(skm.r2_score(y, pred), rel=1e-6)


STACKED = [
    {},
    {"metrics": ["val_mae", "val_rmse", "val_r2"]},
    {"train.clip_grad_norm": 0.5},
    {"train.clip_grad_value": 0.1},
    {"train.early_stopping": {"patience": 2, "min_delta": 0.3}},
    {"train.loss": "huber", "optimizer": "SGD", "lr": 0.05},
    {"train.loss": "smooth_l1"},
    {"objective.metric": "val_mae", "train.early_stopping": {"patience": 3}},
    {"objective.metric": "val_r2"},
    {"train.scheduler": {"class_path": "CosineAnnealingLR", "init_args": {"T_max": EPOCHS}}},
    {"train.scheduler": {"class_path": "StepLR", "init_args": {"step_size": 2, "gamma": 0.5}}, "optimizer": "SGD"},
    {
        "train.scheduler": {"class_path": "OneCycleLR", "init_args": {"max_lr": 0.05, "cycle_momentum": False}},
        "train.scheduler.interval": "step",
    },
    {"train.scheduler": {"class_path": "ReduceLROnPlateau", "init_args": {"factor": 0.5, "patience": 1}}},
    {
        "train.scheduler": {"class_path": "LinearLR", "init_args": {"start_factor": 0.1, "total_iters": 30}},
        "train.scheduler.interval": "step",
        "train.clip_grad_norm": 1.0,
    },
]


def test_stacked_members_equal_their_reference_twins_for_every_stackable_option():
    configs = [load_experiment(LAB, {"epochs": EPOCHS, **options}) for options in STACKED]
    reference = [Job(None, c) for c in configs]
    stacked = [Job(None, c) for c in configs]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    for options, ref, vec in zip(STACKED, reference, stacked):
        r, v = ref.result.history, vec.result.history
        assert v.epochs_run == r.epochs_run, options
        assert v.train_loss == pytest.approx(r.train_loss, rel=1e-4), options
        assert v.val_loss == pytest.approx(r.val_loss, rel=1e-4), options
        for name in r.metrics:
            assert v.metrics[name] == pytest.approx(r.metrics[name], rel=1e-4, abs=1e-6), (options, name)
        assert (v.best_epoch, v.status, v.stop_reason) == (r.best_epoch, r.status, r.stop_reason), options
        assert v.lr == pytest.approx(r.lr, rel=1e-6), options


def test_options_the_stacked_engine_cannot_apply_go_to_the_reference_loop_with_their_reason():
    from sweeplab.train.engines import choose

    configs = [load_experiment(LAB, {"epochs": 2, "train.accumulate_grad_batches": 2})]
    engine, reason = choose(configs)
    assert engine == "reference" and "accumulate_grad_batches" in reason
    one_cycle = {"class_path": "OneCycleLR", "init_args": {"max_lr": 0.05}, "interval": "step"}
    engine, reason = choose([load_experiment(LAB, {"epochs": 2, "train.scheduler": one_cycle})])
    assert engine == "reference" and "OneCycleLR also changes betas" in reason


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            {"train.scheduler": {"class_path": "NoSuchLR"}},
            "train.scheduler.class_path: 'NoSuchLR' is not in torch.optim.lr_scheduler",
        ),
        ({"train.loss": "bce"}, "train.loss: bce is a binary loss; task regression takes"),
        ({"train.clip_grad_norm": 1.0, "train.clip_grad_value": 1.0}, "give one of them, not both"),
        ({"train.scheduler": {"class_path": "StepLR", "monitor": "val_auroc"}}, "train.scheduler.monitor"),
        ({"objective.metric": "val_r2", "objective.direction": "minimize"}, "contradicts val_r2"),
    ],
)
def test_bad_options_are_one_line_naming_the_field(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        check_config(load_experiment(LAB, {"epochs": 1, **overrides}))


@pytest.mark.parametrize(
    "option, words",
    [
        ({"class_path": "StepLR"}, "train.scheduler: StepLR raised TypeError"),  # step_size missing
        (
            {"class_path": "CosineAnnealingLR", "init_args": {"T_max": 5, "nope": 1}},
            "unexpected keyword argument 'nope'",
        ),
    ],
)
def test_a_scheduler_that_cannot_be_built_fails_before_any_store(store, capsys, option, words):
    (store / "s.yaml").write_text(
        f"study: s\nexperiment: {LAB}\nspace: {{lr: {{low: 0.01, high: 0.1}}}}\nn_trials: 2\n"
        f"base: {{train: {{scheduler: {__import__('json').dumps(option)}}}}}\n"
    )
    assert main(["sweep", str(store / "s.yaml"), "--quiet"]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in store.iterdir()) == ["s.yaml"]  # nothing written


def test_a_loss_that_does_not_return_a_scalar_is_refused(tmp_path):
    (tmp_path / "my_losses.py").write_text("def per_sample(out, target):\n    return (out - target) ** 2\n")
    config = load_experiment(LAB, {"train.loss": {"class_path": "my_losses.per_sample"}})
    object.__setattr__(config, "_code_dir", str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"train.loss: returned \[2, 1\] on a batch of 2; a loss must return a scalar"
    ):
        check_config(config)


def test_the_sweep_files_objective_wins_and_a_loss_judged_by_itself_is_refused(tmp_path):
    from sweeplab.sweep.spec import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text(
        f"study: s\nexperiment: {LAB}\nobjective: {{metric: val_mae}}\nspace: {{loss: {{choices: [mse, huber, l1]}}}}\n"
    )
    sweep = load_sweep(path)
    assert sweep.base_config.objective.metric == "val_mae" and sweep.base_config.objective.direction == "minimize"
    path.write_text(f"study: s\nexperiment: {LAB}\nspace: {{loss: {{choices: [mse, huber]}}}}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: space.loss: searching the loss while the objective is val_loss"):
        load_sweep(path)
    path.write_text(
        f"study: s\nexperiment: {LAB}\nobjective: {{metric: val_loss}}\n"
        "space: {train.loss.init_args.delta: {low: 0.1, high: 2.0}}\n"
        "base: {train: {loss: {class_path: HuberLoss, init_args: {delta: 1.0}}}}\n"
    )
    with pytest.raises(ConfigError, match=r"space.train.loss.init_args.delta: searching the loss"):
        load_sweep(path)


CLASSIFIER_LOSSES = [
    {"task": "binary"},
    {"task": "binary", "train.loss": {"class_path": "BCEWithLogitsLoss", "init_args": {"pos_weight": 2.0}}},
    {"task": "binary", "train.loss": {"class_path": "BCEWithLogitsLoss", "init_args": {"pos_weight": "balanced"}}},
    {"task": "multiclass"},
    {"task": "multiclass", "train.loss": {"class_path": "CrossEntropyLoss", "init_args": {"label_smoothing": 0.1}}},
    {"task": "multiclass", "train.loss": {"class_path": "CrossEntropyLoss", "init_args": {"weight": [1.0, 2.0, 3.0]}}},
    {
        "task": "multiclass",
        "train.loss": {"class_path": "CrossEntropyLoss", "init_args": {"weight": "balanced", "label_smoothing": 0.2}},
        "data.noise": 1.0,
    },
    {"task": "multiclass", "train.loss": {"class_path": "CrossEntropyLoss", "init_args": {"label_smoothing": 0.05}}},
    {"train.loss": {"class_path": "HuberLoss", "init_args": {"delta": 0.3}}},
    {"train.loss": {"class_path": "HuberLoss", "init_args": {"delta": 2.0}}},
    {"train.loss": {"class_path": "SmoothL1Loss", "init_args": {"beta": 0.5}}},
]


def test_stacked_losses_equal_their_reference_twins():
    """Weighted and smoothed losses, `balanced` from each member's own training labels, and the weighted mean of a
    validation split as torch takes it for one (sum of the weighted losses over the sum of the labels' weights)."""
    configs = [load_experiment(LAB, {"epochs": 6, "data.n_classes": 3, **options}) for options in CLASSIFIER_LOSSES]
    reference = [Job(None, c) for c in configs]
    stacked = [Job(None, c) for c in configs]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    from sweeplab.train.stacked.epochs import group_members, prepare_member

    shared: dict = {}  # two smoothings, two Huber deltas: one group each, their init args per member
    groups = group_members([prepare_member(None, c, shared) for c in configs])
    assert len(groups) == 4  # binary, multiclass, Huber, SmoothL1
    for options, ref, vec in zip(CLASSIFIER_LOSSES, reference, stacked):
        r, v = ref.result.history, vec.result.history
        assert v.train_loss == pytest.approx(r.train_loss, rel=1e-4), options
        assert v.val_loss == pytest.approx(r.val_loss, rel=1e-4), options
        assert v.best_epoch == r.best_epoch, options


PINBALL = """
import torch


def pinball(outputs, targets, q=0.5):
    error = targets - outputs
    return torch.maximum(q * error, (q - 1) * error).mean().item()
"""


def test_a_metric_of_the_users_is_logged_judges_the_trials_and_trains_on_the_reference_loop(store, capsys):
    """#29: `metrics: [{name, class_path, init_args, direction}]`: per epoch, as the objective (its declared
    direction), worked out again here from the best checkpoint's outputs."""
    (store / "my_metrics.py").write_text(PINBALL)
    (store / "e.yaml").write_text(
        "name: pin\ntrain: {epochs: 6}\n"
        + "metrics:\n  - {name: val_pinball, class_path: my_metrics.pinball, init_args: {q: 0.9}, direction: minimize}\n"
        + "objective: {metric: val_pinball}\n"
    )
    config = load_experiment(store / "e.yaml")
    assert config.objective.direction == "minimize"
    result = run_experiment(config)
    history = result.history
    assert len(history.metrics["val_pinball"]) == 6
    assert history.best_value == min(history.metrics["val_pinball"])
    outputs = result.model(result.dataset.x_val).detach()
    error = result.dataset.y_val - outputs
    assert history.best_value == pytest.approx(float(torch.maximum(0.9 * error, -0.1 * error).mean()), rel=1e-6)
    from sweeplab.train.engines import choose

    engine, reason = choose([config])
    assert engine == "reference" and "metrics.class_path" in reason
    (store / "bad_metrics.py").write_text("def pinball(outputs, targets, q=0.5):\n    return 'high'\n")
    bad = load_experiment(
        store / "e.yaml",
        {"metrics": [{"name": "val_pinball", "class_path": "bad_metrics.pinball", "direction": "minimize"}]},
    )
    with pytest.raises(ConfigError, match=r"metrics.val_pinball: raised ValueError: could not convert"):
        check_config(bad)


@pytest.mark.parametrize(
    "cls, args",
    [
        (torch.optim.lr_scheduler.CosineAnnealingLR, {"T_max": 37, "eta_min": 1e-4}),
        (torch.optim.lr_scheduler.CosineAnnealingLR, {"T_max": 500}),
        (torch.optim.lr_scheduler.StepLR, {"step_size": 7, "gamma": 0.7}),
        (torch.optim.lr_scheduler.ExponentialLR, {"gamma": 0.99}),
    ],
)
def test_a_per_step_schedule_stepped_as_one_tensor_is_torchs_own(cls, args):
    """#40: the stacked engine steps a per-step CosineAnnealingLR, StepLR or ExponentialLR for all its members as
    one float64 tensor operation (no Python per member per batch); every rate over 300 steps equals the one torch's
    own scheduler gives each member, exactly (T_max 37 wraps the cosine around several times)."""
    from sweeplab.train.stacked.optim import Formula

    rates = [0.1, 0.03, 0.007, 1e-5]
    schedulers = []
    for rate in rates:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=rate)
        schedulers.append(cls(optimizer, **args))
    formula = Formula(
        Formula.settings(schedulers[0]), [(i, s.optimizer.param_groups[0]["lr"]) for i, s in enumerate(schedulers)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(300):
            for scheduler in schedulers:
                scheduler.optimizer.step()
                scheduler.step()
            assert formula.step().tolist() == [s.optimizer.param_groups[0]["lr"] for s in schedulers]
