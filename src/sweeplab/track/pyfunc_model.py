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

import hashlib
import importlib
import json
import sys
import sysconfig
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

OUTPUTS = ("label", "probabilities")  # a classifier's `output` param; regression gives values


class BadInput(MlflowException):
    """Input the model cannot take: one line, and HTTP 400 from `mlflow models serve`. Its message is set once:
    MLflow's scoring server rewrites it as "Failed to predict data '<the whole input>'. Error: ...", which echoes
    a request of any size back into the response and the server's log."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


class Champion(mlflow.pyfunc.PythonModel):
    """The exported program, with the input handling and the outputs described above."""

    # MLflow's type-hint validation (and its warning that `predict` has no type hints) is what this class
    # replaces: its schema would read named columns by position
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.meta = json.loads(Path(context.artifacts["model"]).read_text())
        if "program" in context.artifacts:
            self.program = torch.export.load(context.artifacts["program"]).module()
        else:  # a model torch.export cannot trace: rebuilt from the user's module that travels with it
            self.program = rebuild(self.meta, context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        task = self.meta["task"]
        outputs = ("values",) if task == "regression" else OUTPUTS
        output = (params or {}).get("output") or outputs[0]
        if output not in outputs:
            kind = "a regression model" if task == "regression" else "a classifier"
            raise BadInput(f"params.output: {output!r}; {kind} gives {' or '.join(outputs)}")
        if self.meta.get("inputs"):
            with torch.no_grad():
                out = call(self.program, self.meta["inputs"], named_inputs(model_input, self.meta["inputs"]))
        else:
            names = self.meta["feature_names"]
            shape = self.meta.get("input_shape") or [len(names)]
            rows = input_rows(model_input, names, shape)
            try:
                x = torch.from_numpy(rows.astype(np.float32)).reshape(-1, *shape)
            except MemoryError:
                raise MemoryError(
                    f"input: {rows.shape[0]} rows of {rows.shape[1]} values ({rows.size * 4 / 2**30:.1f} GiB as "
                    "float32) do not fit in this machine's memory; predict in parts"
                ) from None
            with torch.no_grad():
                out = self.program(x)
        bad = ~torch.isfinite(out).reshape(out.shape[0], -1).all(dim=1)
        if bool(bad.any()):  # JSON has no NaN or infinity: refused, not answered with invalid JSON
            raise BadInput(
                f"input: row {int(bad.nonzero()[0])} gives a non-finite output (values far outside the training data?)"
            )
        return describe(out, task, self.meta.get("classes"), output)


def rebuild(meta: dict, weights: str):
    """The user's class from its module (on sys.path through MLflow's code_paths), built with its init args, its
    weights loaded with weights_only=True (nothing unpickled). Before anything is imported, every file the import
    would run (each package's __init__.py on the way, the user's modules it imports) is found as `import` finds it
    and must hash to what the run recorded (`sources`): another module of that name first on sys.path, or a
    package folder beside the file, is refused without running."""
    module_name, _, name = meta["class_path"].rpartition(".")
    sources = meta.get("sources") or {}
    parts = module_name.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    importlib.invalidate_caches()
    for each in dict.fromkeys([*chain, *sources]):
        file = _file_of(each)
        if each not in sources and file is not None and _in_library(file):
            continue  # a library's module on the way (not the user's code)
        found = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file and Path(file).is_file() else None
        if found is None or found != sources.get(each):
            raise MlflowException(
                f"{meta['class_path']}: {file or each} is not the source this model was logged with (another "
                "module of that name is first on sys.path?); not imported"
            )
    module = importlib.import_module(module_name)
    model = getattr(module, name)(**meta.get("init_args", {}))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _file_of(name: str) -> str | None:
    """The file `import name` would run, found as importlib finds it (sys.meta_path over each package's
    __path__), without importing anything; None when there is none."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    parent, path = name.rpartition(".")[0], None
    if parent:
        path = _locations(parent)
        if path is None:
            return None
    for finder in sys.meta_path:
        spec = finder.find_spec(name, path, None) if hasattr(finder, "find_spec") else None
        if spec is not None:
            return spec.origin if spec.has_location else None
    return None


def _locations(name: str) -> list[str] | None:
    """Where a package's submodules are looked for (its __path__), found without importing it."""
    module = sys.modules.get(name)
    if module is not None:
        path = getattr(module, "__path__", None)
        return list(path) if path is not None else None
    parent = name.rpartition(".")[0]
    path = _locations(parent) if parent else None
    if parent and path is None:
        return None
    for finder in sys.meta_path:
        spec = finder.find_spec(name, path, None) if hasattr(finder, "find_spec") else None
        if spec is not None:
            locations = spec.submodule_search_locations
            return list(locations) if locations is not None else None
    return None


def _in_library(file: str) -> bool:
    paths = sysconfig.get_paths()
    folders = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    resolved = Path(file).resolve()
    return any(resolved.is_relative_to(Path(folder).resolve()) for folder in folders)


def named_inputs(model_input, spec: dict) -> dict:
    """{name: tensor} for a model of several inputs: a dict of arrays or lists (what MLflow passes for a tensor
    signature, and what `{"inputs": {...}}` is when served), or a DataFrame whose columns are the names. Each is
    the dtype the model trained on (floats as float32); a missing or unknown name, a wrong number of dimensions,
    a size that should not vary, batches of different sizes, and NaN are refused in one line."""
    if isinstance(model_input, pd.DataFrame):
        model_input = {str(c): np.stack([np.asarray(v) for v in model_input[c]]) for c in model_input.columns}
    if not isinstance(model_input, dict):
        wanted = ", ".join(item["name"] for item in spec["inputs"])
        raise BadInput(f"input: give one array per input by name ({wanted}), not a {type(model_input).__name__}")
    names = [item["name"] for item in spec["inputs"]]
    missing, unknown = [n for n in names if n not in model_input], [k for k in model_input if k not in names]
    if missing or unknown:
        said = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(map(str, unknown))}"] if unknown else []
        )
        raise BadInput(f"input: {'; '.join(said)} (the model takes {', '.join(names)})")
    tensors, sizes = {}, set()
    for item in spec["inputs"]:
        name, shape = item["name"], item["shape"]
        floating = "float" in item["dtype"]
        try:
            values = np.asarray(model_input[name])
        except (ValueError, TypeError):
            raise BadInput(f"input: {name} is not an array of numbers of one shape") from None
        if values.dtype.kind not in "iuf":  # booleans, text (numpy would read "2" as 2.0), mixed objects
            said = {"b": "booleans", "U": "text", "S": "text"}.get(values.dtype.kind, f"{values.dtype} values")
            raise BadInput(f"input: {name} holds {said}; the model takes numbers ({item['dtype']})")
        if floating:
            values = values.astype(np.float64, copy=False)
        if values.ndim != len(shape) or any(s != -1 and s != v for s, v in zip(shape[1:], values.shape[1:])):
            wanted = (
                "[" + ", ".join("N" if i == 0 else ("any" if s == -1 else str(s)) for i, s in enumerate(shape)) + "]"
            )
            raise BadInput(f"input: {name} has shape {list(values.shape)}; the model takes {wanted}")
        if floating and _first_bad(values.reshape(len(values), -1)) is not None:
            raise BadInput(f"input: {name} holds NaN, infinity or numbers beyond float32")
        if not floating and values.dtype.kind not in "iu":
            raise BadInput(f"input: {name} takes whole numbers ({item['dtype']}), not {values.dtype}")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(values)).to(getattr(torch, item["dtype"]))
        sizes.add(values.shape[0])
    if len(sizes) != 1:
        raise BadInput(f"input: the inputs give {sorted(sizes)} rows; each needs one row per sample")
    if 0 in sizes:
        raise BadInput("input: no rows")
    return tensors


def call(model, spec: dict, tensors: dict):
    """The forward as training called it: model(x), model(*inputs) in the forward's order, or model(**inputs)."""
    if spec["kind"] == "tensor":
        return model(*tensors.values())
    return model(**tensors)


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
            if values.dtype.kind in "US" and isinstance(model_input, list):  # [[1.0, "2"]]: numpy made both text
                values = np.asarray(model_input, dtype=object)
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
    numbers = None
    if values.dtype.kind in "iuf":  # booleans and text are not numbers, though numpy would make them 1.0 and 2.0
        try:
            numbers = values.astype(np.float64, copy=False)  # no copy of what is float64 already
        except MemoryError:
            raise MemoryError(
                f"input: {values.shape[0]} rows of {values.shape[1]} values ({values.shape[0] * values.shape[1] * 8 / 2**30:.1f} "
                "GiB as float64) do not fit in this machine's memory; predict in parts"
            ) from None
    bad = _first_bad(numbers) if numbers is not None else None
    if numbers is None or bad is not None:
        start = bad[0] if bad is not None else 0
        for row, col in np.ndindex(values[start:].shape):
            number = _number(values[start + row, col])
            if number is None or not abs(number) <= FLOAT32_MAX:
                kind = "not a number" if number is None else "not a finite number (NaN, infinity, or beyond float32)"
                column = columns[col] if col < len(columns) else str(col)
                raise BadInput(
                    f"input: row {start + row}, column {column}: {str(values[start + row, col])!r} is {kind}"
                )
    return numbers if numbers is not None else values.astype(np.float64)  # objects that are each a number


CHUNK_VALUES = 1 << 22  # values checked at a time: a few MB of temporaries, however large the input


def _first_bad(numbers: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the first value that is NaN, infinite or beyond float32 in a [N, W] float array, checked a
    chunk of rows at a time (a whole-array check doubles the peak memory of a 5 GiB input); None when all are."""
    rows = max(1, CHUNK_VALUES // max(1, numbers.shape[1]))
    for start in range(0, numbers.shape[0], rows):
        chunk = numbers[start : start + rows]
        fine = np.abs(chunk) <= FLOAT32_MAX  # NaN fails the comparison too
        if not fine.all():
            row, col = np.argwhere(~fine)[0]
            return start + int(row), int(col)
    return None


def _number(value) -> float | None:
    if isinstance(value, (bool, np.bool_, str, bytes, np.str_)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


mlflow.models.set_model(Champion())
