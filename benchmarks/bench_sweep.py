"""A sweep the textbook way against `sweeplab sweep`, on the same trials, side by side in one run.

Textbook: the seed's DataLoader loop inside an Optuna objective, `mlflow.log_metric` once per value per epoch,
`mlflow.pytorch.log_model` per trial (as the tutorials write it: input example, no pip_requirements).
sweeplab: `sweeplab sweep` with all its logging (batched curves, params, tags, checkpoint, dataset, champion).
Both run the same fixed trials, enqueued in the same order, each in fresh stores in a temporary folder.
Then `workers=2` against `workers=1` on a larger sweep.

Usage: python benchmarks/bench_sweep.py [TEXTBOOK_TRIALS] [SCALING_TRIALS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "experiments" / "training_loop_lab.yaml"
TRIALS = [
    ("Adam", 0.03, 16, 0.3),
    ("SGD", 0.05, 32, 1.0),
    ("RMSprop", 0.01, 8, 0.3),
    ("AdamW", 0.02, 64, 1.0),
    ("Adam", 0.005, 4, 1.0),
    ("SGD", 0.01, 16, 0.3),
]

TEXTBOOK = textwrap.dedent("""
    import sys, time, copy
    import numpy as np, optuna, mlflow, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset, random_split

    TRIALS = eval(sys.argv[1])
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    mlflow.set_experiment("textbook")

    def objective(trial):
        optimizer_name = trial.suggest_categorical("optimizer", ["Adam", "AdamW", "SGD", "RMSprop"])
        lr = trial.suggest_float("lr", 1e-4, 0.3, log=True)
        hidden = trial.suggest_categorical("hidden", [4, 8, 16, 32, 64])
        noise = trial.suggest_categorical("noise", [0.3, 1.0])
        with mlflow.start_run(nested=True):
            mlflow.log_params(trial.params)
            torch.manual_seed(42)
            X = torch.randn(240, 2)
            y = 3 * X[:, [0]] + 2 * X[:, [1]] + 5 + torch.randn(240, 1) * noise
            train_ds, val_ds = random_split(TensorDataset(X, y), [192, 48], generator=torch.Generator().manual_seed(42))
            train_loader = DataLoader(train_ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(7))
            val_loader = DataLoader(val_ds, batch_size=48)
            model = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            opt = getattr(torch.optim, optimizer_name)(model.parameters(), lr=lr)
            loss_fn = nn.MSELoss()
            best_val, best_state = float("inf"), None
            for epoch in range(1, 81):
                model.train()
                total = 0.0
                for bx, by in train_loader:
                    loss = loss_fn(model(bx), by)
                    opt.zero_grad(); loss.backward(); opt.step()
                    total += loss.item() * len(bx)
                train_loss = total / len(train_loader.dataset)
                model.eval()
                total = 0.0
                with torch.no_grad():
                    for bx, by in val_loader:
                        total += loss_fn(model(bx), by).item() * len(bx)
                val_loss = total / len(val_loader.dataset)
                mlflow.log_metric("train_loss", train_loss, step=epoch)
                mlflow.log_metric("val_loss", val_loss, step=epoch)
                if val_loss < best_val:
                    best_val, best_state = val_loss, copy.deepcopy(model.state_dict())
            model.load_state_dict(best_state)
            mlflow.log_metric("best_val_loss", best_val)
            mlflow.pytorch.log_model(model, name="model", input_example=X[:5].numpy())
        return best_val

    study = optuna.create_study(direction="minimize")
    for o, lr, h, n in TRIALS:
        study.enqueue_trial({"optimizer": o, "lr": lr, "hidden": h, "noise": n})
    with mlflow.start_run():
        start = time.perf_counter()
        study.optimize(objective, n_trials=len(TRIALS))
    print(time.perf_counter() - start)
""")


def sweep_file(folder: Path, n_trials: int, sampler: str = "random") -> Path:
    path = folder / "bench.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        study: bench
        experiment: {LAB}
        space:
          optimizer: {{choices: [Adam, AdamW, SGD, RMSprop]}}
          lr: {{low: 0.0001, high: 0.3, log: true}}
          hidden: {{choices: [4, 8, 16, 32, 64]}}
          noise: {{choices: [0.3, 1.0]}}
        sampler: {{type: {sampler}, seed: 0}}
        n_trials: {n_trials}
        engine: reference  # the reference runtime is what these figures measure (workers, per-trial costs)
        """)
    )
    return path


def enqueue(folder: Path, trials) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    study = optuna.create_study(study_name="bench", storage=storage, direction="minimize")
    for optimizer, lr, hidden, noise in trials:
        study.enqueue_trial({"optimizer": optimizer, "lr": lr, "hidden": hidden, "noise": noise})


def run_sweeplab(folder: Path, n_trials: int, workers: int = 1, trials=None) -> tuple[float, float]:
    """(whole-process seconds, trial-phase seconds): the trial phase runs from the first trial's MLflow run
    start to the last one's end, so it leaves out imports, store set-up and the champion's export."""
    sweep = sweep_file(folder, n_trials)
    if trials:
        enqueue(folder, trials)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeplab",
            "sweep",
            str(sweep),
            f"workers={workers}",
            "--quiet",
            "--no-report",
        ],  # the report is a product of its own, measured by bench_report
        cwd=folder,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    whole = time.perf_counter() - start
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("bench")
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=5000)
        if r.data.tags.get("sweeplab.role") == "trial"
    ]
    assert len(runs) == n_trials, (len(runs), n_trials)
    phase = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return whole, phase


def main() -> None:
    n_textbook = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    n_scaling = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    trials = TRIALS[:n_textbook]
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", TEXTBOOK, repr(trials)], cwd=a, check=True, capture_output=True, text=True
        ).stdout
        textbook_whole = time.perf_counter() - start
        textbook_phase = float(out.strip().splitlines()[-1])
        ours_whole, ours_phase = run_sweeplab(Path(b), len(trials), trials=trials)
    n = len(trials)
    print(f"{n} identical trials, 80 epochs each        whole process    trial phase   per trial")
    print(
        f"textbook (DataLoader, log_metric, log_model) {textbook_whole:8.2f} s   {textbook_phase:8.2f} s   {textbook_phase / n:7.3f} s"
    )
    print(
        f"sweeplab sweep, all logging                  {ours_whole:8.2f} s   {ours_phase:8.2f} s   {ours_phase / n:7.3f} s"
    )
    print(
        f"speed-up per trial {textbook_phase / ours_phase:6.1f}x (goal >= 20x); whole process "
        f"{textbook_whole / ours_whole:.1f}x (sweeplab's includes ~3 s of champion export, once per sweep)"
    )
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        one_whole, one_phase = run_sweeplab(Path(a), n_scaling, workers=1)
        two_whole, two_phase = run_sweeplab(Path(b), n_scaling, workers=2)
    print(f"{n_scaling}-trial sweep            whole process    trial phase")
    print(f"workers=1                     {one_whole:8.2f} s   {one_phase:8.2f} s")
    print(f"workers=2                     {two_whole:8.2f} s   {two_phase:8.2f} s")
    print(
        f"speed-up workers=2 / workers=1: trial phase {one_phase / two_phase:4.2f}x (goal >= 1.7x), "
        f"whole process {one_whole / two_whole:4.2f}x"
    )


if __name__ == "__main__":
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("SWEEPLAB_STORAGE", None)
    main()
