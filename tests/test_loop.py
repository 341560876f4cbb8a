"""The core loop against the seed: its printed output, its curves bit for bit, and each of its lessons."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from sweeplab.config import load_experiment
from sweeplab.train.epoch import classification_metrics, stacked_classification_metrics
from sweeplab.train.experiment import run_experiment
from sweeplab.train.loop import (
    ShapeError,
    TensorBatches,
    check_batch,
    evaluate,
    fit,
    train_epoch,
)
from sweeplab.train.model import MLP, ModelSpec

from reference import SEED_EXPECTED_OUTPUT, seed_run


def test_lab_prints_the_seeds_expected_output(lab_path):
    out = subprocess.run(
        [sys.executable, "-m", "sweeplab", "run", str(lab_path), "--no-track"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seed_lines = SEED_EXPECTED_OUTPUT.splitlines()
    # the seed's lines, in order and identical; sweeplab may add lines (best_epoch) after them
    assert out.splitlines()[: len(seed_lines)] == seed_lines
    assert "best_epoch: 71" in out


@pytest.fixture(scope="module")
def seed_lab():
    return seed_run()


def test_lab_curves_are_bit_identical_to_the_seeds_dataloader_loop(lab_path, seed_lab):
    result = run_experiment(load_experiment(lab_path))
    assert result.history.train_loss == seed_lab["train_loss"]
    assert result.history.val_loss == seed_lab["val_loss"]
    assert result.history.best_val_loss == seed_lab["best_val"]
    assert result.history.best_epoch == seed_lab["best_epoch"]
    assert result.predictions[:, 0].tolist() == seed_lab["predictions"]
    for name, tensor in seed_lab["best_state"].items():
        assert torch.equal(result.history.best_state[name], tensor)


@pytest.mark.parametrize(
    "overrides, reference",
    [
        ({"optimizer": "SGD", "lr": 0.05}, {"optimizer": "SGD", "lr": 0.05}),  # exercise 1
        ({"hidden": 4}, {"hidden": 4}),  # exercise 2
        ({"hidden": 32}, {"hidden": 32}),
        ({"noise": 1.0}, {"noise": 1.0}),  # exercise 3
        ({"dropout": 0.2, "optimizer": "RMSprop", "lr": 0.01}, {"dropout": 0.2, "optimizer": "RMSprop", "lr": 0.01}),
        ({"task": "binary"}, {"binary": True}),  # exercise 5
    ],
)
def test_exercise_variants_match_the_seed_loop_bit_for_bit(lab_path, overrides, reference):
    epochs = 25
    result = run_experiment(load_experiment(lab_path, {**overrides, "epochs": epochs}))
    expected = seed_run(**reference, epochs=epochs)
    assert result.history.train_loss == expected["train_loss"]
    assert result.history.val_loss == expected["val_loss"]
    assert result.history.best_epoch == expected["best_epoch"]


def test_tensor_batching_and_the_dataloader_path_agree(lab_path):
    fast = run_experiment(load_experiment(lab_path, {"epochs": 10, "dropout": 0.1}))
    loader = run_experiment(load_experiment(lab_path, {"epochs": 10, "dropout": 0.1, "loader": "dataloader"}))
    assert fast.history.val_loss == loader.history.val_loss
    assert fast.history.train_loss == loader.history.train_loss


def test_unseeded_shuffle_consumes_the_global_rng_as_a_dataloader_does():
    x, y = torch.arange(10.0).unsqueeze(1), torch.zeros(10, 1)
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(3)
    expected = [b[0][:, 0].tolist() for _ in range(2) for b in DataLoader(TensorDataset(x, y), 4, shuffle=True)]
    after_expected = torch.rand(1)
    torch.manual_seed(3)
    got = [b[0][:, 0].tolist() for _ in range(2) for b in TensorBatches(x, y, 4, shuffle=True)]
    assert got == expected and torch.equal(torch.rand(1), after_expected)


# --- the seed's lessons, each on a case small enough to work out by hand -------------------------------------


def _line_model(weight=1.0, bias=0.0):
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)
    return model


def test_loss_is_averaged_by_sample_count_with_an_uneven_last_batch():
    # pred = x, target 0: batch MSEs are (1+4)/2=2.5, (9+16)/2=12.5, 25/1=25.
    # Per sample: (2.5*2 + 12.5*2 + 25*1) / 5 = 11 (= mean of x^2); the mean of batch means would be 13.33.
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    loss, _, _ = evaluate(_line_model(), TensorBatches(x, torch.zeros(5, 1), batch_size=2), nn.MSELoss())
    assert loss == pytest.approx(11.0, abs=1e-12)


def test_gradients_do_not_accumulate_across_steps_and_parameters_change():
    # pred = w*x + b with w=1, b=0 on x=[1, 2], y=0: dL/dw = mean(2*x*x) = 5, dL/db = mean(2*x) = 3.
    model = _line_model()
    batches = TensorBatches(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1), batch_size=2)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):  # without zero_grad the gradient would read 10, then 15
        train_epoch(model, batches, nn.MSELoss(), frozen)
        assert model.weight.grad.item() == pytest.approx(5.0)
        assert model.bias.grad.item() == pytest.approx(3.0)
    train_epoch(model, batches, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert model.weight.item() == pytest.approx(1 - 0.1 * 5) and model.bias.item() == pytest.approx(-0.1 * 3)


def test_best_state_is_a_copy_that_does_not_follow_training(lab_path):
    result = run_experiment(load_experiment(lab_path, {"epochs": 30, "lr": 0.1}))
    history = result.history
    snapshot = {k: v.clone() for k, v in history.best_state.items()}
    model = result.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = TensorBatches(result.dataset.x_train, result.dataset.y_train, 32)
    for _ in range(3):
        train_epoch(model, batches, nn.MSELoss(), optimizer)
    assert any(not torch.equal(p, snapshot[k]) for k, p in model.state_dict().items())
    for name, tensor in history.best_state.items():
        assert torch.equal(tensor, snapshot[name])
        assert tensor.data_ptr() != model.state_dict()[name].data_ptr()


def test_best_epoch_and_restore(lab_path):
    result = run_experiment(load_experiment(lab_path, {"epochs": 40}))
    history = result.history
    val = history.val_loss
    assert history.best_epoch == val.index(min(val)) + 1 and history.best_val_loss == min(val)
    # the restored model is the best one: it reproduces best_val_loss, not the last epoch's loss
    restored, _, _ = evaluate(result.model, TensorBatches(result.dataset.x_val, result.dataset.y_val, 48), nn.MSELoss())
    assert restored == history.best_val_loss


@pytest.mark.parametrize(
    "hidden,dropout,head", [((4,), 0.0, "net.2"), ((4,), 0.3, "net.3"), ((8, 4), 0.0, "net.4"), ((8, 4), 0.5, "net.6")]
)
def test_the_mlps_head_is_named_as_its_layers_are_laid_out(hidden, dropout, head):
    """MLP.head, which the stacked engine names each member's head by, is the last Linear of the model built."""
    model = MLP(ModelSpec(in_features=3, hidden=hidden, out_features=2, dropout=dropout))
    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    assert last == head == MLP.head(model.spec)
    assert model.state_dict()[f"{head}.weight"].shape == (2, hidden[-1])


def test_validation_is_in_eval_mode_without_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Dropout(0.5), nn.Linear(64, 1))
    batches = TensorBatches(torch.randn(40, 2), torch.randn(40, 1), batch_size=16)
    model.train()
    first, _, _ = evaluate(model, batches, nn.MSELoss())
    second, _, _ = evaluate(model, batches, nn.MSELoss())
    assert first == second  # dropout is off in eval mode; in train mode the two would differ
    assert all(p.grad is None for p in model.parameters())


def test_a_diverging_run_is_recorded_not_raised(lab_path):
    result = run_experiment(load_experiment(lab_path, {"optimizer": "SGD", "lr": 10.0, "epochs": 50}))
    history = result.history
    assert history.status == "diverged"
    assert history.stop_reason.startswith(f"diverged at epoch {history.epochs_run}")
    assert history.epochs_run < 50


def test_label_shape_mismatch_is_a_clear_error_naming_both_shapes():
    with pytest.raises(ShapeError, match=r"labels \[8\] torch.float32 .* output \[8, 1\]"):
        check_batch(torch.zeros(8, 1), torch.zeros(8), nn.MSELoss())
    with pytest.raises(ShapeError, match=r"class indices of shape \[8\] torch.int64"):
        check_batch(torch.zeros(8, 3), torch.zeros(8, 1), nn.CrossEntropyLoss())
    model = _line_model()
    batches = TensorBatches(torch.ones(4, 1), torch.ones(4), batch_size=2)  # labels [N], not [N, 1]
    with pytest.raises(ShapeError):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), batches, batches, epochs=1)


def test_classification_metrics_by_hand():
    # binary: predicted [1,1,0,0,1], actual [1,0,0,1,1] -> TP=2 FP=1 FN=1 TN=1
    logits = torch.tensor([[2.0], [1.0], [-1.0], [-3.0], [0.5]])
    actual = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]])
    metrics, confusion = classification_metrics(logits, actual, "binary")
    assert confusion == [[1, 1], [1, 2]]
    # ranked by score: 2 (pos), 1 (neg), 0.5 (pos), -1 (neg), -3 (pos): of the 6 (pos, neg) pairs, 3 are ordered
    # right -> AUROC 1/2; the precision at each positive, 1, 2/3, 3/5 -> average precision 34/45
    assert metrics == pytest.approx(
        {
            "val_accuracy": 3 / 5,
            "val_precision": 2 / 3,
            "val_recall": 2 / 3,
            "val_f1": 2 / 3,
            "val_auroc": 1 / 2,
            "val_average_precision": 34 / 45,
        }
    )
    # multiclass: predicted [0,1,2,2], actual [0,1,1,2]: F1 per class 1, 2/3, 2/3
    logits = torch.eye(3)[[0, 1, 2, 2]]
    metrics, confusion = classification_metrics(logits, torch.tensor([0, 1, 1, 2]), "multiclass")
    assert confusion == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert metrics == pytest.approx({"val_accuracy": 0.75, "val_macro_f1": (1 + 2 / 3 + 2 / 3) / 3})


def test_stacked_classification_metrics_keep_each_member_apart_by_hand():
    """Two members at once (the vectorized engine's case): each member's own confusion matrix and metrics."""
    # member 0, binary: predicted [1,1,0,0], actual [1,0,0,1] -> TP=1 FP=1 FN=1 TN=1
    # member 1, binary: predicted [0,0,0,0], actual [1,0,0,1] -> TP=0 FP=0 FN=2 TN=2: precision undefined -> 0
    logits = torch.tensor([[[2.0], [1.0], [-1.0], [-3.0]], [[-1.0], [-1.0], [-1.0], [-1.0]]])
    actual = torch.tensor([[1.0], [0.0], [0.0], [1.0]]).expand(2, 4, 1)
    metrics, confusion = stacked_classification_metrics(logits, actual, "binary")
    assert confusion.tolist() == [[[1, 1], [1, 1]], [[2, 0], [2, 0]]]
    assert metrics["val_accuracy"].tolist() == [0.5, 0.5]
    assert metrics["val_precision"].tolist() == [0.5, 0.0] and metrics["val_recall"].tolist() == [0.5, 0.0]
    assert metrics["val_f1"].tolist() == [0.5, 0.0]
    # multiclass, 3 classes: member 0 predicts [0,1,2] for actual [0,1,2] (all right); member 1 predicts [2,2,2]:
    # class 2 has precision 1/3, recall 1 -> F1 1/2, the others 0 -> macro-F1 1/6
    logits = torch.stack([torch.eye(3), torch.eye(3)[[2, 2, 2]]])
    metrics, confusion = stacked_classification_metrics(logits, torch.tensor([[0, 1, 2], [0, 1, 2]]), "multiclass")
    assert confusion.tolist() == [[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 0, 1], [0, 0, 1]]]
    assert metrics["val_accuracy"].tolist() == pytest.approx([1.0, 1 / 3])
    assert metrics["val_macro_f1"].tolist() == pytest.approx([1.0, 1 / 6])


@pytest.mark.parametrize(
    "task, metric, floor", [("binary", "val_accuracy", 0.93), ("multiclass", "val_accuracy", 0.85)]
)
def test_classification_tasks_train_to_high_accuracy(lab_path, task, metric, floor):
    result = run_experiment(load_experiment(lab_path, {"task": task, "epochs": 60}))
    assert result.history.best_metrics[metric] >= floor
    assert result.history.status == "completed"


def test_run_without_tracking_imports_neither_mlflow_nor_optuna(lab_path):
    script = (
        "import sys; from sweeplab.cli import main; "
        f"main(['run', {str(lab_path)!r}, '--no-track', 'epochs=2']); "
        "print('loaded:', sorted({'mlflow', 'optuna', 'torch._dynamo'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "loaded: []"


class ChangesShape(nn.Module):
    """[B, 1] on its first call, [B, 2] after: MSE would broadcast [B, 2] against [B, 1] labels without a word."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        return out[:, :1] if self.calls == 1 else out


def test_an_output_that_changes_shape_between_batches_fails_in_one_line():
    """Issue #27.2: only the first batch was checked; the second trained on a broadcast loss, "completed"."""
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    model = ChangesShape()
    batches = TensorBatches(x, y, batch_size=4)
    with pytest.raises(ShapeError, match=r"labels \[4, 1\] torch.float32 do not fit output \[4, 2\]"):
        train_epoch(model, batches, nn.MSELoss(), torch.optim.SGD(model.parameters(), lr=0.1), check_shapes=True)
    model = ChangesShape()
    model.calls = 1  # validation: its later batches are checked too
    with pytest.raises(ShapeError):
        evaluate(model, batches, nn.MSELoss())
