"""`sweeplab rerun RUN_ID` and `sweeplab.run(like=RUN_ID)`: a logged run's configuration trained again.

The run's resolved configuration (its checkpoint's config.json: every setting, its seed included) is trained by the
engine that trained it (its `sweeplab.engine` tag: the reference loop, or the stacked engine, here as a group of
one), into a new run of the same MLflow experiment tagged `sweeplab.rerun_of=<RUN_ID>`, and its curves are
compared with the original's epoch by epoch (`compare`). A user's model is rebuilt from the run's own code/
artifacts, each file checked against the hashes the run's tags recorded before anything is imported.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sweeplab.config import ConfigError, ExperimentConfig
from sweeplab.process import cpu_kernels
from sweeplab.track.tracker import (
    CHECKPOINT_PATH,
    TAG_ENGINE,
    TAG_INIT_FROM,
    TAG_KERNELS,
    TAG_STACKED_MEMBERS,
    TAG_STACKED_WIDTH,
    Tracker,
)

TAG_RERUN_OF = "sweeplab.rerun_of"  # on a rerun: the run whose configuration it trained again


@dataclass
class Like:
    """A logged run to train again: its configuration, the engine that trained it, where it is, and its curves."""

    run_id: str
    config: ExperimentConfig
    engine: str  # reference | vectorized
    experiment_id: str
    curves: dict[str, list[float]] = field(default_factory=dict)  # train_loss, val_loss: the original's per epoch
    best_epoch: int = 0
    folder: tempfile.TemporaryDirectory | None = None  # holds the logged code while the rerun imports it
    width: int | None = None  # a stacked MLP's padded hidden width (TAG_STACKED_WIDTH) ...
    members: int | None = None  # a stacked trial's group size (TAG_STACKED_MEMBERS)
    kernels: str | None = None  # the CPU instruction set its kernels used (TAG_KERNELS)


def read_like(run_id: str, tracking_uri: str) -> Like:
    """The run's configuration and curves; one line (ConfigError) for a run that is not there or logged none."""
    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    client = tracker.client
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(f"rerun: no run {run_id!r} in {tracking_uri}") from None
    folder = tempfile.TemporaryDirectory(prefix="sweeplab-rerun-")
    try:  # the folder goes with any refusal: nothing is left behind outside the stores
        return _read(tracker, run, folder)
    except BaseException:
        folder.cleanup()
        raise


def _read(tracker: Tracker, run, folder: tempfile.TemporaryDirectory) -> Like:
    client, run_id = tracker.client, run.info.run_id
    try:
        path = client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/config.json", folder.name)
        raw = json.loads(Path(path).read_text())
    except Exception:
        raise ConfigError(f"rerun: run {run_id} logged no configuration (checkpoint/config.json)") from None
    try:
        config = ExperimentConfig.model_validate(_given(raw))
    except ValueError as exc:  # pydantic's ValidationError: a config this version cannot read
        first = str(exc).splitlines()[1:3]
        why = " ".join(line.strip() for line in first)
        raise ConfigError(f"rerun: run {run_id}'s configuration is not one this sweeplab reads ({why})") from None
    config = _same_weights(config, run.data.tags.get(TAG_INIT_FROM))
    paths = [p for p in (config.model.class_path, config.data.class_path) if p]
    if any(p.startswith("__main__.") for p in paths):  # a notebook's own objects, in this very process
        _check_main(run, config, paths)
    elif paths:
        config._code_dir = _checked_code(tracker, run_id, config, Path(folder.name))
    curves = {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("train_loss", "val_loss")
    }
    best = run.data.metrics.get("best_epoch")
    return Like(
        run_id,
        config,
        run.data.tags.get(TAG_ENGINE, "reference"),
        run.info.experiment_id,
        curves,
        int(best) if best is not None else 0,
        folder,
        *(
            int(run.data.tags[tag]) if tag in run.data.tags else None
            for tag in (TAG_STACKED_WIDTH, TAG_STACKED_MEMBERS)
        ),
        run.data.tags.get(TAG_KERNELS),
    )


def _same_weights(config: ExperimentConfig, resolved: str | None) -> ExperimentConfig:
    """model.init_from as the original resolved it: `models:/NAME@ALIAS` may name another version by now, so the
    rerun starts from the run the tag `sweeplab.init_from` recorded (`... (run RUN_ID)`, or `run RUN_ID`)."""
    source = config.model.init_source
    found = re.search(r"\brun ([0-9a-f]{32})\b", resolved or "")
    if source is None or found is None:
        return config
    same = source.model_copy(update={"uri": f"runs:/{found.group(1)}"})
    copy = config.model_copy(update={"model": config.model.model_copy(update={"init_from": same})})
    copy._code_dir = config.code_dir
    return copy


def _given(raw: dict) -> dict:
    """A logged config (a whole model_dump) as a file would give it: a user's model's section without the built-in
    MLP's fields left at their defaults (which the schema refuses beside a class_path)."""
    model = raw.get("model")
    if isinstance(model, dict) and model.get("class_path"):
        from sweeplab.config import ModelConfig

        defaults = ModelConfig.model_fields
        raw = {
            **raw,
            "model": {
                key: value
                for key, value in model.items()
                if key not in defaults or key in ("class_path", "init_args") or value != defaults[key].default
            },
        }
    return raw


def _check_main(run, config: ExperimentConfig, paths: list[str]) -> None:
    """A run of a notebook's class (`__main__.Net`) is rerun from the class this process defines (nothing is
    imported): it must be there, and the model's source must hash to what the run recorded, when it recorded one."""
    import hashlib

    from sweeplab.track.tracker import TAG_SOURCE_HASH
    from sweeplab.train.plugins import REGISTERED, main_source

    for path in paths:
        if path not in REGISTERED:
            raise ConfigError(f"rerun: the run trained {path}, which this process does not define (run its cell first)")
    if config.model.class_path and config.model.class_path.startswith("__main__."):
        text = main_source(config.model.class_path)
        recorded = run.data.tags.get(TAG_SOURCE_HASH)
        # a class whose source Python could not read (a class in a Jupyter cell) recorded no hash: this process's
        # class is the one it has
        if recorded is not None and (text is None or hashlib.sha256(text.encode()).hexdigest() != recorded):
            raise ConfigError(
                f"rerun: {config.model.class_path} is not the class run {run.info.run_id} trained (its source changed)"
            )


def _checked_code(tracker: Tracker, run_id: str, config: ExperimentConfig, tmp: Path) -> str:
    """The run's code/ artifacts, every file the model's import would run checked against the run's recorded
    hashes before anything is imported (track/serve.check_source)."""
    from sweeplab.track.serve import check_source
    from sweeplab.train.plugins import forget_if_elsewhere

    folder = tmp / "logged"
    folder.mkdir()
    try:
        tracker.client.download_artifacts(run_id, "code", str(folder))
    except Exception:
        raise ConfigError(f"rerun: run {run_id} logged no source of its code (code/ artifacts)") from None
    for class_path in filter(None, [config.model.class_path, config.data.class_path]):
        # a module of that name imported earlier in this process (an earlier rerun's copy) is not this run's
        forget_if_elsewhere(class_path.rpartition(".")[0], str(folder / "code"))
        try:
            check_source(tracker, run_id, _ClassPath(class_path), str(folder / "code"), logged_copy=True)
        except Exception as exc:
            raise ConfigError(f"rerun: {exc}") from None
    return str(folder / "code")


@dataclass
class _ClassPath:
    class_path: str


def train_like(like: Like):
    """Train the configuration by the engine that trained the original: (Trained, whether it stacked)."""
    from sweeplab.train.crossval import Folded, is_folded
    from sweeplab.train.engines import Job, ReferenceEngine, Routes, VectorizedEngine

    if like.engine == "vectorized" or is_folded(like.config):
        job = Job(None, like.config)
        engine = VectorizedEngine(Routes()) if like.engine == "vectorized" else ReferenceEngine()
        Folded(engine).train([job, *_companions(like)], None)
        if job.error is not None:
            raise job.error
        return job.result
    from sweeplab.train.experiment import run_experiment

    return run_experiment(like.config)


def _companions(like: Like) -> list:
    """Who trains beside the rerun so it runs the arithmetic the original ran (their results are dropped): as many
    twins as its group had other members, the MLP's at its group's padded width. A member's numbers do not depend on
    the other members' values, but on how the batched kernels block them: measured with torch's AVX2 kernels (the
    command's), a BatchNorm CNN trial of a group of 12 reruns 5.8e-5 apart by epoch 30 in a group of 2 to 6 and
    bit for bit in one of 8 or 12; the MLP alone against in a group, 6.4e-7; at another padded width (the matmul
    sums over it), 9e-7. So the rerun trains in a group of the original's size: bit for bit, at that group's cost."""
    from sweeplab.train.engines import Job

    config = like.config
    if like.members is None:  # logged before the tag: a user's model stacks in groups of two or more
        return [Job(None, config)] if config.model.class_path else []
    twin = config
    if like.width is not None:
        twin = config.model_copy(update={"model": config.model.model_copy(update={"hidden": like.width})})
    # a fold trial's members were its folds and other trials' (each twin brings its folds): about that many
    trials = like.members // config.data.folds if config.data.folds and config.data.fold is None else like.members
    return [Job(None, twin) for _ in range(max(trials, 1) - 1)]


def compare(like: Like, history) -> tuple[float, str]:
    """(the largest relative difference of the rerun's train and validation losses from the original's over
    every epoch both have, one line saying so and whether the best epochs agree)."""
    worst = 0.0
    for key, mine in (("train_loss", history.train_loss), ("val_loss", history.val_loss)):
        for a, b in zip(mine, like.curves.get(key, [])):
            if math.isfinite(a) and math.isfinite(b):
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
            elif not (math.isnan(a) and math.isnan(b)) and a != b:
                worst = math.inf
    theirs = len(like.curves.get("val_loss", []))
    length = "" if len(history.val_loss) == theirs else f" (the original ran {theirs})"
    best = "the same best epoch" if history.best_epoch == like.best_epoch else "another best epoch"
    line = (
        f"rerun of {like.run_id} ({like.engine}): curves within {worst:.2g} (relative) of the original's over "
        f"{len(history.val_loss)} epochs{length}; {best} ({history.best_epoch}; the original's {like.best_epoch})"
    )
    here = cpu_kernels()
    if like.kernels is not None and like.kernels != here:
        how = (
            f"`sweeplab rerun {like.run_id}` from a shell pins AVX2, as the sweeplab command does"
            if like.kernels == "AVX2"
            else "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_CBWR set before torch is imported choose them"
        )
        line += (
            f"; the original ran torch's {like.kernels} CPU kernels, this process {here}, which round otherwise ({how})"
        )
    return worst, line
