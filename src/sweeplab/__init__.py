"""sweeplab: Optuna sweeps over a PyTorch training loop, every trial tracked in MLflow.

One package per layer, each importing only those below it: train/ (the loop and the engines; no MLflow, no
Optuna), track/ (MLflow), sweep/ (Optuna and the driver), report/ (pandas); the commands (cli.py, console.py) on
top, and the ground floor every layer stands on (config.py, stores.py, stop.py, outcome.py, process.py). Start at
cli.py for the commands, train/loop.py for the training loop, sweep/driver.py for a sweep. In a notebook:

    import sweeplab
    model = sweeplab.load_model("models:/optimizer_hidden_noise@champion")   # torch.nn.Module, eval mode
    sweeplab.predict("optimizer_hidden_noise", [[1.0, 2.0]])                 # values, or class probabilities
"""

from __future__ import annotations

__version__ = "0.1.0"


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
