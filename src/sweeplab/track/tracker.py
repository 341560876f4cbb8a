"""MLflow's side of sweeplab: the store (created whole, probed), experiments, parent runs, tags, the UI link.

All calls go through an explicit `MlflowClient` and run ids (never the fluent active-run stack, which is per
thread), so runs nest correctly across threads and processes. How a trained trial becomes its run is recorder.py;
the champion model is champion.py. Imports nothing of Optuna: a tracked `sweeplab run` never loads it.

Why one module of ~570 lines: opening MLflow as sweeplab uses it is one job: the store created whole and
probed, then the client every caller goes through, with the tags, names and links they write.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from sweeplab.config import ConfigError, ExperimentConfig, flat_fields, objective_column, value_at
from sweeplab.outcome import Outcome, RunEnd
from sweeplab.stores import (
    OutageError,
    display_uri,
    lock_path,
    process_gone,
    refused,
    remove_mlflow_strays,
    retry_lost_races,
    retry_waits,
    sqlite_path,
    sqlite_uri,
    store_lock,
    with_retries,
    worker_id,
)
from sweeplab.version import __version__

TAG_ROLE = "sweeplab.role"
TAG_STUDY = "sweeplab.study"
TAG_TRIAL = "sweeplab.trial_number"
TAG_STATE = "sweeplab.trial_state"
TAG_OUTCOME = "sweeplab.outcome"  # completed | pruned | diverged | failed | killed
TAG_REASON = "sweeplab.reason"
TAG_CONDITION = "sweeplab.condition"  # noise=0.3: the condition a trial ran under, in a sweep that has them
TAG_CONFIRMS = "sweeplab.confirms"  # on a confirmation's repeat (role confirm): the run id of the trial it repeats
TAG_STACKED_WIDTH = "sweeplab.stacked_width"  # a stacked MLP's: the hidden width its group padded it to
TAG_STACKED_MEMBERS = "sweeplab.stacked_members"  # a stacked trial's: how many members its group had
TAG_INIT_FROM = "sweeplab.init_from"  # model.init_from: the weights a run started from, as the URI resolved
TAG_REFIT_OF = "sweeplab.refit_of"  # a refit run's (data.folds): the trial whose configuration it refit
TAG_KERNELS = "sweeplab.cpu_kernels"  # the instruction set torch's CPU kernels used (AVX2 under the command)
TAG_ENGINE = "sweeplab.engine"  # reference | vectorized: which engine trained the trial
TAG_WORKER = "sweeplab.worker"  # host:pid of the process that owns the run
TAG_VERSION = "sweeplab.version"
TAG_COMMIT = "sweeplab.git_commit"
TAG_OBJECTIVE = "sweeplab.objective"  # `val_accuracy maximize`: what the run's best epoch and its trial's value follow
TAG_MODEL_CLASS = "sweeplab.model_class"  # the user's nn.Module (module.Class), when the run trained one
TAG_SOURCE_HASH = "sweeplab.model_source_sha256"  # ... and the sha256 of its module's source, logged under code/
# {module: sha256} of every module of the user's that importing the model's module runs (train/sources.py): what
# `predict` and `load_model` check each file against before importing the run's code
TAG_SOURCES = "sweeplab.model_sources"
TAG_CHAMPION_RUN = "sweeplab.source_run_id"  # on a registered model version: the trial run it came from
CHECKPOINT_PATH = "checkpoint"  # artifacts: checkpoint/best.pt, checkpoint/model_spec.json, config.json


def recorded_sources(tags: dict[str, str], class_path: str) -> dict[str, str]:
    """{module: sha256} of the code a run trained with, as its tags in the tracking store hold it: every module of
    the user's that its model's module imports (TAG_SOURCES); for a run logged before that tag existed, its model's
    module alone (TAG_SOURCE_HASH)."""
    try:
        found = json.loads(tags.get(TAG_SOURCES) or "{}")
    except json.JSONDecodeError:
        found = {}
    if isinstance(found, dict) and found and all(isinstance(v, str) for v in found.values()):
        return found
    logged = tags.get(TAG_SOURCE_HASH)
    return {class_path.rpartition(".")[0]: logged} if logged else {}


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
    return (
        f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
        "&workflowType=machine_learning"
    )


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    """One run's page in the MLflow UI, in the model-training view (without workflowType MLflow 3.17 opens run
    pages in its GenAI view)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def share_view(
    client: MlflowClient, experiment_id: str, fields: list[str], conditions: list[str] = (), objective=None
) -> None:
    """Store the view runs_link opens: trial runs only, best first by the objective (best_val_loss unless the
    sweep names another), with columns the objective, best_val_loss, best_epoch, the outcome and the parameters
    `fields` (the sweep's searched and compared fields, dotted); in a sweep with conditions, grouped by them (each
    group headed by its best value), since results compare within a condition."""
    column = objective.column if objective is not None else "best_val_loss"
    ascending = objective.minimize if objective is not None else True
    metrics = list(dict.fromkeys([column, "best_val_loss", "best_epoch"]))
    columns = [
        *(f"metrics.`{name}`" for name in metrics),
        f"tags.`{TAG_OUTCOME}`",
        *(f"params.`{field}`" for field in fields),
    ]
    state = {
        "orderByKey": f"metrics.`{column}`",
        "orderByAsc": ascending,
        "searchFilter": f"tags.`{TAG_ROLE}` = 'trial'",
        "selectedColumns": columns,
    }
    if conditions:
        state["groupBy"] = {
            "aggregateFunction": "min" if ascending else "max",
            "groupByKeys": [{"mode": "param", "groupByData": field} for field in conditions],
        }
    # two sweeps starting at once on one experiment both insert the tag; the loser finds the winner's row next time
    retry_lost_races(
        client.set_experiment_tag, experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(state), attempts=3
    )


# Fields that say nothing of a run whose data comes from elsewhere, or whose model is the user's (or the MLP)
_DATA_FIELDS = {
    "synthetic": ("n_samples", "noise", "n_classes"),
    "csv": ("path", "features", "target"),
    "sklearn": ("name",),
    "python": ("class_path", "init_args"),
}
_MLP_FIELDS = ("hidden", "activation", "dropout")


def flatten(config: ExperimentConfig) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys (`train.lr`), defaults included, what the run used only:
    no field left unset (None), no field of another data source (`data.path` of synthetic data), none of the
    built-in MLP's for a user's model."""
    data = config.data
    unused = {f"data.{name}" for source, names in _DATA_FIELDS.items() if source != data.source for name in names}
    if data.source == "synthetic" and config.task != "multiclass":
        unused.add("data.n_classes")
    if config.model.class_path is not None:
        unused |= {f"model.{name}" for name in _MLP_FIELDS}
    if config.task != "regression" and isinstance(config.train.loss, str):  # the task's own loss: nothing to log
        unused.add("train.loss")
    if config.train.optimizer in ("Adam", "AdamW"):
        unused.add("train.momentum")
    return {
        key: json.dumps(value) if isinstance(value, list) else str(value)
        for key, value in flat_fields(config).items()
        if value is not None and key not in unused and not any(key.startswith(f"{u}.") for u in unused)
    }


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the sweeplab source that is running: the checkout this package was imported from, whatever
    folder the command runs in. None when the package is not a git checkout (an installed wheel), including
    one installed inside somebody else's repository: recording that repository's commit would be wrong."""
    package = Path(__file__).resolve().parents[1]  # src/sweeplab
    try:
        out = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.split()
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
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(database), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if database.exists():  # another process created it while we waited
            return
        for stale in database.parent.glob(f".{database.name}.creating-*"):  # an earlier, interrupted creation
            stale.unlink(missing_ok=True)
        temporary = database.with_name(f".{database.name}.creating-{os.getpid()}")
        try:
            if not _copy_empty_store(temporary):
                uri = sqlite_uri(temporary)
                client = MlflowClient(uri, registry_uri=uri)
                client.search_registered_models(max_results=1)
                remove_mlflow_strays(uri)
                _keep_empty_store(temporary)
            os.replace(temporary, database)
        finally:
            temporary.unlink(missing_ok=True)


def _empty_store_template() -> Path:
    """Where a freshly migrated, empty store of this MLflow version is kept: a new store is a copy of it (~20 ms)
    instead of forty migrations (~2 s). Keyed by MLflow's version, whose migrations decide the schema."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sweeplab"
    return cache / f"empty-mlflow-{mlflow.__version__}.db"


def _copy_empty_store(target: Path) -> bool:
    """A copy of the empty store as MLflow would have made it here: its Default experiment's artifact location is
    where MLflow puts it (./mlruns/0 of the working directory) and its times are now. False without a template."""
    template = _empty_store_template()
    try:
        shutil.copyfile(template, target)
        now = int(time.time() * 1000)
        with contextlib.closing(sqlite3.connect(target)) as connection, connection:
            connection.execute("SELECT version_num FROM alembic_version").fetchone()
            connection.execute(
                "UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                "WHERE experiment_id = 0",
                (str(Path.cwd() / "mlruns" / "0"), now, now),
            )
    except (OSError, sqlite3.Error):  # none kept yet, or a damaged one: migrate (and keep the result instead)
        target.unlink(missing_ok=True)
        return False
    return True


def _keep_empty_store(database: Path) -> None:
    """Keep a just-migrated empty store as the template (best effort: a read-only home just goes without)."""
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
    import sqlalchemy  # database stores only

    connect_args = {"connect_timeout": timeout_s} if uri.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    try:
        waits = retry_waits()
        for wait in (*waits, None):
            try:
                engine.connect().close()
                return
            except sqlalchemy.exc.OperationalError as exc:
                if wait is None or refused(exc):  # a wrong password or database name will not come right by waiting
                    first = (str(exc.orig or exc).strip().splitlines() or ["unreachable"])[0]
                    if refused(exc):  # bad input: exit 2
                        raise ConfigError(
                            f"--tracking-uri {display_uri(uri)}: cannot reach the MLflow tracking store ({first[:300]})"
                        ) from None
                    raise OutageError(  # a store that stays down is an outage, as during a sweep: exit 1
                        f"--tracking-uri {display_uri(uri)}: cannot reach the MLflow tracking store for "
                        f"{sum(waits):.0f} s ({first[:300]})"
                    ) from None
                time.sleep(wait)
    finally:
        engine.dispose()


def import_store_modules(tracking_uri: str) -> None:
    """Import what opening a database tracking store imports (SQLAlchemy, Alembic, MLflow's SQL stores: ~0.6 s
    here), without opening it: `sweeplab sweep` does this before it forks its helpers and background process, so
    they do not pay it again."""
    if tracking_uri.startswith(("http:", "https:", "databricks")):
        return
    # the SQL store's modules (~0.6 s): only for a store that has them, and once, here, before any fork
    import alembic.command
    import alembic.config
    import alembic.migration
    from mlflow.store.db import utils
    from mlflow.store.model_registry import sqlalchemy_store as registry_store
    from mlflow.store.tracking import sqlalchemy_store

    del alembic, utils, registry_store, sqlalchemy_store


SCHEMA_RACE_ATTEMPTS = 10


def _open_database_client(uri: str) -> MlflowClient:
    """A client on a database store whose tables are made now. Workers started together on a fresh database all
    run MLflow's migrations at once, and the losers fail on a duplicate type or key (`pg_type_typname_nsp_index`).
    On PostgreSQL they take turns under an advisory lock (the first migrates, the rest find the tables made);
    elsewhere a loser opens the store again once the tables exist."""

    def open_client() -> MlflowClient:
        client = MlflowClient(uri, registry_uri=uri)  # builds the tracking store: migrates a fresh database
        client.search_registered_models(max_results=1)  # and the registry's
        return client

    with store_lock(uri, "mlflow tables"):
        return retry_lost_races(open_client, attempts=SCHEMA_RACE_ATTEMPTS, pause_s=(0.5, 1.5))


class Tracker:
    """A tracking store: creates experiments and runs, and logs what a trial leaves behind."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.display_uri = display_uri(tracking_uri)
        self.client = self._open_client(tracking_uri)
        self._tags = common_tags()
        self._artifact_uris: dict[str, str] = {}  # run id -> its artifact URI, for the runs started here

    def check_reachable(self) -> None:
        """One read, so an unreachable or wrong tracking URI fails in one line before anything is written."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"--tracking-uri {display_uri(self.tracking_uri)}: cannot reach the MLflow tracking "
                f"store ({first[:300]})"
            ) from None

    @staticmethod
    def _open_client(tracking_uri: str) -> MlflowClient:
        """A client on the store. A local SQLite store that does not exist yet is created whole first
        (`create_sqlite_store`); one that exists is only read, so a read-only store serves predict and report."""
        if not tracking_uri.startswith("sqlite:///"):
            if "://" in tracking_uri and not tracking_uri.startswith(
                ("sqlite:", "http:", "https:", "file:", "databricks")
            ):
                # a database store: MLflow's engine set-up retries for ~106 s, a warning per attempt
                probe_database(tracking_uri)
                return _open_database_client(tracking_uri)
            return MlflowClient(tracking_uri, registry_uri=tracking_uri)

        database = sqlite_path(tracking_uri)
        if not database.exists():
            create_sqlite_store(database)
        try:
            client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
            client.search_registered_models(max_results=1)  # opens (and checks) the store now, not mid-sweep
            remove_mlflow_strays(tracking_uri)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"--tracking-uri {display_uri(tracking_uri)}: not a usable MLflow database ({first[:300]})"
            ) from None
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
            root = sqlite_path(self.tracking_uri).parent / "mlartifacts" / name
            return root.as_uri()
        return None

    def start_run(
        self,
        experiment_id: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        start_ms: int | None = None,
    ) -> str:
        all_tags = {**self._tags, TAG_WORKER: worker_id(), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        info = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags, start_time=start_ms).info
        self._artifact_uris[info.run_id] = info.artifact_uri
        while len(self._artifact_uris) > 256:  # a long sweep's older runs are written and done with
            del self._artifact_uris[next(iter(self._artifact_uris))]
        return info.run_id

    def log_artifacts(self, run_id: str, folder: Path, path: str) -> None:
        """Log a folder's files under `path` of the run's artifacts. For a run this tracker started, straight to
        its artifact repository: MlflowClient.log_artifacts reads the whole run back first to learn where its
        artifacts go (5-7 ms a run on SQLite, a request to a tracking server), which create_run already said."""
        uri = self._artifact_uris.get(run_id)
        if uri is None or self.tracking_uri.startswith("databricks"):  # (MLflow adds a Databricks profile there)
            self.client.log_artifacts(run_id, str(folder), path)
            return
        get_artifact_repository(uri, tracking_uri=self.tracking_uri).log_artifacts(str(folder), path)

    def end_if_running(self, run_id: str, reason: str) -> None:
        """End a run that a lost worker left RUNNING as KILLED, and the worker's own parent run with it (a
        `sweeplab worker` that stopped heartbeating is gone); leave any other run as it is."""
        run = with_retries(self.client.get_run, run_id, what="the MLflow tracking store")
        if run.info.status == "RUNNING":
            self.end_run(run_id, Outcome.KILLED, reason)
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id:
            parent = with_retries(self.client.get_run, parent_id, what="the MLflow tracking store")
            if parent.info.status == "RUNNING" and parent.data.tags.get(TAG_ROLE) == "worker":
                self.end_run(parent_id, Outcome.KILLED, f"worker lost ({reason})")

    def run_end(self, run_id: str):
        """How a trial's run says its trial ended (outcome.RunEnd), or None while it has not ended, or when it
        ended without a result (failed, killed)."""
        run = with_retries(self.client.get_run, run_id, what="the MLflow tracking store")
        tags, metrics = run.data.tags, run.data.metrics
        if run.info.status == "RUNNING" or tags.get(TAG_STATE) not in ("COMPLETE", "PRUNED"):
            return None
        outcome = Outcome(tags.get(TAG_OUTCOME, "completed"))
        column = f"best_{tags.get(TAG_OBJECTIVE, 'val_loss').split()[0]}"
        return RunEnd(
            outcome, metrics.get(column, float("nan")), int(metrics.get("best_epoch", 0)), tags.get(TAG_REASON)
        )

    def reap_dead_local_runs(self, experiment_id: str) -> int:
        """End as KILLED the RUNNING runs whose process on this machine no longer exists (a SIGKILLed sweep's
        parent and trial runs, say). Returns how many."""
        reaped = 0
        for run in self.client.search_runs(
            [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
        ):
            worker = run.data.tags.get(TAG_WORKER)
            if worker and process_gone(worker):
                self.end_run(run.info.run_id, Outcome.KILLED, f"process {worker} ended without closing the run")
                reaped += 1
        return reaped

    def log_report(self, parent_run_id: str, folder: Path, note: str) -> None:
        """A report's files under the parent run's `report/`, and its answer as the run's description."""
        self.log_artifacts(parent_run_id, folder, "report")
        self.set_note(parent_run_id, note)

    def end_run(self, run_id: str, outcome: Outcome, reason: str | None = None) -> None:
        self.client.log_batch(run_id, tags=outcome_tags(outcome, reason))
        self.client.set_terminated(run_id, Outcome(outcome).run_status)

    # --- reading back (sweeplab predict, sweeplab ui) ------------------------------------------------------------

    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment (study) called `name`, or None: a read, never a create."""
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else None

    def best_trial_run(self, experiment_id: str):
        """The study's best completed trial run by its objective (as its trials' `sweeplab.objective` tag says:
        best_val_loss, lowest first, unless the sweep named another), or None before any trial completed."""
        done = f"tags.`{TAG_OUTCOME}` = 'completed'"
        latest = self.client.search_runs(
            [experiment_id], filter_string=done, max_results=1, order_by=["attributes.start_time DESC"]
        )
        parts = (latest[0].data.tags.get(TAG_OBJECTIVE, "") if latest else "").split()
        metric, direction = parts if len(parts) == 2 else ("val_loss", "minimize")
        column = objective_column(metric)
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"{done} and metrics.{column} < 1e308",
            order_by=[f"metrics.{column} {'ASC' if direction == 'minimize' else 'DESC'}"],
            max_results=1,
        )
        return runs[0] if runs else None

    def model_version(self, uri: str):
        """The registered model version of `models:/NAME@ALIAS` or `models:/NAME/VERSION`; LookupError if none."""
        rest = uri[len("models:/") :]
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                return self.client.get_model_version_by_alias(name, alias)
            name, number = rest.rsplit("/", 1)
            return self.client.get_model_version(name, number)
        except Exception:
            raise LookupError(f"{uri}: no such registered model version") from None

    def registered_run_id(self, uri: str) -> str:
        """The trial run a model version sweeplab registered (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) came
        from; a LookupError in one line when there is no such version, or sweeplab did not register it."""
        version = self.model_version(uri)
        run_id = version.tags.get(TAG_CHAMPION_RUN)
        if not run_id:
            raise LookupError(
                f"{uri}: not registered by sweeplab (no {TAG_CHAMPION_RUN} tag); "
                "load it with mlflow.pyfunc.load_model instead"
            )
        return run_id

    def download_checkpoint(self, run_id: str, dest: Path, name: str = "best.pt") -> Path:
        """A file of the run's checkpoint/ artifacts (its best state by default), downloaded into `dest`."""
        return Path(self.client.download_artifacts(run_id, f"{CHECKPOINT_PATH}/{name}", str(dest)))

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])

    def set_note(self, run_id: str, text: str) -> None:
        """The run's description in the UI (Markdown)."""
        self.client.set_tag(run_id, TAG_NOTE, text)

    def describe_experiment(
        self, experiment_id: str, text: str, fields: list[str], conditions: list[str] = (), objective=None
    ) -> None:
        """The experiment's description, and the view the printed UI link opens (`share_view`)."""
        retry_lost_races(self.client.set_experiment_tag, experiment_id, TAG_NOTE, text, attempts=3)
        share_view(self.client, experiment_id, fields, conditions, objective)


def outcome_tags(outcome: str, reason: str | None = None, extra: dict[str, str] | None = None) -> list[RunTag]:
    """How a run ended, as tags: sweeplab.outcome, sweeplab.reason (when there is one), and any extra."""
    tags = [RunTag(TAG_OUTCOME, str(outcome))] + [RunTag(k, v) for k, v in (extra or {}).items()]
    if reason:
        tags.append(RunTag(TAG_REASON, reason[:5000]))
    return tags


LAB_KEYS = ("optimizer", "hidden", "lr", "noise")  # what names a `sweeplab run` of the lab
SHORT_KEYS = {"hidden": "h", "noise": "n"}  # the UI's run column shows ~20 characters


def run_name_for(config: ExperimentConfig, trial_number: int | None = None, keys=LAB_KEYS) -> str:
    """What the trial is, at a glance, from the keys a sweep varies (its space, then its conditions), most
    telling first: `adam-h16-lr0.03-n0.3 #12`. Text values stand alone, numbers follow their key; a key that does
    not apply (no `hidden` for a user's model, no `noise` but for the synthetic data) is left out, and a `sweeplab
    run` of a user's model is named by its class first: `tinycnn-adam-lr0.003`."""
    parts = []
    if keys == LAB_KEYS:
        if config.model.class_path:
            parts.append(config.model.class_path.rpartition(".")[2].lower())
        if config.data.source != "synthetic":
            keys = tuple(key for key in keys if key != "noise")
    for key in keys:
        value = value_at(config, key)
        if value is None:
            continue
        if isinstance(value, str):
            parts.append(value.lower())
            continue
        if isinstance(value, list):
            text = "x".join(str(v) for v in value)
        elif isinstance(value, float):
            text = f"{value:.2g}"
        else:
            text = str(value)
        parts.append(f"{SHORT_KEYS.get(key, key.rsplit('.', 1)[-1])}{text}")
    name = "-".join(parts)
    return f"{name} #{trial_number}" if trial_number is not None else name
