"""The sweep's best model as an MLflow model, registered under the study's name with the alias `champion`.

Built from what the best trial logged (its checkpoint artifact, loaded with weights_only=True), not from memory,
so it works the same for a sweep that ran in many processes. Saved as a pickle-free pyfunc (`pyfunc_model.py`
around a `torch.export` program) and logged as a model of the best trial's own run (its lineage: the version's
source run is that trial, and the logged model lists its versions), so
`mlflow.pyfunc.load_model("models:/STUDY@champion")` predicts any batch size without sweeplab: values from a
regression, labels (or `params={"output": "probabilities"}`) from a classifier.

Every call goes through our `MlflowClient`, never MLflow's fluent API, whose tracking URI is process-global: a
store named anything but ./mlflow.db must not be looked up in ./mlflow.db.

Why one module of ~460 lines: registering and exporting are one step for the user (the model they load): the
export's outcome (a torch.export program, or the logged source rebuilt) decides what is registered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from sweeplab.stores import store_lock
from sweeplab.track import pyfunc_model
from sweeplab.track.tracker import CHECKPOINT_PATH, TAG_CHAMPION_RUN, Tracker, recorded_sources
from sweeplab.train.batch import by_name
from sweeplab.train.model import load_checkpoint, state_to_cpu

ALIAS = "champion"
# on a version chosen by its mean over seeds (`confirm:`): the mean and sample std of its objective, and how many runs
TAG_OBJECTIVE_MEAN = "sweeplab.objective_mean"
TAG_OBJECTIVE_STD = "sweeplab.objective_std"
TAG_SEEDS = "sweeplab.seeds"


@dataclass(frozen=True)
class Champion:
    """A registered champion: which trial's model `models:/NAME@ALIAS` is, and whether this call registered it."""

    name: str  # the registered model: the study's name
    alias: str  # `champion`, or `champion-noise-1_0` for another condition
    trial: int
    run_id: str
    column: str  # the objective's column (best_val_loss), and the trial's value of it
    value: float
    version: str
    new: bool  # registered now (False: it already was this alias's model)
    condition: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)  # its mean over seeds (TAG_OBJECTIVE_MEAN...), when confirmed
    test: dict = field(default_factory=dict)  # data.test_size: its scores on the test split (score_on_test)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def register_champion(
    tracker: Tracker,
    best,
    name: str,
    experiment_id: str,
    alias: str = ALIAS,
    condition: dict | None = None,
    column: str = "best_val_loss",
    tags: dict[str, str] | None = None,
) -> Champion:
    """Log and register the best completed trial's model (`best`, a ledger.TrialSummary, whose value is the
    objective's `column`) under `alias` (one per condition of a sweep that has them), unless it already is that
    alias's model; `tags` go on its version (set again when it already was: a resume's confirmation has more
    seeds)."""
    tags = dict(tags or {})
    run_id = best.run_id
    found = dict(
        name=name,
        alias=alias,
        trial=best.number,
        run_id=run_id,
        column=column,
        value=best.value,
        condition=dict(condition or {}),
        tags=tags,
    )
    # two sweeps of one study ending at once register it once (through a tracking server there is nothing to lock:
    # they may then register one run twice)
    with store_lock(tracker.tracking_uri, f"champion {name}"):
        current = _current_champion(tracker, name, alias)
        if current is not None and current.tags.get(TAG_CHAMPION_RUN) == run_id:
            for key, value in tags.items():
                tracker.client.set_model_version_tag(name, current.version, key, value)
            return Champion(**found, version=current.version, new=False)
        where = "".join(f", {key}={value}" for key, value in (condition or {}).items())
        version = register_run_model(
            tracker,
            run_id,
            name,
            experiment_id,
            alias,
            description=f"trial #{best.number} of study {name!r}{where}: {column} {best.value:.6g} (run {run_id})",
            tags={
                "sweeplab.trial_number": str(best.number),
                column: repr(best.value),
                **{f"sweeplab.condition.{k}": str(v) for k, v in (condition or {}).items()},
                **tags,
            },
        )
        tracker.client.set_registered_model_alias(name, alias, version.version)
    return Champion(**found, version=version.version, new=True)


def register_run_model(
    tracker: Tracker,
    run_id: str,
    name: str,
    experiment_id: str,
    model_name: str,
    description: str = "",
    tags: dict[str, str] | None = None,
):
    """Log the run's best checkpoint as an MLflow model of that run, and register it as a new version of `name`."""
    client = tracker.client
    export_failed = None
    with tempfile.TemporaryDirectory(prefix="sweeplab-champion-") as tmp:
        model, spec = load_checkpoint(tracker.download_checkpoint(run_id, Path(tmp)))
        config = json.loads(Path(client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/config.json", tmp)).read_text())
        example = _example_batch(tracker, run_id, Path(tmp), spec, config.get("predict_x") or [])
        _remove_unfinished(tracker, experiment_id, run_id)
        logged = client.create_logged_model(
            experiment_id, name=model_name, source_run_id=run_id, tags={TAG_CHAMPION_RUN: run_id}
        )
        try:
            local = Path(tmp) / "model"
            code = _logged_code(tracker, run_id, Path(tmp), spec)
            try:
                save_pyfunc_model(model, spec, example, local, logged, run_id, code=code)
            except ExportError as exc:  # not traceable, and no logged source to rebuild the class from
                export_failed = str(exc)
                print(
                    f"sweeplab: {export_failed}; registered the checkpoint (sweeplab predict serves it)",
                    file=sys.stderr,
                )
                save_checkpoint_model(tracker, run_id, local)
            client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])  # the run's page lists it
    if _registered_model(tracker, name) is None:
        try:
            client.create_registered_model(name, description=f"Best model of the sweeplab study {name!r}")
        except Exception:  # another process registered it first
            pass
    # The source is the model's own artifact location: a `models:/m-...` source would make the registry look the
    # model up through the default tracking URI (MLflow 3.17's SQL registry uses a fresh MlflowClient()).
    version = client.create_model_version(
        name,
        logged.artifact_location,
        run_id=run_id,
        model_id=logged.model_id,
        description=description,
        tags={
            TAG_CHAMPION_RUN: run_id,
            **(tags or {}),
            "sweeplab.model_spec": spec_tag(spec),
            **({"sweeplab.export": export_failed} if export_failed else {}),
        },
    )
    # what the fluent mlflow.register_model does too: the logged model's page then names its registered versions
    listed = json.loads(client.get_logged_model(logged.model_id).tags.get("mlflow.modelVersions") or "[]")
    listed.append({"name": name, "version": version.version})
    client.set_logged_model_tags(logged.model_id, {"mlflow.modelVersions": json.dumps(listed)})
    return version


def _remove_unfinished(tracker: Tracker, experiment_id: str, run_id: str) -> None:
    """Delete the run's logged models that an earlier export left PENDING (a full disk failed the export and then
    the write that would have marked it FAILED): the re-run's model is then the run's only one."""
    for model in tracker.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if str(model.status) == "PENDING":
            tracker.client.delete_logged_model(model.model_id)


MAX_TAG = 5000  # MLflow refuses a tag value over 100,000 characters; a spec that long is a wide CSV's names


def spec_tag(spec) -> str:
    """The model spec as the version's tag; the feature names give way to their count when they would not fit
    (a CSV of 20,000 columns), as they are in the model's own `artifacts/model.json` anyway."""
    fields = spec.to_dict()
    if spec.class_path is not None:  # the MLP's sizes say nothing of a user's model: its class and init args do
        fields = {k: fields[k] for k in ("class_path", "init_args", "input_shape", "out_features", "task")}
    text = json.dumps(fields)
    if len(text) <= MAX_TAG:
        return text
    return json.dumps({**fields, "feature_names": f"{len(spec.feature_names)} names, in model.json"})


class ExportError(RuntimeError):
    """torch.export could not trace the model: one line, and the champion is the checkpoint instead."""


def _example_batch(tracker: Tracker, run_id: str, tmp: Path, spec, predict_x: list):
    """A real batch of the data (the run's `checkpoint/example.pt`, validation inputs), else the config's predict
    points, else random inputs of the data's shape (runs logged before examples were)."""
    if spec.named_inputs:  # several inputs: the logged example batch, by the forward's argument names
        path = tracker.client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/example.pt", str(tmp))
        return by_name(torch.load(path, weights_only=True), spec.named_inputs)
    try:
        path = tracker.client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/example.pt", str(tmp))
        example = torch.load(path, weights_only=True)
        if (
            isinstance(example, torch.Tensor)
            and tuple(example.shape[1:]) == tuple(spec.sample_shape)
            and example.shape[0] >= 2
        ):
            return example.float()
    except Exception:  # no example logged
        pass
    rows = [list(map(float, row)) for row in predict_x if len(row) == spec.in_features]
    if len(rows) >= 2:  # an example of one row would fix the batch dimension to 1
        return torch.tensor(rows, dtype=torch.float32).reshape(-1, *spec.sample_shape)
    return torch.randn(3, *spec.sample_shape, generator=torch.Generator().manual_seed(0))


def save_checkpoint_model(tracker: Tracker, run_id: str, path: Path) -> None:
    """The run's checkpoint folder as the registered model's files (no MLflow flavor): what `sweeplab predict
    models:/NAME@ALIAS` loads, with the user's class, when the model could not be exported."""
    path.mkdir(parents=True)
    for name in ("best.pt", "model_spec.json", "config.json"):
        shutil.copy(
            tracker.client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/{name}", str(path.parent)), path / name
        )


def _logged_code(tracker: Tracker, run_id: str, tmp: Path, spec) -> tuple[Path, dict[str, str]] | None:
    """The user's code as the run logged it (its code/ folder, laid out as on sys.path) and the {module: sha256}
    its tags in the tracking store recorded, for a champion that rebuilds the class; None for the built-in MLP, a
    notebook's class, or a run that logged no source. A logged file whose hash is not the recorded one (the artifact
    store written to since) is not shipped: the champion is then its checkpoint."""
    if spec.class_path is None or spec.class_path.startswith("__main__."):
        return None
    recorded = recorded_sources(tracker.client.get_run(run_id).data.tags, spec.class_path)
    try:
        folder = Path(tracker.client.download_artifacts(run_id, "code", str(tmp / "logged")))
    except Exception:
        return None
    for module, sha256 in recorded.items():
        parts = module.split(".")
        candidates = [folder.joinpath(*parts).with_suffix(".py"), folder.joinpath(*parts, "__init__.py")]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None or hashlib.sha256(file.read_bytes()).hexdigest() != sha256:
            return None
    return (folder, recorded) if recorded else None


def save_pyfunc_model(
    model, spec, example, path: Path, logged, run_id: str, code: tuple[Path, dict[str, str]] | None = None
) -> None:
    """The champion as an MLflow "models from code" pyfunc (`pyfunc_model.py`, no pickle), so it loads without
    sweeplab and owns its input handling. The weights are a `torch.export` program where the model traces; where
    it does not (packed sequences, data-dependent control flow), they are the state_dict (read with
    weights_only=True) and the user's module travels with the model (MLflow's `code_paths`, the source the run
    logged, its sha256 checked on load), which rebuilds the class. One tensor of features: named columns by name,
    arrays and lists by position, NaN refused, no input schema (MLflow would enforce named columns by position).
    Several inputs: a signature of one named tensor per forward argument, `{"padded_x": ..., "lengths": ...}`."""
    named = bool(spec.named_inputs)
    if not named and not isinstance(example, torch.Tensor):  # rows of features
        example = torch.tensor([list(map(float, row)) for row in example], dtype=torch.float32)
    shape = list(spec.sample_shape)
    names = list(spec.feature_names) or [f"x{i + 1}" for i in range(spec.in_features)]
    classes = [] if spec.task == "regression" else list(range(2 if spec.task == "binary" else spec.out_features))
    classes = list(spec.classes) or classes  # data.classes: the champion answers the names
    with tempfile.TemporaryDirectory(prefix="sweeplab-export-") as tmp:
        artifacts = {"model": f"{tmp}/model.json"}
        meta = {
            "task": spec.task,
            "classes": classes,
            "model": spec.name,
            "outputs": "values" if spec.task == "regression" else "labels, or probabilities per class",
        }
        code_paths = None
        try:
            _export(model, spec, example, f"{tmp}/program.pt2")
            artifacts["program"] = f"{tmp}/program.pt2"
        except ExportError as exc:
            if code is None:
                raise
            torch.save(state_to_cpu(model.state_dict()), f"{tmp}/weights.pt")
            artifacts["weights"] = f"{tmp}/weights.pt"
            folder, recorded = code
            code_paths = sorted(str(entry) for entry in folder.iterdir())
            meta.update(
                class_path=spec.class_path,
                init_args=spec.init_args,
                sources=recorded,  # from the run's tags: each file is checked against it before any import
                rebuilt_because=str(exc),
            )
            print(f"sweeplab: {exc}; the champion rebuilds {spec.class_path} from its logged source", file=sys.stderr)
        if named:
            # No input schema: MLflow enforces a TensorSpec's dtype exactly (a float64 spec refuses the float32
            # arrays users have) and echoes the whole input in its errors; the inputs are described in the
            # model's metadata (`inputs`: name, dtype, shape) and checked by the champion itself, in one line.
            meta["inputs"] = spec.inputs
            inputs = None
            input_example = {k: v.double().numpy() if v.is_floating_point() else v.numpy() for k, v in example.items()}
        else:
            meta.update(feature_names=names, input_shape=shape)
            inputs = None
            images = len(shape) > 1
            input_example = (
                example.double().numpy()
                if images
                else pd.DataFrame(example.reshape(example.shape[0], -1).double().numpy(), columns=names)
            )
        Path(f"{tmp}/model.json").write_text(json.dumps(meta, indent=2))
        if not named and images:  # a picture's pixels are not features anyone names in a request
            meta = {k: v for k, v in meta.items() if k != "feature_names"}
        if spec.task == "regression":
            columns = (
                ["prediction"] if spec.out_features == 1 else [f"prediction_{i}" for i in range(spec.out_features)]
            )
            outputs = Schema([ColSpec("double", name) for name in columns])
            params = ParamSchema([ParamSpec("output", "string", "values")])
        else:
            outputs = Schema([ColSpec("string" if spec.classes else "long", "label")])
            params = ParamSchema([ParamSpec("output", "string", "label")])
        signature = ModelSignature(inputs=inputs, outputs=outputs, params=params)
        requirements = [
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}",
        ]
        quiet = logging.getLogger("mlflow.pyfunc")  # "Validating input example against model signature"
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            mlflow.pyfunc.save_model(
                str(path),
                python_model=pyfunc_model.__file__,
                artifacts=artifacts,
                code_paths=code_paths,
                signature=signature,
                input_example=input_example,
                pip_requirements=requirements,
                metadata=meta,
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    run_id=run_id,
                    model_uuid=logged.model_id,
                    model_id=logged.model_id,
                ),
            )
        finally:
            quiet.setLevel(level)


def _export(model, spec, example, path: str) -> None:
    """The model as a `torch.export` program, the batch dimension (and, for several inputs, every size marked -1:
    a padded length) dynamic; ExportError when it cannot be traced."""
    model = model.cpu().eval()
    try:
        with warnings.catch_warnings(), _torch_logs_quiet():  # torch.export's notes and FX graphs: said by its
            warnings.simplefilter("ignore")  # failure, in one line, if any
            _trace(model, spec, example, path)
    except Exception as exc:  # data-dependent control flow, an untraceable op, a batch size fixed inside
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"torch.export cannot trace {spec.name}: {type(exc).__name__}: {first}") from None


@contextlib.contextmanager
def _torch_logs_quiet():
    """torch's own loggers (torch.fx's symbolic shapes log whole FX graphs at WARNING when a trace fails) held to
    ERROR while the champion is exported, then as they were."""
    loggers = [logging.getLogger("torch")] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("torch.")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # and what it writes to stderr itself (a failed trace's graph)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _trace(model, spec, example, path: str) -> None:
    """torch.export of the model, the batch dimension dynamic (and every size of several inputs marked -1)."""
    if spec.named_inputs:
        batch_dim = torch.export.Dim("batch", min=1)
        dynamic = {}
        for item in spec.inputs["inputs"]:
            dims = {0: batch_dim}
            for i, size in enumerate(item["shape"][1:], start=1):
                if size == -1:
                    dims[i] = torch.export.Dim(f"{item['name']}_{i}", min=1)
            dynamic[item["name"]] = dims
        if spec.inputs["kind"] == "tensor":  # one tensor a collate_fn shapes: passed as the forward takes it
            ((name, value),) = example.items()
            program = torch.export.export(model, (value,), dynamic_shapes=(dynamic[name],))
        else:
            program = torch.export.export(model, (), dict(example), dynamic_shapes=dynamic)
    else:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, path)


def _registered_model(tracker: Tracker, name: str):
    try:
        return tracker.client.get_registered_model(name)
    except Exception:
        return None


def _current_champion(tracker: Tracker, name: str, alias: str = ALIAS):
    try:
        return tracker.client.get_model_version_by_alias(name, alias)
    except Exception:  # no such model or alias yet
        return None


def score_on_test(tracker: Tracker, champion: Champion, config) -> Champion:
    """`data.test_size` (or a loader's test split): the champion's weights scored on the test split once, after the
    sweep (train.experiment.test_scores), logged on its run (`test_loss`, `test_<metric>`) and tagged on its
    registered version; a champion already scored (a resume) keeps its scores. `config` is its run's. Returns the
    champion with its scores (`test`)."""
    from sweeplab.train.data import seeded_dataset
    from sweeplab.train.experiment import test_scores

    dataset = seeded_dataset(config)
    if not dataset.has_test:
        return champion
    client = tracker.client
    logged = client.get_run(champion.run_id).data.metrics
    scores = {name: value for name, value in logged.items() if name.startswith("test_")}
    if "test_loss" not in scores:
        with tempfile.TemporaryDirectory(prefix="sweeplab-test-") as tmp:
            model, _ = load_checkpoint(
                tracker.download_checkpoint(champion.run_id, Path(tmp)), code_dir=config.code_dir
            )
        scores = test_scores(config, dataset, model)
        client.log_batch(champion.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in scores.items()])
    for name, value in scores.items():
        client.set_model_version_tag(champion.name, champion.version, name, repr(value))
    return dataclasses.replace(champion, test=scores)
