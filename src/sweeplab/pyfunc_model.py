"""The champion as MLflow loads it: MLflow's "models from code", copied into every registered champion.

This file runs where sweeplab may not be installed (`mlflow.pyfunc.load_model`, `mlflow models serve`), so it
imports nothing of sweeplab: only torch, numpy, pandas and MLflow. The weights are a `torch.export` program
(`artifacts/program.pt2`, no pickle); `artifacts/model.json` says what the model takes and gives.

Inputs: a DataFrame with named columns is read by name (in any order; an unknown or missing name is refused),
an array, a list of rows or a DataFrame with unnamed columns by position; integers are fine; NaN and infinity are
refused. Outputs: regression gives the predicted values; a classifier gives labels, or with
`params={"output": "probabilities"}` one column of probabilities per class.
"""

from __future__ import annotations

import json
import math
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
        output = (params or {}).get("output") or "label"
        task = self.meta["task"]
        if task != "regression" and output not in OUTPUTS:
            raise BadInput(f"params.output: {output!r}; a classifier gives one of {', '.join(OUTPUTS)}")
        rows = input_rows(model_input, self.meta["feature_names"])
        shape = self.meta.get("input_shape") or [len(self.meta["feature_names"])]
        x = torch.from_numpy(rows.astype(np.float32)).reshape(-1, *shape)
        with torch.no_grad():
            out = self.program(x)
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


def input_rows(model_input, names: list[str]) -> np.ndarray:
    """The input as a float64 [N, features] array: named columns by name, anything else by position."""
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
    if values.ndim == 1:
        values = values.reshape(1, -1) if len(names) > 1 or values.size == 0 else values.reshape(-1, 1)
    if values.ndim != 2:
        values = values.reshape(values.shape[0], -1)
    if values.shape[1] != len(names):
        raise BadInput(f"input: rows of {values.shape[1]} values; the model takes {len(names)} ({', '.join(names)})")
    try:
        numbers = values.astype(np.float64)
    except (ValueError, TypeError):
        numbers = None
    if numbers is None or not np.isfinite(numbers).all():
        for row, col in np.ndindex(values.shape):
            number = _number(values[row, col])
            if number is None or not math.isfinite(number):
                kind = "not a number" if number is None else "not a finite number (NaN or infinity)"
                raise BadInput(f"input: row {row}, column {columns[col]}: {str(values[row, col])!r} is {kind}")
    return numbers


def _number(value) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


mlflow.models.set_model(Champion())
