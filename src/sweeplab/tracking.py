"""Everything MLflow: the store, experiments, parent runs, and the recorder that writes a trained trial as its run.

All calls go through an explicit `MlflowClient` and run ids (never the fluent active-run stack, which is per
thread), so runs nest correctly across threads and processes. One set of metric names, logged from one place
(`TrialRun`): train_loss, val_loss and the task metrics with step=epoch; summaries (best_val_loss, best_epoch, ...)
at step 0. `Recorder` is the one path from a finished History to its run and then to the ledger, for both engines.
Imports nothing of Optuna: a tracked `sweeplab run` never loads it. The champion model is champion.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from . import __version__
from .config import ExperimentConfig
from .loop import EpochRecord
from .outcome import Outcome
from .stores import display_uri, lost_insert_race, process_gone, worker_id

FLUSH_EVERY_S = 5.0  # long trials show their curves live; short ones log once, at the end
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch

TAG_ROLE = "sweeplab.role"
TAG_STUDY = "sweeplab.study"
TAG_TRIAL = "sweeplab.trial_number"
TAG_STATE = "sweeplab.trial_state"
TAG_OUTCOME = "sweeplab.outcome"  # completed | pruned | diverged | failed | killed
TAG_REASON = "sweeplab.reason"
TAG_CONDITION = "sweeplab.condition"  # noise=0.3: the condition a trial ran under, in a sweep that has them
TAG_ENGINE = "sweeplab.engine"  # reference | vectorized: which engine trained the trial
TAG_WORKER = "sweeplab.worker"  # host:pid of the process that owns the run
TAG_VERSION = "sweeplab.version"
TAG_COMMIT = "sweeplab.git_commit"
TAG_CHAMPION_RUN = "sweeplab.source_run_id"  # on a registered model version: the trial run it came from
CHECKPOINT_PATH = "checkpoint"  # artifacts: checkpoint/best.pt, checkpoint/model_spec.json, config.json

_DATASET_ENTITIES: dict = {}  # (description, name, data bytes) -> MLflow dataset entity


def condition_label(condition: dict) -> str:
    """`noise=0.3`: a condition as its runs are tagged and as the report and the CLI name it."""
    return ", ".join(f"{key}={value}" for key, value in condition.items())


def value_text(value) -> str:
    """A searched value as the CLI, the report and run descriptions print it: floats to 3 digits."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


VIEW_KEY = "sweeplab"  # the experiment's shared view (`mlflow.sharedViewState.sweeplab`) that runs_link opens
TAG_NOTE = "mlflow.note.content"  # the description the MLflow UI shows for an experiment or a run


def runs_link(base_url: str, experiment_id: str) -> str:
    """The study's trial runs in the MLflow UI's model-training view, best (lowest best_val_loss) first, with
    best_val_loss and the searched parameters as columns: MLflow 3.17's UI restores a shared view state (sort,
    filter, columns) from the experiment tag that `viewStateShareKey` names (see share_view)."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            "&workflowType=machine_learning")


def share_view(client: MlflowClient, experiment_id: str, keys: list[str], conditions: list[str] = ()) -> None:
    """Store the view runs_link opens: trial runs only, sorted by best_val_loss, with columns best_val_loss,
    best_epoch, the outcome and the parameters `keys` (the sweep's searched and compared keys); in a sweep with
    conditions, grouped by them (each group headed by its best loss), since results compare within a condition."""
    from .config import ALIASES

    columns = ["metrics.`best_val_loss`", "metrics.`best_epoch`", f"tags.`{TAG_OUTCOME}`",
               *(f"params.`{ALIASES.get(key, key)}`" for key in keys)]
    state = {"orderByKey": "metrics.`best_val_loss`", "orderByAsc": True,
             "searchFilter": f"tags.`{TAG_ROLE}` = 'trial'", "selectedColumns": columns}
    if conditions:
        state["groupBy"] = {"aggregateFunction": "min", "groupByKeys": [
            {"mode": "param", "groupByData": ALIASES.get(key, key)} for key in conditions]}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(state))


def start_ui_server(uri: str, host: str, port: int, workers: int = 1, log=None) -> subprocess.Popen:
    """`mlflow server` as the UI over a store. The store goes through the environment, not the command line, where
    `ps` would show its password; a local SQLite store's artifacts are where sweeplab put them (mlartifacts/)."""
    import sys

    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
               "--workers", str(workers), "--uvicorn-opts", "--log-level warning"]
    database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if database:
        command += ["--default-artifact-root", os.path.dirname(os.path.abspath(database)) + "/mlartifacts"]
    env = {"MLFLOW_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore", **os.environ,
           "MLFLOW_BACKEND_STORE_URI": uri}
    return subprocess.Popen(command, env=env, stdout=log.fileno() if log else None)


def answers(url: str) -> bool:
    """Whether an HTTP server answers 200 at url (within 2 s)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def flatten(config: ExperimentConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (`train.lr`), every field, defaults included."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            out[prefix[:-1]] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", config.model_dump())
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the sweeplab source that is running: the checkout this package was imported from, whatever
    folder the command runs in. None when the package is not a git checkout (an installed wheel), including
    one installed inside somebody else's repository: recording that repository's commit would be wrong."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if len(out) != 2 or Path(out[0]).resolve() / "src" / "sweeplab" != package:
        return None
    return out[1]


def common_tags() -> dict[str, str]:
    tags = {TAG_VERSION: __version__}
    commit = git_commit()
    if commit:
        tags[TAG_COMMIT] = commit
    return tags


def create_sqlite_store(database: Path) -> None:
    """Create a local MLflow store so that it appears whole or not at all. MLflow builds a fresh schema in some
    forty migrations (~2 s); an interrupt between two of them used to leave a database that no later command could
    open (`_alembic_tmp_experiments already exists`). The schema is built in a hidden file beside the database and
    renamed into place; a lock file beside it lets one process at a time do it (two migrating at once collide)."""
    import fcntl

    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if database.exists():  # another process created it while we waited
            return
        for stale in database.parent.glob(f".{database.name}.creating-*"):  # an earlier, interrupted creation
            stale.unlink(missing_ok=True)
        temporary = database.with_name(f".{database.name}.creating-{os.getpid()}")
        try:
            if not _copy_empty_store(temporary):
                uri = f"sqlite:///{temporary}"
                client = MlflowClient(uri, registry_uri=uri)
                client.search_registered_models(max_results=1)
                _keep_empty_store(temporary)
            os.replace(temporary, database)
        finally:
            temporary.unlink(missing_ok=True)


def _empty_store_template() -> Path:
    """Where a freshly migrated, empty store of this MLflow version is kept: a new store is a copy of it (~20 ms)
    instead of forty migrations (~2 s). Keyed by MLflow's version, whose migrations decide the schema."""
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sweeplab"
    return cache / f"empty-mlflow-{mlflow.__version__}.db"


def _copy_empty_store(target: Path) -> bool:
    """A copy of the empty store as MLflow would have made it here: its Default experiment's artifact location is
    where MLflow puts it (./mlruns/0 of the working directory) and its times are now. False without a template."""
    import shutil
    import sqlite3

    template = _empty_store_template()
    try:
        shutil.copyfile(template, target)
    except OSError:
        return False
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(target)) as connection, connection:
        connection.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                           "WHERE experiment_id = 0", (str(Path.cwd() / "mlruns" / "0"), now, now))
    return True


def _keep_empty_store(database: Path) -> None:
    """Keep a just-migrated empty store as the template (best effort: a read-only home just goes without)."""
    import shutil

    template = _empty_store_template()
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        partial = template.with_name(f".{template.name}.{os.getpid()}")
        shutil.copyfile(database, partial)
        os.replace(partial, template)  # whole or not at all, like the stores made from it
    except OSError:
        pass


def probe_database(uri: str, timeout_s: int = 5) -> None:
    """Connect to a database tracking store once, with a connect timeout, retried through a short outage
    (`with_retries`' ~15 s); then say in one line that it is unreachable, with the URI redacted."""
    import sqlalchemy

    from .config import ConfigError

    connect_args = {"connect_timeout": timeout_s} if uri.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    try:
        from .stores import retry_waits

        waits = retry_waits()
        for wait in (*waits, None):
            try:
                engine.connect().close()
                return
            except sqlalchemy.exc.OperationalError as exc:
                refused = any(words in str(exc) for words in ("authentication failed", "does not exist", "denied"))
                if wait is None or refused:  # a wrong password or database name will not come right by waiting
                    first = (str(exc.orig or exc).strip().splitlines() or ["unreachable"])[0]
                    waited = "" if refused else f" for {sum(waits):.0f} s"
                    raise ConfigError(f"--tracking-uri {display_uri(uri)}: cannot reach the MLflow tracking store"
                                      f"{waited} ({first[:300]})") from None
                time.sleep(wait)
    finally:
        engine.dispose()


class Tracker:
    """A tracking store: creates experiments and runs, and logs what a trial leaves behind."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.display_uri = display_uri(tracking_uri)
        self.client = self._open_client(tracking_uri)
        self._tags = common_tags()

    def check_reachable(self) -> None:
        """One read, so an unreachable or wrong tracking URI fails in one line before anything is written."""
        from .config import ConfigError

        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--tracking-uri {display_uri(self.tracking_uri)}: cannot reach the MLflow tracking "
                              f"store ({first[:300]})") from None

    @staticmethod
    def _open_client(tracking_uri: str) -> MlflowClient:
        """A client on the store. A local SQLite store that does not exist yet is created whole first
        (`create_sqlite_store`); one that exists is only read, so a read-only store serves predict and report."""
        if not tracking_uri.startswith("sqlite:///"):
            if "://" in tracking_uri and not tracking_uri.startswith(("sqlite:", "http:", "https:", "file:",
                                                                      "databricks")):
                # a database store: MLflow's engine set-up retries for ~106 s, a warning per attempt
                probe_database(tracking_uri)
            return MlflowClient(tracking_uri, registry_uri=tracking_uri)
        from .config import ConfigError

        database = Path(tracking_uri[len("sqlite:///"):])
        if not database.exists():
            create_sqlite_store(database)
        try:
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            client.search_registered_models(max_results=1)  # opens (and checks) the store now, not mid-sweep
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--tracking-uri {display_uri(tracking_uri)}: not a usable MLflow database "
                              f"({first[:300]})") from None
        return client

    def experiment_id(self, name: str) -> str:
        """Get or create; two workers creating it at once is fine (the loser reads the winner's)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self._artifact_location(name))
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _artifact_location(self, name: str) -> str | None:
        # A local SQLite store keeps artifacts beside the database (mlartifacts/), where `make ui` finds them;
        # a tracking server decides for itself (served artifacts).
        if self.tracking_uri.startswith("sqlite:///"):
            root = Path(self.tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / name
            return root.as_uri()
        return None

    def start_run(self, experiment_id: str, run_name: str, tags: dict[str, str] | None = None,
                  parent_run_id: str | None = None, start_ms: int | None = None) -> str:
        all_tags = {**self._tags, TAG_WORKER: worker_id(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        return self.client.create_run(experiment_id, run_name=run_name, tags=all_tags, start_time=start_ms).info.run_id

    def begin_run(self, experiment_id: str, run_name: str, config: ExperimentConfig, tags: dict[str, str],
                  parent_run_id: str | None = None, live: bool = True, start_ms: int | None = None) -> "TrialRun":
        """A training run. Live, its params are written now and its curves as it trains (a long trial shows them
        in the UI); otherwise (a trial already trained) everything goes in the one batch that ends it."""
        run_id = self.start_run(experiment_id, run_name, tags, parent_run_id, start_ms)
        run = TrialRun(self.client, run_id, config)
        if live:
            run.flush()
        return run

    def end_if_running(self, run_id: str, reason: str) -> None:
        """End a run that a lost worker left RUNNING as KILLED, and the worker's own parent run with it (a
        `sweeplab worker` that stopped heartbeating is gone); leave any other run as it is."""
        from .stores import with_retries

        run = with_retries(self.client.get_run, run_id, what="the MLflow tracking store")
        if run.info.status == "RUNNING":
            self.end_run(run_id, "killed", reason)
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id:
            parent = with_retries(self.client.get_run, parent_id, what="the MLflow tracking store")
            if parent.info.status == "RUNNING" and parent.data.tags.get(TAG_ROLE) == "worker":
                self.end_run(parent_id, "killed", f"worker lost ({reason})")

    def reap_dead_local_runs(self, experiment_id: str) -> int:
        """End as KILLED the RUNNING runs whose process on this machine no longer exists (a SIGKILLed sweep's
        parent and trial runs, say). Returns how many."""
        reaped = 0
        for run in self.client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000):
            worker = run.data.tags.get(TAG_WORKER)
            if worker and process_gone(worker):
                self.end_run(run.info.run_id, "killed", f"process {worker} ended without closing the run")
                reaped += 1
        return reaped

    def end_run(self, run_id: str, outcome: str, reason: str | None = None) -> None:
        self.client.log_batch(run_id, tags=outcome_tags(outcome, reason))
        self.client.set_terminated(run_id, Outcome(outcome).run_status)


class TrialRun:
    """One training run in MLflow. `epoch_callback` buffers the per-epoch metrics (one log_batch per flush, not
    one call per value); `finish` logs the curves not yet logged, the summary, the checkpoint and the data, and
    ends the run."""

    def __init__(self, client: MlflowClient, run_id: str, config: ExperimentConfig):
        self.client = client
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
        self._pending += [Metric(name, value, now, step) for name, value in values.items()
                          if math.isfinite(value)]  # as curve_metrics: a NaN would hide the whole curve
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
        self.end(outcome, reason, tags, metrics=curves + summary_metrics(result, now), end_ms=now)

    def end(self, outcome: str, reason: str | None = None, tags: dict[str, str] | None = None,
            metrics: list[Metric] | None = None, end_ms: int | None = None) -> None:
        """The remaining metrics and the outcome tags in one log_batch, then the status: two calls, which matters
        against a tracking server (~60 ms a call on a busy one)."""
        if self.ended:
            return
        self._pending += metrics or []
        self.flush(outcome_tags(outcome, reason, tags))
        self.client.set_terminated(self.run_id, Outcome(outcome).run_status, end_time=end_ms)
        self.ended = True

    def log_artifacts(self, result) -> None:
        from .model import save_checkpoint, spec_json

        with tempfile.TemporaryDirectory(prefix="sweeplab-") as tmp:
            folder = Path(tmp) / CHECKPOINT_PATH
            folder.mkdir()
            if result.history.best_state is not None:
                save_checkpoint(folder / "best.pt", result.history.best_state, result.spec)
            (folder / "model_spec.json").write_text(spec_json(result.spec))
            (folder / "config.json").write_text(json.dumps(result.config.model_dump(), indent=2))
            if result.history.confusion_matrix is not None:
                (folder / "confusion_matrix.json").write_text(json.dumps(result.history.confusion_matrix))
            self.client.log_artifacts(self.run_id, str(folder), CHECKPOINT_PATH)

    def log_dataset(self, result) -> None:
        """The training split, described with MLflow's dataset entity (name, digest, schema, source)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.numpy_dataset import from_numpy
        from mlflow.entities import DatasetInput, InputTag

        data = result.dataset
        key = (data.description, result.config.name, data.x_train.numpy().tobytes(), data.y_train.numpy().tobytes())
        entity = _DATASET_ENTITIES.get(key)
        if entity is None:  # trials of one sweep mostly share a few datasets: describe each once
            source = CodeDatasetSource(tags={"sweeplab.data": data.description})
            dataset = from_numpy(data.x_train.numpy(), source=source, targets=data.y_train.numpy(),
                                 name=f"{result.config.name}-train")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                entity = _DATASET_ENTITIES[key] = dataset._to_mlflow_entity()
        inputs = [DatasetInput(entity, [InputTag("mlflow.data.context", "training")])]
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, inputs)
                return
            except Exception as exc:  # MLflow checks for the dataset, then inserts it: two workers can both insert
                if attempt == 2 or not lost_insert_race(exc):
                    raise
                time.sleep(0.05 * (attempt + 1))


def outcome_tags(outcome: str, reason: str | None = None, extra: dict[str, str] | None = None) -> list[RunTag]:
    """How a run ended, as tags: sweeplab.outcome, sweeplab.reason (when there is one), and any extra."""
    tags = [RunTag(TAG_OUTCOME, str(outcome))] + [RunTag(k, v) for k, v in (extra or {}).items()]
    if reason:
        tags.append(RunTag(TAG_REASON, reason[:5000]))
    return tags


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
    return [metric for metric in metrics if math.isfinite(metric.value)]


SUMMARY_STEP = 0  # every summary at one step, so MLflow charts it as one value per run (not a line over epochs)


def summary_metrics(result, now: int) -> list[Metric]:
    """best_val_loss, best_epoch (and best_<task metric>), epochs_run, train_seconds and baseline_val_loss (the
    loss of a constant prediction: what "never learned" means), all at SUMMARY_STEP. A diverged run has no
    best_*: its loss before diverging is not its result, and would sort among the real ones."""
    history = result.history
    summary = []
    if history.best_epoch and history.status != "diverged":
        summary = [Metric("best_val_loss", history.best_val_loss, now, SUMMARY_STEP),
                   Metric("best_epoch", float(history.best_epoch), now, SUMMARY_STEP)]
        for name, value in history.best_metrics.items():
            summary.append(Metric(f"best_{name}", value, now, SUMMARY_STEP))
    summary.append(Metric("epochs_run", float(history.epochs_run), now, SUMMARY_STEP))
    summary.append(Metric("train_seconds", history.seconds, now, SUMMARY_STEP))
    baseline = baseline_val_loss(result)
    if baseline is not None:
        summary.append(Metric("baseline_val_loss", baseline, now, SUMMARY_STEP))
    return summary


def baseline_val_loss(result) -> float | None:
    from .loop import baseline_loss

    data, config = result.dataset, result.config
    if data is None:
        return None
    value = baseline_loss(data.y_train, data.y_val, config.task, config.train.loss)  # ~50 us: not worth a cache
    return value if math.isfinite(value) else None


def finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def run_name_for(config: ExperimentConfig, trial_number: int | None = None) -> str:
    """What the trial is, at a glance, most telling first (the UI's run column shows ~20 characters):
    `adam-h16-lr0.03-n0.3 #12`."""
    train = config.train
    hidden = "x".join(str(h) for h in config.model.hidden_sizes)
    name = f"{train.optimizer.lower()}-h{hidden}-lr{train.lr:.2g}-n{config.data.noise:g}"
    return f"{name} #{trial_number}" if trial_number is not None else name


class Ledger(Protocol):
    """What the recorder tells the sweep's ledger (ledger.Ledger); a Protocol, so this module needs no Optuna."""

    def link_run(self, lease, run_id: str) -> None: ...

    def finish(self, lease, outcome: Outcome, best_val_loss: float, best_epoch: int, reason: str | None) -> None: ...

    def fail(self, lease, reason: str, interrupted: bool = False, run_ended: bool = True) -> None: ...


class Recorder:
    """Writes each trained trial as its MLflow run, then tells the ledger how it ended: in that order, so a
    finished trial always has its finished run. Both engines' trials go through here: the reference engine's
    live (the run exists while it trains), the vectorized engine's once trained (`record`, in a writer process)."""

    def __init__(self, tracker: Tracker, experiment_id: str, parent_run_id: str | None, ledger: Ledger, study: str,
                 keys: list[str], condition: dict | None = None, engine: str = "reference"):
        self.tracker, self.experiment_id, self.parent_run_id, self.ledger = tracker, experiment_id, parent_run_id, ledger
        self.study, self.keys, self.condition, self.engine = study, keys, condition or {}, engine

    def tags(self, number: int) -> dict[str, str]:
        """What a trial run is: role, study, trial number, the engine and, in a sweep with conditions, which."""
        tags = {TAG_ROLE: "trial", TAG_STUDY: self.study, TAG_TRIAL: str(number), TAG_ENGINE: self.engine}
        if self.condition:
            tags[TAG_CONDITION] = condition_label(self.condition)
        return tags

    def begin(self, lease, config: ExperimentConfig, live: bool = True, start_ms: int | None = None) -> TrialRun:
        """The trial's run, linked to the trial at once (so recovery can end it if this worker is lost)."""
        run = self.tracker.begin_run(self.experiment_id, run_name_for(config, lease.number), config,
                                     self.tags(lease.number), self.parent_run_id, live=live, start_ms=start_ms)
        self.ledger.link_run(lease, run.run_id)
        return run

    def finish(self, run: TrialRun, lease, result) -> Outcome:
        history = result.history
        outcome = Outcome.of_history(history)
        run.finish(result, outcome, history.stop_reason,
                   tags={TAG_STATE: outcome.trial_state, TAG_NOTE: self.note(lease.number, result.config, history)})
        self.ledger.finish(lease, outcome, history.best_val_loss, history.best_epoch, history.stop_reason)
        return outcome

    def record(self, lease, result, started_s: float) -> Outcome:
        """A trial trained elsewhere (the vectorized engine): its whole run, backdated to when it started."""
        return self.finish(self.begin(lease, result.config, live=False, start_ms=int(started_s * 1000)), lease, result)

    def fail(self, run: TrialRun | None, lease, reason: str, interrupted: bool = False) -> None:
        """A trial that ended in an error or an interrupt: its run ended (KILLED when interrupted), its trial FAIL."""
        ended = run is None
        if run is not None:
            try:
                run.end(Outcome.KILLED if interrupted else Outcome.FAILED, reason, {TAG_STATE: "FAIL"})
                ended = True
            except Exception:
                pass  # recovery ends it once it sees the FAIL
        self.ledger.fail(lease, reason, interrupted, run_ended=ended)

    def note(self, number: int, config: ExperimentConfig, history) -> str:
        """The trial run's description in the MLflow UI: its setting and how it ended."""
        from .config import value_at

        setting = ", ".join(f"{key} {value_text(value_at(config, key))}" for key in self.keys)
        where = f" ({condition_label(self.condition)})" if self.condition else ""
        outcome = Outcome.of_history(history)
        if outcome == Outcome.COMPLETED:
            result = (f"completed: best validation loss {history.best_val_loss:.4g} at epoch {history.best_epoch} "
                      f"of {history.epochs_run}")
        else:
            result = f"{outcome}: {history.stop_reason}"
        return f"Trial #{number}{where}: {setting}. {result}."


class RunTracker:
    """`sweeplab run` with tracking: one run in the experiment named after the config.

    The run is created when the first epoch has trained, so input the loop rejects up front (labels that do
    not fit the loss, an absent device) leaves nothing half-written in MLflow."""

    def __init__(self, tracking_uri: str, config: ExperimentConfig, source: str):
        self.tracker = Tracker(tracking_uri)
        self.tracker.check_reachable()  # a wrong URI fails in one line, before training
        self.tracking_uri = tracking_uri
        self.tracking_uri_display = display_uri(tracking_uri)
        self.config, self.source = config, source
        self.run: TrialRun | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.run_id if self.run else None

    def epoch_callback(self, record: EpochRecord) -> None:
        if self.run is None:
            tracker = self.tracker
            experiment_id = tracker.experiment_id(self.config.name)
            self.run = tracker.begin_run(experiment_id, run_name_for(self.config), self.config,
                                         {TAG_ROLE: "run", "sweeplab.experiment_file": str(self.source)})
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
