"""sweeplab: Optuna sweeps over a PyTorch training loop, every trial tracked in MLflow.

One package per layer, each importing only those below it: train/ (the loop and the engines; no MLflow, no
Optuna), track/ (MLflow), sweep/ (Optuna and the driver), report/ (pandas); the commands (cli.py, console.py) on
top, and the ground floor every layer stands on (config.py, stores.py, stop.py, outcome.py, process.py). Start at
cli.py for the commands, train/loop.py for the training loop, sweep/driver.py for a sweep. In a notebook:

    import sweeplab
    result = sweeplab.sweep("sweeps/digits_cnn.yaml", n_trials=8)        # or a dict; objects for class paths
    result.trials                                                        # a DataFrame, one row per trial
    run = sweeplab.run({"data": {...}, "model": {"class_path": MyNet}}, epochs=4)
    run.history                                                          # a DataFrame per epoch
    model = sweeplab.load_model("models:/optimizer_hidden_noise@champion")   # torch.nn.Module, eval mode
    sweeplab.predict("optimizer_hidden_noise", [[1.0, 2.0]])                 # values, or class probabilities
"""

from __future__ import annotations

import types

from sweeplab import sweep as _sweep_package  # the package sweeplab/sweep/ (its __init__ imports nothing)
from sweeplab.version import __version__  # noqa: E402,F401  (the ground floor holds it)


class _CallableSweep(types.ModuleType):
    """`sweeplab.sweep` is both the sweep runtime's package (`import sweeplab.sweep.driver`) and the function
    `sweeplab.sweep(spec, ...)`: importing a submodule sets the package as the parent's attribute, so the package
    itself answers the call."""

    def __call__(self, spec, *, tracking_uri=None, storage=None, quiet=False, **overrides):
        from sweeplab.api import sweep

        return sweep(spec, tracking_uri=tracking_uri, storage=storage, quiet=quiet, **overrides)


_sweep_package.__class__ = _CallableSweep


def _quiet_notebook_tqdm() -> None:
    """In a Jupyter kernel without ipywidgets, tqdm.auto (which Optuna imports) warns "IProgress not found" into
    the notebook's first sweep cell, with a path into site-packages. sweeplab's bars are text there anyway
    (console.Progress picks the widget bars only where ipywidgets is installed), so tqdm.auto is imported first,
    with that one warning silenced. Outside a kernel nothing is done."""
    import sys

    if "ipykernel" not in sys.modules or "tqdm.autonotebook" in sys.modules:
        return
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto  # noqa: F401


_quiet_notebook_tqdm()


def run(experiment=None, *, like=None, tracking_uri=None, track=True, **overrides):
    """Train one experiment (a file's path, or a dict of its form whose class_path may be the class itself);
    `overrides` as on the command line (`epochs=20`). Returns a RunResult: .history (a DataFrame per epoch),
    .best_epoch, .best, .model (best state restored), .run_id. Bad input raises sweeplab.ConfigError.
    `like=RUN_ID`: a logged run's configuration trained again, its seed and engine included (`sweeplab rerun`);
    .rerun then says how far its curves are from the original's."""
    from sweeplab.api import run as run_

    return run_(experiment, like=like, tracking_uri=tracking_uri, track=track, **overrides)


def __getattr__(name: str):
    """ConfigError, SweepResult and RunResult on first use: `import sweeplab` stays free of torch and MLflow."""
    if name == "ConfigError":
        from sweeplab.config import ConfigError

        return ConfigError
    if name in ("SweepResult", "RunResult"):
        from sweeplab import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_model(model: str, tracking_uri: str | None = None, device: str = "cpu"):
    """A logged model as a torch.nn.Module in eval mode. `model` is a run id, a study (its best trial), or a
    `models:/NAME@ALIAS` / `models:/NAME/VERSION` URI; the weights load with torch.load(weights_only=True)."""
    from sweeplab.track.serve import load_logged_model  # on use: `import sweeplab` stays free of torch and MLflow

    return load_logged_model(model, tracking_uri, device)[0]


def predict(model, x, tracking_uri: str | None = None, device: str = "cpu"):
    """Predictions for rows x (a list of rows, an array or a tensor): regression values [N], a binary model's
    probability of class 1 [N], or a multi-class model's class probabilities [N, K], as a torch.Tensor."""
    import torch  # on use, as above

    from sweeplab.track.serve import load_logged_model
    from sweeplab.train.loop import predict as forward

    if isinstance(model, str):
        module, spec, _ = load_logged_model(model, tracking_uri, device)
    else:
        module, spec = model, getattr(model, "spec", None)
    rows = torch.as_tensor(x, dtype=torch.float32)
    outputs = forward(module, rows.unsqueeze(0) if rows.dim() == 1 else rows)
    task = getattr(spec, "task", "regression")
    if task == "binary":
        return torch.sigmoid(outputs[:, 0])
    if task == "multiclass":
        return torch.softmax(outputs, dim=1)
    return outputs[:, 0]
