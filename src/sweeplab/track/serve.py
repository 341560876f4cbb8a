"""`sweeplab predict` and `sweeplab.load_model`: a logged model loaded by run id, study or sweep file (its best
trial) or models:/ URI (its checkpoint, torch.load(weights_only=True)); input rows read from CSV (by column name)
or JSON; and outputs turned into what people read: values, labels with their probability, class probabilities.
MLflow is imported only where a logged model is looked up: `sweeplab run --no-track` uses the output helpers.

Why one module of ~450 lines: every way a logged model is answered (rows, JSON, CSV, named inputs) goes through
one loader and one input check, shared by predict, `sweeplab.load_model` and the served model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sweeplab.config import read_yaml
from sweeplab.stores import redact, resolve_tracking_uri
from sweeplab.train.batch import by_name
from sweeplab.train.loop import predict
from sweeplab.train.model import ModelSpec, load_checkpoint, read_checkpoint


def describe_outputs(outputs: torch.Tensor, spec: ModelSpec) -> list[dict[str, Any]]:
    """One dict per row: `prediction` (the value, or the label), for classification `probability` (the label's)
    and `probabilities` (one per class, as the champion's `output: probabilities` gives them), and `text` as `sweeplab run` prints it (regression: the seed's `pred=12.05`)."""
    if spec.task == "regression":
        return [{"prediction": float(v), "text": f"pred={float(v):.2f}"} for v in outputs[:, 0].tolist()]
    if spec.task == "binary":
        p1 = torch.sigmoid(outputs[:, [0]].double())
        probs = torch.cat([1 - p1, p1], dim=1)
    else:
        probs = torch.softmax(outputs.double(), dim=1)
    rows = []
    for row in probs.tolist():  # `probability` and the printed p are the printed label's
        label = max(range(len(row)), key=row.__getitem__)
        name = spec.classes[label] if spec.classes else label  # data.classes: the label's name
        rows.append(
            {
                "prediction": name,
                "probability": row[label],
                "probabilities": row,
                "text": f"label={name} p={row[label]:.2f}",
            }
        )
    return rows


# --- loading a logged model -------------------------------------------------------------------------------------


class ModelNotFound(LookupError):
    """An unknown run, study or registered model, or a run without a best state: one line for the user."""


def resolve_run_id(reference: str, tracking_uri: str) -> tuple[str, str]:
    """(run id, how it was found) for a run id, a study/sweep name (its best completed trial), a sweep file, or a
    `models:/NAME@ALIAS` / `models:/NAME/VERSION` URI of a model that sweeplab registered."""
    from sweeplab.track.tracker import Tracker  # MLflow on use: `sweeplab run --no-track` uses describe_outputs

    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    if reference.startswith("models:/"):
        try:
            return tracker.registered_run_id(reference), reference
        except LookupError as exc:
            raise ModelNotFound(str(exc)) from None
    if reference.endswith((".yaml", ".yml")):
        study = read_yaml(reference).get("study")
        if not study:
            raise ModelNotFound(f"{reference}: no study name in this sweep file")
        reference = str(study)
    experiment_id = tracker.find_experiment(reference)
    if experiment_id is not None:
        run = tracker.best_trial_run(experiment_id)
        if run is None:
            raise ModelNotFound(f"{reference}: the study has no completed trial yet")
        trial = run.data.tags.get("sweeplab.trial_number")
        return run.info.run_id, f"best of {reference}" + (f" (trial #{trial})" if trial else "")
    try:
        run = tracker.client.get_run(reference)
    except Exception:
        raise ModelNotFound(f"{reference}: no such run id, study or sweep in {_display(tracking_uri)}") from None
    return run.info.run_id, f"run {reference}"


def _display(uri: str) -> str:
    return redact(uri)


def load_logged_model(reference: str, tracking_uri: str | None = None, device: str = "cpu"):
    """(model on `device`, its ModelSpec, description). The checkpoint is read with torch.load(weights_only=True)
    and mapped to `device`, so a GPU-trained model loads on a CPU machine. Nothing the checkpoint names is imported
    on its say-so: a user's model registered as a champion (`models:/...`) is loaded as the champion's own
    `torch.export` program, no module needed; from a run, its module is imported only when its source here is
    the one the run logged (`sweeplab.model_source_sha256`), read and hashed before the import."""
    from sweeplab.track.tracker import CHECKPOINT_PATH, Tracker  # (MLflow on use, as above)

    tracking_uri = resolve_tracking_uri(tracking_uri)
    run_id, found = resolve_run_id(reference, tracking_uri)
    tracker = Tracker(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sweeplab-") as tmp:
        try:
            path = tracker.download_checkpoint(run_id, Path(tmp))
        except Exception:
            params = tracker.client.get_run(run_id).data.params
            if params.get("data.folds") not in (None, "None"):  # a fold trial (train/crossval.py) keeps no weights
                study = tracker.client.get_run(run_id).data.tags.get("sweeplab.study")
                where = f"models:/{study}@champion" if study else "its refit run (sweeplab.refit_of)"
                raise ModelNotFound(
                    f"{reference}: run {run_id} was scored by {params['data.folds']}-fold cross-validation and keeps "
                    f"no weights of its own; predict with the refit of the sweep's winner, {where}"
                ) from None
            raise ModelNotFound(f"{reference}: run {run_id} has no best state ({CHECKPOINT_PATH}/best.pt)") from None
        _, spec = read_checkpoint(path)
        if spec.class_path is not None and reference.startswith("models:/"):
            model = ExportedModel.from_champion(tracker, reference, Path(tmp), device)
            if model is not None:
                return model, spec, _described(found, run_id)
        code_dir = os.getcwd()
        if spec.class_path is not None and reference.startswith("models:/"):
            # a registered champion torch.export could not trace is rebuilt from the source its run logged, as
            # mlflow.pyfunc rebuilds it: naming the registered model is naming that code
            code_dir = _logged_code_dir(tracker, run_id, spec, Path(tmp))
        elif spec.class_path is not None:
            check_source(tracker, run_id, spec)
        model, spec = load_checkpoint(path, map_location=device, code_dir=code_dir)
    return model, spec, _described(found, run_id)


def _described(found: str, run_id: str) -> str:
    """`best of STUDY (trial #3), run ID`; a run named by its id only once."""
    return found if found == f"run {run_id}" else f"{found}, run {run_id}"


def _logged_code_dir(tracker, run_id: str, spec: ModelSpec, tmp: Path) -> str:
    """The run's code/ artifacts, checked file by file against the hashes its tags hold before anything of it
    is imported (an artifact store written to after the run cannot choose what runs here)."""
    folder = tmp / "logged"
    folder.mkdir(exist_ok=True)
    try:
        tracker.client.download_artifacts(run_id, "code", str(folder))  # lands as folder/code/...
    except Exception:
        raise ModelNotFound(
            f"run {run_id} logged no source of {spec.class_path} to rebuild its champion from"
        ) from None
    check_source(tracker, run_id, spec, str(folder / "code"), logged_copy=True)
    return str(folder / "code")


class ExportedModel(torch.nn.Module):
    """A registered champion's `torch.export` program (artifacts/program.pt2), as `predict_rows` uses a model:
    the user's module is not needed, nor imported. An exported program cannot be put in eval mode: it was exported
    in eval mode."""

    def __init__(self, program: torch.nn.Module):
        super().__init__()
        self.program = program

    @classmethod
    def from_champion(cls, tracker, uri: str, tmp: Path, device: str) -> "ExportedModel | None":
        """The champion's program, or None when it has none (torch.export could not trace the model: the
        version is then its checkpoint, tagged `sweeplab.export`)."""
        import mlflow.artifacts

        version = tracker.model_version(uri)
        if "sweeplab.export" in version.tags:
            return None
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{version.source.rstrip('/')}/artifacts/program.pt2",
                tracking_uri=tracker.tracking_uri,
                dst_path=str(tmp),
            )
        except Exception:  # a champion rebuilt from its logged source has no program: its run's checkpoint serves
            return None
        try:
            program = torch.export.load(path).module()
        except Exception as exc:
            raise ModelNotFound(f"{uri}: its exported program cannot be loaded ({type(exc).__name__})") from None
        return cls(program.to(device))

    def train(self, mode: bool = True) -> "ExportedModel":
        return self  # exported in eval mode; torch refuses train()/eval() on an exported program

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.program(*args, **kwargs)


def logged_example(reference: str, tracking_uri: str | None):
    """(the example inputs logged with the run, checkpoint/example.pt, or None; the run's id)."""
    from sweeplab.track.tracker import Tracker

    tracking_uri = resolve_tracking_uri(tracking_uri)
    run_id, _ = resolve_run_id(reference, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sweeplab-") as tmp:
        try:
            path = Tracker(tracking_uri).download_checkpoint(run_id, Path(tmp), "example.pt")
            return torch.load(path, weights_only=True), run_id
        except Exception:  # no example logged
            return None, run_id


def example_rows(reference: str, tracking_uri: str | None, spec: ModelSpec) -> tuple[list[list[float]], str]:
    """(rows, where from): the validation inputs logged with the run (checkpoint/example.pt), for a predict line
    given no input; a ModelNotFound when the run logged none."""
    from sweeplab.track.tracker import CHECKPOINT_PATH

    example, run_id = logged_example(reference, tracking_uri)
    if not isinstance(example, torch.Tensor) or tuple(example.shape[1:]) != tuple(spec.sample_shape):
        raise ModelNotFound(
            f"{reference}: give the input: --x V1,V2,... ({spec.in_features} values a row), a CSV file of its "
            "feature columns, or - for JSON rows on stdin"
        )
    rows = example.reshape(example.shape[0], -1).double().tolist()
    return rows, f"the {len(rows)} validation inputs logged with run {run_id} ({CHECKPOINT_PATH}/example.pt)"


def check_source(tracker, run_id: str, spec: ModelSpec, folder: str | None = None, logged_copy: bool = False) -> None:
    """Refuse, in one line, to import a run's module unless every file `import` would run for it (found in
    `folder`, this folder by default, then on sys.path, without importing anything: a package's __init__.py on
    the way, the user's modules it imports) hashes to what the run's tags in the tracking store recorded. Neither
    the checkpoint nor the artifact store chooses what code runs here. `logged_copy`: `folder` holds the run's
    own code/ artifacts (a champion rebuilt from its logged source)."""
    from sweeplab.track.tracker import TAG_STUDY, recorded_sources
    from sweeplab.train.sources import Finder, SourceMismatch, check_modules

    module_name = spec.class_path.rpartition(".")[0]
    tags = tracker.client.get_run(run_id).data.tags
    study = tags.get(TAG_STUDY)
    champion = f" or predict through its registered champion, models:/{study}@champion" if study else ""
    if module_name.split(".")[0] == "__main__":  # a class defined in a notebook has no module to import
        where = f"models:/{study}@champion" if study else "its champion (a sweep registers one)"
        raise ValueError(
            f"the run trained {spec.class_path}, a class defined in a notebook (its source is in the run's code/ "
            f"artifacts); predict through {where}, which loads without it"
        )
    search = [folder or os.getcwd()]
    if None in Finder(search).chain(module_name):
        if logged_copy:
            raise ModelNotFound(f"run {run_id} logged no source of {spec.class_path} to rebuild its champion from")
        raise ValueError(
            f"the run trained {spec.class_path}; no module {module_name!r} in this folder or on sys.path "
            f"(run from the folder that holds it{champion})"
        )
    recorded = recorded_sources(tags, spec.class_path)
    if not recorded:
        raise ValueError(f"run {run_id} logged no source hash of {spec.class_path}: its module is not imported")
    try:
        check_modules(module_name, recorded, search)
    except SourceMismatch as exc:
        copy = "" if logged_copy else f" (the run's own copy is in its code/ artifacts{champion})"
        raise ValueError(f"{exc}: not imported{copy}") from None


def parse_rows(values: list[str]) -> list[list[float]]:
    """`--x 1.0,2.0 --x -1,0.5` -> [[1.0, 2.0], [-1.0, 0.5]]; a non-number is named."""
    rows = []
    for value in values:
        row = []
        for item in value.split(","):
            try:
                number = float(item)
            except ValueError:
                raise ValueError(f"--x {value}: {item.strip()!r} is not a number") from None
            if not math.isfinite(number):
                raise ValueError(f"--x {value}: {item.strip()!r} is not a finite number")
            row.append(number)
        rows.append(row)
    return rows


def read_json_rows(text: str, spec: ModelSpec) -> list[list[float]]:
    """JSON on stdin: [[1, 2], ...], {"x": [[...]]}, or [{"x1": 1, "x2": 2}, ...] keyed by feature name."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"stdin: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ValueError("stdin: JSON nested too deeply to be rows of numbers") from None
    if isinstance(data, dict):
        data = data.get("x", data.get("inputs"))
    if not isinstance(data, list):
        raise ValueError('stdin: expected a list of rows, or {"x": [rows]}')
    rows = []
    for i, row in enumerate(data):
        if isinstance(row, dict):
            missing = [name for name in spec.feature_names if name not in row]
            if missing:
                raise ValueError(f"stdin: row {i} lacks feature(s) {', '.join(missing)}")
            row = [row[name] for name in spec.feature_names]
        if isinstance(row, list) and any(isinstance(v, list) for v in row):  # an image: its values in order
            row = _flat(row)
        if not isinstance(row, list):
            raise ValueError(f"stdin: row {i} is not a list of numbers")
        if any(isinstance(v, (bool, str)) or v is None for v in row):  # float() takes True and "2"
            raise ValueError(f"stdin: row {i} holds a value that is not a number: {str(row)[:100]}")
        try:
            values = [float(v) for v in row]
        except (TypeError, ValueError):
            raise ValueError(f"stdin: row {i} holds a value that is not a number: {str(row)[:100]}") from None
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"stdin: row {i} holds a value that is not a finite number (NaN or infinity)")
        rows.append(values)
    return rows


def _flat(values) -> list:
    out = []
    for value in values:
        out.extend(_flat(value) if isinstance(value, list) else [value])
    return out


def read_csv_rows(path: str, spec: ModelSpec) -> tuple[list[list[float]], list[str]]:
    """Rows of the model's feature columns, by name; (rows, extra column names, which are ignored)."""
    import pandas as pd  # CSV input only

    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as exc:  # its message may quote the file's content: name only the kind of failure
        raise ValueError(f"{path}: not a readable CSV file ({type(exc).__name__})") from None
    names = list(spec.feature_names)
    missing = [name for name in names if name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing feature column(s) {', '.join(missing)} (the model takes {', '.join(names)})")
    extra = [str(c) for c in frame.columns if c not in names]
    numeric = frame[names].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() | numeric.isin([math.inf, -math.inf])  # empty, not a number, or infinite
    if bad.any().any():
        column = bad.any()[bad.any()].index[0]
        row = int(bad[column].to_numpy().nonzero()[0][0])
        raise ValueError(f"{path}: column {column!r} row {row + 2} is not a finite number")
    return numeric.to_numpy(dtype="float64").tolist(), extra


def finite_outputs(outputs: torch.Tensor) -> torch.Tensor:
    """Outputs that JSON can carry: an input whose output is NaN or infinite is refused in one line, as the
    champion refuses it over HTTP (`pred=inf` and `Infinity` are no answer)."""
    bad = ~torch.isfinite(outputs).reshape(outputs.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"input row {int(bad.nonzero()[0])} gives a non-finite output (values far outside the training data?)"
        )
    return outputs


def predict_rows(model, spec: ModelSpec, rows: list[list[float]]) -> list[dict[str, Any]]:
    if not rows:
        raise ValueError("input: no rows to predict")
    wrong = [i for i, row in enumerate(rows) if len(row) != spec.in_features]
    if wrong:
        shape = "x".join(map(str, spec.sample_shape))
        names = (
            ", ".join(spec.feature_names)
            if len(spec.feature_names) <= 8
            else f"{spec.feature_names[0]} ... {spec.feature_names[-1]}"
        )
        raise ValueError(
            f"input row {wrong[0]} has {len(rows[wrong[0]])} values; the model takes "
            f"{spec.in_features} ({names}" + (f"; a {shape} input, in order)" if len(spec.sample_shape) > 1 else ")")
        )
    x = torch.tensor(rows, dtype=torch.float32)
    beyond = ~torch.isfinite(x).all(dim=1)  # finite as given, beyond float32 (1e308): the model would see inf
    if bool(beyond.any()):
        raise ValueError(f"input row {int(beyond.nonzero()[0])} holds a value beyond float32 (|v| > 3.4e38)")
    outputs = finite_outputs(predict(model, x.reshape(len(rows), *spec.sample_shape)))
    described = describe_outputs(outputs, spec)
    for row, item in zip(rows, described):
        item["x"] = row
    return described


def read_named_inputs(text: str, spec: ModelSpec, where: str) -> dict[str, torch.Tensor]:
    """JSON of a model of several inputs: {"padded_x": [...], "lengths": [...]} (or under "inputs", as
    `mlflow models serve` takes it), each input as nested lists, in the dtype the model trained on."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and set(data) == {"inputs"}:
        data = data["inputs"]
    from sweeplab.track.pyfunc_model import BadInput, named_inputs  # the champion's own reading of named inputs

    try:
        return named_inputs(data, spec.inputs)
    except BadInput as exc:
        raise ValueError(f"{where}: {exc.message.removeprefix('input: ')}") from None


def example_inputs(reference: str, tracking_uri: str | None, spec: ModelSpec) -> tuple[dict, str]:
    """A model of several inputs' example batch logged with its run, by name; a ModelNotFound when there is none."""
    from sweeplab.track.tracker import CHECKPOINT_PATH

    example, run_id = logged_example(reference, tracking_uri)
    if example is None:
        raise ModelNotFound(f"{reference}: give the input as JSON by name ({', '.join(spec.named_inputs)})")
    inputs = by_name(example, spec.named_inputs)
    n = int(next(iter(inputs.values())).shape[0])
    return inputs, f"the {n} validation inputs logged with run {run_id} ({CHECKPOINT_PATH}/example.pt)"


def predict_named(model, spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Predictions for a model of several inputs, called as training called it (by name; one tensor as itself)."""
    inputs = next(iter(tensors.values())) if spec.inputs["kind"] == "tensor" else tensors
    with torch.no_grad():
        if hasattr(model, "eval") and not isinstance(model, ExportedModel):
            model.eval()
        outputs = (model(inputs) if spec.inputs["kind"] == "tensor" else model(**inputs)).detach().cpu()
    described = describe_outputs(finite_outputs(outputs), spec)
    for i, item in enumerate(described):
        item["x"] = {name: value[i].tolist() for name, value in tensors.items()}
    return described


def fetch_weights(uri: str, tracking_uri: str) -> tuple[dict, str]:
    """`model.init_from`'s `runs:/RUN_ID`, `models:/NAME@ALIAS` or `models:/NAME/VERSION`: that run's best state
    (read with weights_only), and what the URI resolved to (a run's `sweeplab.init_from` tag). One line (ConfigError)
    for a run or model that is not there."""
    from sweeplab.config import ConfigError
    from sweeplab.track.tracker import Tracker
    from sweeplab.train.model import read_checkpoint

    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").strip("/").split("/")[0]
        label = f"run {run_id}"
    else:
        try:
            run_id, _ = resolve_run_id(uri, tracking_uri)
        except ModelNotFound as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
        label = f"{uri} (run {run_id})"
    tracker = Tracker(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as process.configure has it
    with tempfile.TemporaryDirectory(prefix="sweeplab-init-") as tmp:
        try:
            path = tracker.download_checkpoint(run_id, Path(tmp))
        except Exception:
            raise ConfigError(
                f"model.init_from: {uri}: no best state of run {run_id} in {_display(tracking_uri)}"
            ) from None
        try:
            payload, _ = read_checkpoint(path)
        except ValueError as exc:
            raise ConfigError(f"model.init_from: {uri}: {exc}") from None
    return payload, label
