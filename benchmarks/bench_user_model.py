"""A user's own model (the digits CNN of experiments/digits_nets.py): what sweeplab's tracking costs per trial.

Three ways to train the same trials (the CNN on scikit-learn's digits, 1,437 training images, batch 64, Adam,
EPOCHS epochs each, channels 8 and 16 in turn), timed in one run, side by side:

- plain:    the same model trained by a plain loop in this file (index batches, forward, loss, zero_grad, backward,
            step, evaluate) with no tracking at all: the floor;
- sweeplab: `sweeplab sweep` with everything it does per trial (an Optuna trial, an MLflow run with params and
            per-epoch curves, best state, checkpoint, code and dataset artifacts, the champion at the end), as the
            marginal cost of a trial: (time of a sweep of 2N trials - time of one of N) / N, whole processes, so
            start-up and the one-off champion export cancel out;
- textbook: the way optuna-examples and MLflow's examples do it: a DataLoader, `mlflow.log_metric` per value,
            `mlflow.pytorch.log_model` per trial, in one process, per trial.

Usage: python benchmarks/bench_user_model.py [N] [EPOCHS]  (defaults 6 and 10; N even)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from digits_nets import SmallCNN  # noqa: E402  (the example model, imported as a user's module)


def digits():
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(42))
    n_val = int(len(y) * 0.2)
    train, val = perm[n_val:], perm[:n_val]
    return x[train], y[train], x[val], y[val]


def plain_trial(data, channels: int, epochs: int) -> float:
    x_train, y_train, x_val, y_val = data
    torch.manual_seed(0)
    model = SmallCNN(channels=channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(7)
    start = time.perf_counter()
    best = 0.0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for batch in order.split(64):
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
        best = max(best, accuracy)
    return time.perf_counter() - start


def textbook_trial(data, channels: int, epochs: int, number: int) -> float:
    import copy

    import mlflow
    from torch.utils.data import DataLoader, TensorDataset

    x_train, y_train, x_val, y_val = data
    torch.manual_seed(0)
    start = time.perf_counter()
    model = SmallCNN(channels=channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = DataLoader(
        TensorDataset(x_train, y_train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=len(y_val))
    with mlflow.start_run(run_name=f"trial {number}"):
        mlflow.log_params({"channels": channels, "lr": 0.003, "epochs": epochs})
        best, best_state = -1.0, None
        for epoch in range(1, epochs + 1):
            model.train()
            total = 0.0
            for batch_x, batch_y in train_loader:
                loss = loss_fn(model(batch_x), batch_y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch_y)
            model.eval()
            with torch.no_grad():
                val_loss, correct = 0.0, 0
                for batch_x, batch_y in val_loader:
                    out = model(batch_x)
                    val_loss += loss_fn(out, batch_y).item() * len(batch_y)
                    correct += (out.argmax(1) == batch_y).sum().item()
            accuracy = correct / len(y_val)
            mlflow.log_metric("train_loss", total / len(y_train), step=epoch)
            mlflow.log_metric("val_loss", val_loss / len(y_val), step=epoch)
            mlflow.log_metric("val_accuracy", accuracy, step=epoch)
            if accuracy > best:
                best, best_state = accuracy, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        mlflow.log_metric("best_val_accuracy", best)
        mlflow.pytorch.log_model(model, name="model", input_example=x_val[:4].numpy())
    return time.perf_counter() - start


def sweep_file(folder: Path, n_trials: int, epochs: int) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        study: bench_cnn_{n_trials}
        experiment: {ROOT / "experiments/digits_cnn.yaml"}
        base: {{train: {{epochs: {epochs}}}, model: {{init_args: {{dropout: 0.0}}}}}}
        space:                # a grid: half the trials at each width, as the plain loop's
          channels: {{choices: [8, 16]}}
          seed: {{choices: {list(range(n_trials // 2))}}}
        sampler: {{type: grid}}
        n_trials: {n_trials}
        engine: reference     # one trial at a time, as the plain loop: tracking's cost (stacking: bench_stacked.py)
        """)
    )
    return path


def sweeplab_sweep(n_trials: int, epochs: int) -> tuple[float, list[float]]:
    """(whole-process seconds, each trial run's seconds from its start to its end: training and all its tracking)."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="bench-cnn-") as tmp:
        sweep = sweep_file(Path(tmp), n_trials, epochs)
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sweeplab",
                "sweep",
                str(sweep),
                "--no-report",
                "--tracking-uri",
                f"sqlite:///{tmp}/runs.db",
                "--storage",
                f"journal:{tmp}/optuna.journal",
            ],
            cwd=tmp,
            check=True,
            capture_output=True,
        )
        whole = time.perf_counter() - start
        client = MlflowClient(f"sqlite:///{tmp}/runs.db")
        experiment = client.get_experiment_by_name(f"bench_cnn_{n_trials}")
        runs = client.search_runs([experiment.experiment_id], "tags.`sweeplab.role` = 'trial'")
        return whole, [(r.info.end_time - r.info.start_time) / 1000 for r in runs]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    torch.set_num_threads(torch.get_num_threads())
    data = digits()
    widths = [8, 16] * n
    # The same optimizer code path as sweeplab's command line (torch.optim without its torch._dynamo wrappers,
    # src/sweeplab/_eager.py), so the difference is the tracking, not the wrappers.
    from sweeplab._eager import skip_dynamo_wrappers

    skip_dynamo_wrappers()
    plain_trial(data, 8, 1)  # warm-up
    plain, sweeps, runs = [], {}, []
    for size in (n, 2 * n, n, 2 * n):  # alternately, so machine noise hits both alike
        plain += [plain_trial(data, channels, epochs) for channels in widths[: n // 2]]
        whole, durations = sweeplab_sweep(size, epochs)
        sweeps.setdefault(size, []).append(whole)
        runs += durations
    marginal = (min(sweeps[2 * n]) - min(sweeps[n])) / n
    per_run = statistics.median(runs)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-textbook-") as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("textbook")
        textbook_trial(data, 8, 1, -1)  # the first log_model pays its imports
        textbook = [textbook_trial(data, channels, epochs, i) for i, channels in enumerate(widths[:n])]
    plain_s, textbook_s = statistics.median(plain), statistics.median(textbook)
    print(f"digits CNN, {epochs} epochs a trial, {n} trials per measurement, {torch.get_num_threads()} threads")
    print(f"plain loop, no tracking      {plain_s:6.3f} s a trial  (median of {len(plain)})")
    print(
        f"sweeplab sweep, all tracking {per_run:6.3f} s a trial  (median of {len(runs)} trial runs, start to end: "
        "data, model, training, every MLflow write)"
    )
    print(
        f"   marginal, whole process   {marginal:6.3f} s a trial  (sweeps of {2 * n} and {n} trials: "
        f"{min(sweeps[2 * n]):.1f} s and {min(sweeps[n]):.1f} s; adds the ask and tell)"
    )
    print(f"textbook (DataLoader, log_metric per value, log_model per trial) {textbook_s:6.3f} s a trial")
    print(f"ratio sweeplab/plain         {per_run / plain_s:6.2f}x  (goal: <= 1.10x: tracking costs <= 10%)")
    print(f"ratio textbook/sweeplab      {textbook_s / per_run:6.2f}x")


if __name__ == "__main__":
    main()
