"""The champion as MLflow loads it: MLflow's "models from code", copied into every registered champion.

This file runs where sweeplab may not be installed (`mlflow.pyfunc.load_model`, `mlflow models serve`), so it
imports nothing of sweeplab: only torch, numpy, pandas and MLflow. The weights are a `torch.export` program
(`artifacts/program.pt2`, no pickle); `artifacts/model.json` says what the model takes and gives.

Inputs: a DataFrame with named columns is read by name (in any order; an unknown or missing name is refused),
an array, a list of rows or a DataFrame with unnamed columns by position; an image model takes [N, C, H, W] arrays
or flat rows of C*H*W values; float32, float64 and integers are fine; no rows, other nestings, NaN, infinity and
numbers float32 cannot hold are refused, in one line (HTTP 400 when served). Outputs: regression gives the predicted
values (`params={"output": "values"}`, the only one); a classifier gives labels, or with
`params={"output": "probabilities"}` one column of probabilities per class. An input whose output is not finite is
refused rather than answered with NaN (not JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

OUTPUTS = ("label", "probabilities")  # a classifier's `output` param; regression gives values


class BadInput(MlflowException):
    """Input the model cannot take: one line, and HTTP 400 from `mlflow models serve`."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class Champion(mlflow.pyfunc.PythonModel):
    """The exported program, with the input handling and the outputs described above."""

    # MLflow's type-hint validation (and its warning that `predict` has no type hints) is what this class
    # replaces: its schema would read named columns by position
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.meta = json.loads(Path(context.artifacts["model"]).read_text())
        self.program = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        task = self.meta["task"]
        outputs = ("values",) if task == "regression" else OUTPUTS
        output = (params or {}).get("output") or outputs[0]
        if output not in outputs:
            kind = "a regression model" if task == "regression" else "a classifier"
            raise BadInput(f"params.output: {output!r}; {kind} gives {' or '.join(outputs)}")
        names = self.meta["feature_names"]
        shape = self.meta.get("input_shape") or [len(names)]
        rows = input_rows(model_input, names, shape)
        x = torch.from_numpy(rows.astype(np.float32)).reshape(-1, *shape)
        with torch.no_grad():
            out = self.program(x)
        bad = ~torch.isfinite(out).reshape(out.shape[0], -1).all(dim=1)
        if bool(bad.any()):  # JSON has no NaN or infinity: refused, not answered with invalid JSON
            raise BadInput(
                f"input: row {int(bad.nonzero()[0])} gives a non-finite output (values far outside the training data?)"
            )
        return describe(out, task, self.meta.get("classes"), output)


def describe(out, task: str, classes, output: str):
    """Values for regression (a row of outputs per input row), labels or class probabilities otherwise."""
    if task == "regression":
        return out.double().numpy()  # [N, outputs], as the champion has always answered
    if task == "binary":
        p1 = torch.sigmoid(out.double()[:, 0]).numpy()
        probs = np.stack([1 - p1, p1], axis=1)
    else:
        probs = torch.softmax(out.double(), dim=1).numpy()
    classes = list(classes or range(probs.shape[1]))
    if output == "probabilities":
        return pd.DataFrame(probs, columns=[str(c) for c in classes])
    return np.asarray(classes)[probs.argmax(axis=1)]


FLOAT32_MAX = float(np.finfo(np.float32).max)


def input_rows(model_input, names: list[str], shape: list[int] | None = None) -> np.ndarray:
    """The input as a float64 [N, features] array: named columns by name, anything else by position. An image
    model (`shape` [C, H, W]) takes [N, C, H, W] arrays or flat rows of C*H*W values; any other nesting is refused,
    as are no rows, NaN, infinity, and numbers float32 cannot hold."""
    shape = list(shape or [len(names)])
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame().T
    if isinstance(model_input, pd.DataFrame):
        columns = [str(c) for c in model_input.columns]
        named = not all(isinstance(c, (int, np.integer)) for c in model_input.columns)
        if named:
            missing = [n for n in names if n not in columns]
            unknown = [c for c in columns if c not in names]
            if missing or unknown:
                said = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + (
                    [f"unknown column(s) {', '.join(unknown)}"] if unknown else []
                )
                raise BadInput(f"input: {'; '.join(said)} (the model takes {', '.join(names)})")
            model_input = model_input[names]
        frame = model_input
        columns = names if named else [names[i] if i < len(names) else str(i) for i in range(frame.shape[1])]
        values = frame.to_numpy()
    else:
        try:
            values = np.asarray(model_input)
        except (ValueError, TypeError):
            raise BadInput("input: rows of different lengths (each row gives every feature)") from None
        columns = names
    width = int(np.prod(shape))
    if values.ndim == 1:
        values = values.reshape(1, -1) if width > 1 or values.size == 0 else values.reshape(-1, 1)
    if values.ndim != 2:
        if list(values.shape[1:]) != shape:  # [[[1, 2]]] is not [[1, 2]]
            wanted = f"[N, {', '.join(map(str, shape))}] or rows" if len(shape) > 1 else "rows"
            wanted += f" of {width} values"
            raise BadInput(f"input: an array of shape {list(values.shape)}; the model takes {wanted}")
        values = values.reshape(values.shape[0], -1)
    if values.shape[0] == 0:
        raise BadInput("input: no rows")
    if values.shape[1] != width:
        said = f" ({', '.join(names)})" if len(shape) == 1 and len(names) <= 20 else ""
        raise BadInput(f"input: rows of {values.shape[1]} values; the model takes {width}{said}")
    try:
        numbers = values.astype(np.float64)
    except (ValueError, TypeError):
        numbers = None
    if numbers is None or not (np.abs(numbers) <= FLOAT32_MAX).all():  # NaN fails the comparison too
        for row, col in np.ndindex(values.shape):
            number = _number(values[row, col])
            if number is None or not abs(number) <= FLOAT32_MAX:
                kind = "not a number" if number is None else "not a finite number (NaN, infinity, or beyond float32)"
                column = columns[col] if col < len(columns) else str(col)
                raise BadInput(f"input: row {row}, column {column}: {str(values[row, col])!r} is {kind}")
    return numbers


def _number(value) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


mlflow.models.set_model(Champion())
