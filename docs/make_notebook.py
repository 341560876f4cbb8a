"""Writes docs/sweeplab_notebook.ipynb and runs it with nbclient (outputs kept, so it reads as a worked example):

    .venv/bin/python docs/make_notebook.py

The notebook is what a notebook user writes: a model class in a cell, the data as arrays from a plain function,
`sweeplab.sweep` and `sweeplab.run` with those objects, the results as pandas frames, plotted with matplotlib.
tests/test_api.py runs the same notebook in a temporary folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

CELLS = [
    (
        "markdown",
        "# sweeplab in a notebook\n\nA model class defined in a cell, the data as arrays from a plain function, and "
        "a sweep over the learning rate and the width: `sweeplab.sweep` takes the objects where a sweep file takes "
        "import paths, and gives back pandas frames. The runs land in `notebook-runs.db` beside the notebook.",
    ),
    (
        "code",
        """\
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import sweeplab


class DigitsCNN(nn.Module):
    def __init__(self, n_classes, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels * 16, n_classes)

    def forward(self, x):
        return self.head(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def digits():
    data = load_digits()
    return (data.images[:, None] / 16.0).astype(np.float32), data.target""",
    ),
    (
        "code",
        """\
experiment = {
    "task": "multiclass",
    "data": {"source": "python", "class_path": digits, "val_size": 0.2},
    "model": {"class_path": DigitsCNN},
    "train": {"epochs": 6, "batch_size": 64},
    "objective": {"metric": "val_accuracy"},
}
spec = {
    "study": "notebook_digits",
    "experiment": experiment,
    "space": {
        "lr": {"low": 1e-3, "high": 3e-2, "log": True},
        "channels": {"choices": [4, 8, 16]},
    },
    "sampler": {"type": "random", "seed": 0},
    "n_trials": 8,
}
result = sweeplab.sweep(spec, tracking_uri="sqlite:///notebook-runs.db")
result.trials""",
    ),
    (
        "code",
        """\
ax = result.trials.plot.scatter(x="lr", y="best_val_accuracy", c="channels", cmap="viridis", logx=True)
ax.set_xlabel("learning rate (log scale)")
ax.set_ylabel("best validation accuracy")
ax.set_title(f"{result.study_name}: {len(result.trials)} trials, colour = channels");""",
    ),
    ("code", "print(result.report())\nresult.best"),
    (
        "code",
        """\
best = result.best.iloc[0]  # the sweep's best trial, trained again alone: its seed, its engine (sweeplab rerun)
run = sweeplab.run(like=best["run_id"], tracking_uri="sqlite:///notebook-runs.db")
print(run.rerun)
ax = run.history.plot(x="epoch", y=["train_loss", "val_loss"], marker="o")
ax.set_xlabel("epoch")
ax.set_ylabel("cross-entropy (per sample)")
ax.set_title(f"trial #{int(best['trial'])} trained again: best epoch {run.best_epoch}, val_accuracy {run.best:.3f}");""",
    ),
    (
        "code",
        """\
import mlflow

mlflow.set_tracking_uri("sqlite:///notebook-runs.db")
champion = mlflow.pyfunc.load_model(result.champion)  # loads without this notebook: a torch.export program
images, labels = digits()
print("champion:", result.champion)
print("predicted:", champion.predict(images[:10].astype("float64")).tolist())
print("actual:   ", labels[:10].tolist())""",
    ),
]


def notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, text in CELLS:
        nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text))
    return nb


def execute(nb: nbformat.NotebookNode, folder: Path, timeout: int = 600) -> nbformat.NotebookNode:
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return nb


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sweeplab-notebook-") as tmp:
        done = execute(notebook(), Path(tmp))
    nbformat.write(done, HERE / "sweeplab_notebook.ipynb")
    print(f"wrote {HERE / 'sweeplab_notebook.ipynb'}", file=sys.stderr)
