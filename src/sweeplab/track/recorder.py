"""The recorder: the one path from a trained trial (its History) to its MLflow run and then to the ledger.

One set of metric names, logged from one place (`TrialRun`): train_loss, val_loss and the task metrics with
step=epoch; summaries (best_val_loss, best_epoch, ...) at step 0; the checkpoint, config and dataset. `Recorder`
writes a sweep's trials for both engines (live while the reference engine trains, or once the vectorized engine
has trained them, in sweep/writers.py); `RunTracker` is a tracked `sweeplab run`. Imports nothing of Optuna.

Why one module of ~550 lines: it is the one owner of what a run holds (metric names, summaries, artifacts,
the dataset, its code); split, the two writers of runs (a sweep's trials, `sweeplab run`) would drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from sweeplab.config import ExperimentConfig, value_at
from sweeplab.outcome import Outcome, RunEnd
from sweeplab.process import cpu_kernels
from sweeplab.stores import display_uri, retry_lost_races
from sweeplab.track.tracker import (
    CHECKPOINT_PATH,
    TAG_CONDITION,
    TAG_CONFIRMS,
    TAG_ENGINE,
    TAG_INIT_FROM,
    TAG_KERNELS,
    TAG_MODEL_CLASS,
    TAG_NOTE,
    TAG_OBJECTIVE,
    TAG_ROLE,
    TAG_SOURCE_HASH,
    TAG_SOURCES,
    TAG_STACKED_MEMBERS,
    TAG_STACKED_WIDTH,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    Tracker,
    condition_label,
    flatten,
    outcome_tags,
    run_name_for,
    value_text,
)
from sweeplab.train import batch
from sweeplab.train.epoch import EpochRecord
from sweeplab.train.init import source_label
from sweeplab.train.loop import baseline_loss
from sweeplab.train.model import save_checkpoint, spec_json
from sweeplab.train.options import build_loss, fitted_constant_loss
from sweeplab.train.plugins import REGISTERED, in_main, main_source, source_of
from sweeplab.train.sources import import_paths, source_hashes, user_modules

FLUSH_EVERY_S = 5.0  # long trials show their curves live; short ones log once, at the end
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch
_DATASET_ENTITIES: dict = {}  # (description, name, data bytes) -> MLflow dataset entity


def begin_run(
    tracker: Tracker,
    experiment_id: str,
    run_name: str,
    config: ExperimentConfig,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    live: bool = True,
    start_ms: int | None = None,
) -> "TrialRun":
    """A training run. Live, its params are written now and its curves as it trains (a long trial shows them in
    the UI); otherwise (a trial already trained) everything goes in the one batch that ends it."""
    tags = {**tags, **run_tags(config)}
    run_id = tracker.start_run(experiment_id, run_name, tags, parent_run_id, start_ms)
    run = TrialRun(tracker, run_id, config)
    if live:
        run.flush()
    return run


def run_tags(config: ExperimentConfig) -> dict[str, str]:
    """What the run's result follows (its objective) and, for a user's model, which class and which source."""
    tags = {TAG_OBJECTIVE: f"{config.objective.metric} {config.objective.direction}"}
    if config.model.init_from is not None:  # lineage: the weights it started from, as they resolved
        tags[TAG_INIT_FROM] = source_label(config)
    if config.model.class_path:
        tags[TAG_MODEL_CLASS] = config.model.class_path
        found = source_of(config.model.class_path, config.code_dir)
        text = main_source(config.model.class_path)
        if found is not None:
            tags[TAG_SOURCE_HASH] = found[1]
        elif text is not None:  # a notebook's class: the hash of its source, as inspect.getsource gives it
            tags[TAG_SOURCE_HASH] = hashlib.sha256(text.encode()).hexdigest()
    # every module of the user's the run imported (its model's, its loader's, its collate_fn's...): what a rerun
    # checks the logged code/ against before importing any of it
    search = [config.code_dir] if config.code_dir else None
    hashes: dict[str, str] = {}
    for path in import_paths(config).values():
        if not (in_main(path) or path in REGISTERED):
            hashes.update(source_hashes(path.rpartition(".")[0], search))
    if hashes:
        tags[TAG_SOURCES] = json.dumps(hashes, separators=(",", ":"))
    return tags


def code_sources(config: ExperimentConfig) -> list[tuple[str, bytes]]:
    """(path under code/, source) of the user's code the run imported (its model class, its loader, its collate_fn,
    its loss, optimizer, scheduler and metrics by class_path), each with every module of the user's it imports
    (sources.user_modules), laid out as on sys.path (`nets.py`, `layers.py`, `pkg/__init__.py`); for an object
    defined in a notebook (`__main__`), its own source as `__main__.Name.py`."""
    search = [config.code_dir] if config.code_dir else None
    out: dict[str, bytes] = {}
    for path in import_paths(config).values():
        if in_main(path) or path in REGISTERED:
            text = main_source(path)
            if text is not None:
                out.setdefault(f"{path}.py", text.encode())
            continue
        for found in user_modules(path.rpartition(".")[0], search).values():
            out.setdefault(found.relative_file, found.origin.read_bytes())
    return list(out.items())


class TrialRun:
    """One training run in MLflow. `epoch_callback` buffers the per-epoch metrics (one log_batch per flush, not
    one call per value); `finish` logs the curves not yet logged, the summary, the checkpoint and the data, and
    ends the run."""

    def __init__(self, tracker: Tracker, run_id: str, config: ExperimentConfig):
        self.tracker, self.client = tracker, tracker.client
        self.run_id = run_id
        self.config = config
        self._params = [Param(k, v[:6000]) for k, v in flatten(config).items()]  # until the first flush
        self._pending: list[Metric] = []
        self._epochs_seen = 0  # epochs buffered through epoch_callback; finish takes the rest from the History
        self._last_flush = time.monotonic()
        self.ended = False

    def epoch_callback(self, record: EpochRecord) -> None:
        now = int(time.time() * 1000)
        step = record.epoch
        values = {"train_loss": record.train_loss, "val_loss": record.val_loss, **record.metrics}
        if record.lr is not None:
            values["lr"] = record.lr
        for name, rate in record.group_lr.items():  # train.param_groups: each named group's rate
            values[f"lr_{name}"] = rate
        self._pending += [
            Metric(name, value, now, step) for name, value in values.items() if math.isfinite(value)
        ]  # as curve_metrics: a NaN would hide the whole curve
        self._epochs_seen = record.epoch
        if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()
        return None

    def flush(self, tags: list[RunTag] | None = None) -> None:
        """Everything pending (params, metrics, and `tags`), in as few log_batch calls as MLflow's limits allow."""
        metrics, params, tags = self._pending, self._params, list(tags or [])
        self._pending, self._params = [], []
        self._last_flush = time.monotonic()
        while True:  # MLflow takes at most 1,000 metrics and 100 params per batch
            batch_metrics, metrics = metrics[:MAX_METRICS_PER_BATCH], metrics[MAX_METRICS_PER_BATCH:]
            batch_params, params = params[:100], params[100:]
            self.client.log_batch(self.run_id, metrics=batch_metrics, params=batch_params, tags=tags)
            tags = []
            if not metrics and not params:
                return

    def finish(self, result, outcome: str, reason: str | None = None, tags: dict[str, str] | None = None) -> None:
        """Log the summary metrics and artifacts of a finished (or stopped) training run and end the run."""
        now = int(time.time() * 1000)
        self.log_artifacts(result)
        self.log_dataset(result)
        curves = curve_metrics(result.history, now, after_epoch=self._epochs_seen)
        history = result.history
        tags = {**(tags or {}), TAG_KERNELS: cpu_kernels()}
        if history.stacked_members is not None:
            tags[TAG_STACKED_MEMBERS] = str(history.stacked_members)
        if history.stacked_width is not None:
            tags[TAG_STACKED_WIDTH] = str(history.stacked_width)
        self.end(outcome, reason, tags, metrics=curves + summary_metrics(result, now), end_ms=now)

    def end(
        self,
        outcome: str,
        reason: str | None = None,
        tags: dict[str, str] | None = None,
        metrics: list[Metric] | None = None,
        end_ms: int | None = None,
    ) -> None:
        """The remaining metrics and the outcome tags in one log_batch, then the status: two calls, which matters
        against a tracking server (~60 ms a call on a busy one)."""
        if self.ended:
            return
        self._pending += metrics or []
        self.flush(outcome_tags(outcome, reason, tags))
        self.client.set_terminated(self.run_id, Outcome(outcome).run_status, end_time=end_ms)
        self.ended = True

    def log_artifacts(self, result) -> None:
        with tempfile.TemporaryDirectory(prefix="sweeplab-") as tmp:
            folder = Path(tmp) / CHECKPOINT_PATH
            folder.mkdir()
            if result.history.best_state is not None:
                save_checkpoint(folder / "best.pt", result.history.best_state, result.spec)
                if result.dataset is not None:  # a real batch: what the champion is exported with
                    torch_save_example(folder / "example.pt", example_inputs(result.dataset))
            (folder / "model_spec.json").write_text(spec_json(result.spec))
            (folder / "config.json").write_text(json.dumps(result.config.model_dump(), indent=2))
            if result.history.confusion_matrix is not None:
                (folder / "confusion_matrix.json").write_text(json.dumps(result.history.confusion_matrix))
            self.tracker.log_artifacts(self.run_id, folder, CHECKPOINT_PATH)
            sources = code_sources(result.config)
            if sources:  # what code the run trained: the user's module(s), hashed in the run's tags
                code = Path(tmp) / "code"
                code.mkdir()
                for name, text in sources:
                    (code / name).parent.mkdir(parents=True, exist_ok=True)
                    (code / name).write_bytes(text)
                self.tracker.log_artifacts(self.run_id, code, "code")

    def log_dataset(self, result) -> None:
        """The training split, described with MLflow's dataset entity (name, digest, schema, source). A lazy
        Dataset is described by what is cheap (its loader, length and a sample), never read whole."""
        data = result.dataset
        name = f"{result.config.name}-train"
        if data.lazy:
            sample = [t.numpy().tobytes() for t in batch.tensors(data.example[0])] + [data.example[1].numpy().tobytes()]
            key = (data.description, name, data.n_train, json.dumps(result.config.data.model_dump(), default=str))
            key += (hashlib.sha256(b"".join(sample)).hexdigest(),)
        else:
            features = batch.tensors(data.x_train)
            key = (data.description, name, *(t.numpy().tobytes() for t in features), data.y_train.numpy().tobytes())
        entity = _DATASET_ENTITIES.get(key)
        if entity is None:  # trials of one sweep mostly share a few datasets: describe each once
            source = CodeDatasetSource(tags={"sweeplab.data": data.description})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if data.lazy:
                    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:8]
                    dataset = MetaDataset(source, name=name, digest=digest)
                else:
                    dataset = from_numpy(
                        _numpy_inputs(data.x_train), source=source, targets=data.y_train.numpy(), name=name
                    )
                entity = _DATASET_ENTITIES[key] = dataset._to_mlflow_entity()
        inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])]
        # MLflow checks for the dataset, then inserts it: two workers can both insert
        retry_lost_races(self.client.log_inputs, self.run_id, inputs, attempts=3, pause_s=(0.05, 0.15))


def _numpy_inputs(x):
    """One array, or several inputs as MLflow's dict of named arrays (a tuple's by position)."""
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {str(k): v.numpy() for k, v in x.items() if isinstance(v, torch.Tensor)}
    return {f"input_{i}": v.numpy() for i, v in enumerate(x) if isinstance(v, torch.Tensor)}


def example_inputs(data):
    """The first validation samples' inputs (a tensor, or several as a tuple or dict): plain tensors in plain
    containers, which torch.load(weights_only=True) reads."""
    if data.example is not None:
        return data.example[0]
    return batch.each(lambda t: t[:EXAMPLE_ROWS], data.x_val)


EXAMPLE_ROWS = 8


def torch_save_example(path: Path, x) -> None:
    torch.save(batch.each(lambda t: t.detach().cpu().clone(), x), path)  # tensors: weights_only reads them


def curve_metrics(history, now: int, after_epoch: int = 0) -> list[Metric]:
    """train_loss, val_loss and the task metrics of every epoch after `after_epoch` (step=epoch), as
    epoch_callback logs them.
    Non-finite values are left out: MLflow's run page drops a whole curve that holds a NaN, and a diverged
    run's curve up to where it diverged is what a reader needs (its reason tag says where)."""
    metrics = []
    for epoch, (train, val) in enumerate(zip(history.train_loss, history.val_loss), start=1):
        if epoch <= after_epoch:
            continue
        metrics += [Metric("train_loss", train, now, epoch), Metric("val_loss", val, now, epoch)]
        metrics += [Metric(name, values[epoch - 1], now, epoch) for name, values in history.metrics.items()]
        if len(history.lr) >= epoch:
            metrics.append(Metric("lr", history.lr[epoch - 1], now, epoch))
        for name, rates in history.group_lr.items():
            if len(rates) >= epoch:
                metrics.append(Metric(f"lr_{name}", rates[epoch - 1], now, epoch))
    return [metric for metric in metrics if math.isfinite(metric.value)]


SUMMARY_STEP = 0  # every summary at one step, so MLflow charts it as one value per run (not a line over epochs)


def summary_metrics(result, now: int) -> list[Metric]:
    """best_val_loss, best_epoch (and best_<task metric>), epochs_run, train_seconds and baseline_val_loss (the
    loss of a constant prediction: what "never learned" means), all at SUMMARY_STEP. A diverged run has no
    best_*: its loss before diverging is not its result, and would sort among the real ones."""
    history = result.history
    summary = []
    if history.best_epoch and history.status != "diverged":
        summary = [
            Metric("best_val_loss", history.best_val_loss, now, SUMMARY_STEP),
            Metric("best_epoch", float(history.best_epoch), now, SUMMARY_STEP),
        ]
        for name, value in history.best_metrics.items():
            summary.append(Metric(f"best_{name}", value, now, SUMMARY_STEP))
    summary.append(Metric("epochs_run", float(history.epochs_run), now, SUMMARY_STEP))
    summary.append(Metric("train_seconds", history.seconds, now, SUMMARY_STEP))
    baseline = baseline_val_loss(result)
    if baseline is not None:
        summary.append(Metric("baseline_val_loss", baseline, now, SUMMARY_STEP))
    for name, value in (getattr(result, "test", None) or {}).items():  # data.test_size: scored once, at the end
        summary.append(Metric(name, value, now, SUMMARY_STEP))
    return summary


_FITTED_BASELINES: dict = {}  # (loss, task, labels' digest) -> the fitted constant's loss: trials share their data


def baseline_val_loss(result) -> float | None:
    """The validation loss of the best constant prediction under the trial's own loss: in closed form for the
    named losses (~50 us), fitted numerically for any other (options.fitted_constant_loss, once per loss and data).
    None without the labels (a lazy Dataset without `targets`)."""
    data, config = result.dataset, result.config
    if data is None or data.y_train is None or data.y_val is None:
        return None
    loss = config.train.loss
    if loss in ("mse", "l1", "bce", "cross_entropy"):
        value = baseline_loss(data.y_train, data.y_val, config.task, loss)
        return value if math.isfinite(value) else None
    labels = hashlib.sha256(data.y_train.numpy().tobytes() + b"|" + data.y_val.numpy().tobytes()).hexdigest()
    key = (json.dumps(loss.model_dump() if hasattr(loss, "model_dump") else loss, sort_keys=True), config.task, labels)
    if key not in _FITTED_BASELINES:
        try:
            loss_fn = build_loss(config, data.y_train, data.n_classes or 0)
        except Exception:
            return None
        _FITTED_BASELINES[key] = fitted_constant_loss(loss_fn, data.y_train, data.y_val, config.task, data.n_outputs)
    return _FITTED_BASELINES[key]


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


class Ledger(Protocol):
    """What the recorder tells the sweep's ledger (sweep.ledger.Ledger fulfils it); a Protocol, so track/ needs
    no Optuna. The recorder holds one per study, and is the only caller of these three for the leases it is given;
    each lease is told `finish` or `fail` once."""

    def link_run(self, lease, run_id: str) -> None:
        """Called right after the trial's MLflow run is created, before anything is logged to it. May assume the
        lease is held (its heartbeat goes on). Must only record the link (recovery uses it to end the run of a
        lost worker's trial); it must not end the run or the trial."""

    def finish(self, lease, end: RunEnd) -> None:
        """Called once the trial's run is FINISHED with every metric and artifact logged: never before, so a
        finished trial always has its finished run. `end` is the run's own reading of how it ended (take a copy
        before keeping it). Tells the trial and releases the lease; it must not write to MLflow."""

    def fail(self, lease, reason: str, interrupted: bool = False, run_ended: bool = True) -> None:
        """Called when the trial cannot finish: its training or its writing failed, or it was interrupted.
        `run_ended` says whether its run was ended (FAILED or KILLED) already; when not, recovery ends it later.
        `interrupted`: the user is waiting; one attempt, no retries through an outage. Must not raise for a trial
        that is already finished elsewhere."""


class Recorder:
    """Writes each trained trial as its MLflow run, then tells the ledger how it ended: in that order, so a
    finished trial always has its finished run. Both engines' trials go through here: the reference engine's
    live (the run exists while it trains), the vectorized engine's once trained (`record`, in a writer process)."""

    def __init__(
        self,
        tracker: Tracker,
        experiment_id: str,
        parent_run_id: str | None,
        ledger: Ledger,
        study: str,
        keys: list[str],
        condition: dict | None = None,
        engine: str = "reference",
    ):
        self.tracker, self.experiment_id, self.parent_run_id, self.ledger = (
            tracker,
            experiment_id,
            parent_run_id,
            ledger,
        )
        self.study, self.keys, self.condition, self.engine = study, keys, condition or {}, engine

    def tags(self, lease) -> dict[str, str]:
        """What a trial run is: role, study, trial number, the engine and, in a sweep with conditions, which. A
        confirmation's repeat (the lease `confirms` a search trial's run) is role `confirm`, tagged with that run."""
        role = "trial" if getattr(lease, "confirms", None) is None else "confirm"
        tags = {TAG_ROLE: role, TAG_STUDY: self.study, TAG_TRIAL: str(lease.number), TAG_ENGINE: self.engine}
        if role == "confirm":
            tags[TAG_CONFIRMS] = lease.confirms
        if self.condition:
            tags[TAG_CONDITION] = condition_label(self.condition)
        return tags

    def begin(self, lease, config: ExperimentConfig, live: bool = True, start_ms: int | None = None) -> TrialRun:
        """The trial's run, linked to the trial at once (so recovery can end it if this worker is lost)."""
        name = run_name_for(config, lease.number, [*self.keys, *self.condition])
        run = begin_run(
            self.tracker,
            self.experiment_id,
            name,
            config,
            self.tags(lease),
            self.parent_run_id,
            live=live,
            start_ms=start_ms,
        )
        self.ledger.link_run(lease, run.run_id)
        return run

    def finish(self, run: TrialRun, lease, result) -> Outcome:
        history = result.history
        outcome = Outcome.of_history(history)
        run.finish(
            result,
            outcome,
            history.stop_reason,
            tags={TAG_STATE: outcome.trial_state, TAG_NOTE: self.note(lease, result.config, history)},
        )
        metric = history.objective[0]
        curve = history.val_loss if metric == "val_loss" else history.metrics.get(metric, [])
        self.ledger.finish(
            lease, RunEnd(outcome, history.best_value, history.best_epoch, history.stop_reason, tuple(curve))
        )
        return outcome

    def record(self, lease, result, started_s: float) -> Outcome:
        """A trial trained elsewhere (the vectorized engine): its whole run, backdated to when it started."""
        return self.finish(self.begin(lease, result.config, live=False, start_ms=int(started_s * 1000)), lease, result)

    def fail(
        self,
        run: TrialRun | None,
        lease,
        reason: str,
        interrupted: bool = False,
        config: ExperimentConfig | None = None,
    ) -> None:
        """A trial that ended in an error or an interrupt: its run ended (KILLED when interrupted), its trial FAIL.
        A trial that failed before its run existed (an engine whose runs are written once trained) gets its
        FAILED run here, given its `config`, as the reference engine's trials have theirs."""
        if run is None and config is not None and not interrupted:
            try:
                run = self.begin(lease, config, live=False)
            except Exception:
                run = None  # the store is out of reach: the trial's FAIL still says why
        ended = run is None
        if run is not None:
            try:
                run.end(Outcome.KILLED if interrupted else Outcome.FAILED, reason, {TAG_STATE: "FAIL"})
                ended = True
            except Exception:
                pass  # recovery ends it once it sees the FAIL
        self.ledger.fail(lease, reason, interrupted, run_ended=ended)

    def note(self, lease, config: ExperimentConfig, history) -> str:
        """The trial run's description in the MLflow UI: its setting and how it ended."""
        setting = ", ".join(f"{key} {value_text(value_at(config, key))}" for key in self.keys)
        where = f" ({condition_label(self.condition)})" if self.condition else ""
        outcome = Outcome.of_history(history)
        if outcome == Outcome.COMPLETED:
            metric = history.objective[0]
            best = (
                f"best validation loss {history.best_val_loss:.4g}"
                if metric == "val_loss"
                else f"best {metric} {history.best_value:.4g} (validation loss {history.best_val_loss:.4g})"
            )
            result = f"completed: {best} at epoch {history.best_epoch} of {history.epochs_run}"
        else:
            result = f"{outcome}: {history.stop_reason}"
        if getattr(lease, "confirms", None) is not None:
            return f"Seed {config.seed} repeat of run {lease.confirms}{where}: {setting}. {result}."
        return f"Trial #{lease.number}{where}: {setting}. {result}."


class RunTracker:
    """`sweeplab run` with tracking: one run in the experiment named after the config.

    The run is created when the first epoch has trained, so input the loop rejects up front (labels that do
    not fit the loss, an absent device) leaves nothing half-written in MLflow."""

    def __init__(
        self,
        tracking_uri: str,
        config: ExperimentConfig,
        source: str,
        experiment_id: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.tracker = Tracker(tracking_uri)
        self.tracker.check_reachable()  # a wrong URI fails in one line, before training
        self.tracking_uri = tracking_uri
        self.tracking_uri_display = display_uri(tracking_uri)
        self.config, self.source = config, source
        self.run: TrialRun | None = None
        # where the run goes (default: the experiment named after the config) and what it is (a rerun's origin)
        self.experiment_id = experiment_id
        self.tags = {TAG_ROLE: "run", "sweeplab.experiment_file": str(source), **(tags or {})}

    def record(self, result) -> None:
        """A run trained elsewhere (the stacked engine): its whole run at once."""
        self._begin(live=False)
        self.finish(result)

    def _begin(self, live: bool = True) -> None:
        tracker = self.tracker
        experiment_id = self.experiment_id or tracker.experiment_id(self.config.name)
        self.run = begin_run(tracker, experiment_id, run_name_for(self.config), self.config, self.tags, live=live)

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    def epoch_callback(self, record: EpochRecord) -> None:
        if self.run is None:
            self._begin()
        return self.run.epoch_callback(record)

    def finish(self, result) -> None:
        history = result.history
        outcome = Outcome.of_history(history, stopped=Outcome.KILLED)
        if self.run:
            self.run.finish(result, outcome, history.stop_reason)

    def fail(self, exc: BaseException) -> None:
        outcome = Outcome.KILLED if isinstance(exc, KeyboardInterrupt) else Outcome.FAILED
        if self.run:
            self.run.end(outcome, f"{type(exc).__name__}: {exc}")
