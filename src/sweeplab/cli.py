"""`sweeplab run | sweep | worker | server | report | predict | ui`: parse, call, print.

Nothing else lives here: what is printed is console.py; the checks made before any store exists are
train.experiment.check_config; a sweep's checks and its engine are sweep.probes.settle; the sweep itself sweep.driver.

Heavy libraries are imported inside the command that needs them: `sweeplab run --no-track` never imports
MLflow or Optuna, so it starts as fast as torch allows. Why ~800 lines: nine commands' arguments, help texts and
one-line errors, and the console script's exit; each command's work is elsewhere.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from sweeplab.config import ConfigError, load_experiment, parse_overrides, read_yaml
from sweeplab.console import SeedPrinter, prediction_texts, print_sweep_summary, run_summary, test_text
from sweeplab.process import configure, same_kernels_everywhere, use_threads
from sweeplab.stop import stop_flag
from sweeplab.stores import (
    SettingError,
    display_uri,
    has_secret,
    redact,
    redact_text,
    remove_mlflow_strays,
    resolve_storage_url,
    resolve_tracking_uri,
    sqlite_path,
)
from sweeplab.sweep.background import BackgroundError, Forked
from sweeplab.sweep.spec import load_sweep
from sweeplab.version import __version__


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit code 2."""


def _run(args: argparse.Namespace) -> int:
    # The config is checked before torch is even imported: a typo costs milliseconds, not seconds.
    config = load_experiment(args.experiment, parse_overrides(args.overrides))
    from sweeplab.api import train_run, weights_from  # what sweeplab.run calls too
    from sweeplab.train.experiment import check_config

    weights_from(args.tracking_uri)  # model.init_from's runs:/ and models:/
    check_config(config, args.experiment)  # before anything is printed or written
    configure(with_optuna=False)
    printer = None if args.json else SeedPrinter(config.name, config.print_every)
    if printer:
        printer.header()
    callbacks = [printer] if printer else []
    result, tracker = train_run(config, args.experiment, args.tracking_uri, args.track, callbacks, checked=True)
    history = result.history
    if args.json:
        print(json.dumps(run_summary(result, tracker)))
        return 0
    if history.status == "failed":  # trained, with no epoch whose objective was finite: no result to show
        print(f"failed: {history.stop_reason}")
        if tracker and tracker.run_id:
            print(f"mlflow run: {tracker.run_id} ({tracker.tracking_uri_display})")
        return 1
    if history.status != "completed":
        print(f"stopped: {history.stop_reason}")
    elif history.stop_reason:  # early stopping: a completed run that ended before its last epoch
        print(history.stop_reason)
    if config.objective.metric == "val_loss":
        print("best_val:", round(history.best_val_loss, 4))  # the seed's line
    else:  # the objective judged the best epoch: its value first, the loss there beside it
        metric = config.objective.metric
        print(f"best_{metric}: {round(history.best_value, 4)} (val_loss {round(history.best_val_loss, 4)})")
    if config.predict_x:
        print("predictions:")
        for row, line in zip(config.predict_x, prediction_texts(result)):
            print(f"x={row} -> {line}")
    print(f"best_epoch: {history.best_epoch}")
    if getattr(result, "test", None):  # data.test_size: what the best state (or the refit) scores on the test split
        print(f"test: {test_text(result.test, config.objective.metric)}")
    if tracker:
        print(f"mlflow run: {tracker.run_id} ({tracker.tracking_uri_display})")
    if getattr(result, "refit", None) is not None:  # data.folds: the scores above are the folds' mean
        refit, metric = result.refit, config.objective.metric
        run = f" (mlflow run {result.refit_run_id})" if result.refit_run_id else ""
        print(
            f"refit: {config.data.folds} folds' mean above; the model and its predictions are the refit on the whole "
            f"training split for {refit.epochs_run} epochs: {metric} {round(refit.best_value, 4)} on the "
            f"validation split{run}"
        )
    return 0


def _rerun(args: argparse.Namespace) -> int:
    """`sweeplab rerun RUN_ID`: the run's configuration trained again (api.rerun), and how its curves compare."""
    from sweeplab.api import rerun

    configure(with_optuna=False)
    result, tracker, line, _ = rerun(args.run_id, args.tracking_uri, args.track)
    history = result.history
    metric = result.config.objective.metric
    value = history.best_val_loss if metric == "val_loss" else history.best_value
    print(f"best_{'val' if metric == 'val_loss' else metric}: {round(value, 4)}")
    print(f"best_epoch: {history.best_epoch}")
    print(line)
    if tracker:
        print(f"mlflow run: {tracker.run_id} ({tracker.tracking_uri_display})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    background = None
    if args.report:  # forked first: it imports what a report needs while this process imports torch and the rest
        background = Forked(lambda: _warm_report(args.tracking_uri))
    from sweeplab.api import start_sweep  # what sweeplab.sweep calls too

    def trials_done(study: str, tracking_uri: str) -> None:  # the report, built while the champions register
        if background is not None:
            background.submit(_report_in_background, study, tracking_uri, f"reports/{study}")

    try:
        configure()
        plan, outcome, tracking_uri, storage_url = start_sweep(
            args.sweep, overrides, args.tracking_uri, args.storage, args.quiet, trials_done
        )
        sweep = plan.sweep
        out = f"reports/{sweep.spec.study}"
    except BaseException:
        if background is not None:
            background.close()
        raise
    print_sweep_summary(outcome, sweep, tracking_uri, storage_url)
    if background is not None:
        try:
            report = background.result()
            if report["parent_run_id"]:
                from sweeplab.track.tracker import Tracker

                Tracker(tracking_uri).log_report(report["parent_run_id"], Path(out), report["note"])
        except Exception as exc:  # the sweep itself succeeded; say why there is no report and carry on
            why = str(exc) if isinstance(exc, BackgroundError) else f"{type(exc).__name__}: {exc}"
            print(f"report: not written ({redact_text(why)})", file=sys.stderr)
        else:
            print()
            print(report["tables"])
            print(f"report:   {out}/report.html")
    return 0


def _report_in_background(study: str, tracking_uri: str, out: str) -> dict:
    """The sweep's report, in the background process: imported there, so this process, which registers the
    champions meanwhile, never pays for matplotlib and the report's other imports (~0.9 s of make sweep)."""
    from sweeplab.report import report_for_sweep

    return report_for_sweep(study, tracking_uri, out)


def _warm_report(tracking_uri: str | None) -> None:
    """In the sweep's background process, while the trials train: the process settings, a report's imports and
    its first-use costs."""
    configure(install_stop=False)
    from sweeplab.report import warm_up
    from sweeplab.track.tracker import import_store_modules

    import_store_modules(resolve_tracking_uri(tracking_uri))
    warm_up()


def _worker(args: argparse.Namespace) -> int:
    from sweeplab.sweep.probes import settle

    if args.worker_index < 0:
        raise UsageError(f"--worker-index {args.worker_index}: must be 0 or more")
    from sweeplab.api import weights_from

    weights_from(args.tracking_uri)
    plan = settle(load_sweep(args.sweep, parse_overrides(args.overrides)))
    from sweeplab.sweep.driver import run_worker

    configure()
    use_threads(1)  # workers usually share a machine with others
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    storage_url = resolve_storage_url(args.storage, tracking_uri)
    ran = run_worker(plan, tracking_uri, storage_url, args.parent_run_id or None, args.worker_index)
    if not args.quiet:
        print(f"worker done: {ran} trials run")
    return 0


def _study_name(reference: str) -> str:
    """A sweep file gives its study's name; anything else is a study name already."""
    if reference.endswith((".yaml", ".yml")):
        study = read_yaml(reference).get("study")
        if not study:
            raise UsageError(f"{reference}: study: missing (the sweep file names its study)")
        return str(study)
    return reference


def existing_store(cli_value: str | None) -> str:
    """The tracking URI of a command that only reads (report, predict, ui): a local SQLite store must exist
    already, or those commands would leave a new, empty mlflow.db (and its folders) behind."""
    uri = resolve_tracking_uri(cli_value)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():
        raise UsageError(
            f"--tracking-uri {display_uri(uri)}: no MLflow store there (a sweep or a tracked run "
            "makes one; give --tracking-uri or $MLFLOW_TRACKING_URI to read another)"
        )
    return uri


def _report(args: argparse.Namespace) -> int:
    study = _study_name(args.study)
    from sweeplab.report import ReportError, build_report, terminal_tables

    configure(with_optuna=False, install_stop=False)  # Optuna is imported only for the fANOVA table, if it has one

    out = Path(args.out or f"reports/{study}")
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--out {out}: {blocking} is a file; the report is a folder (report.html, CSV and PNG files)")
    tracking_uri = existing_store(args.tracking_uri)
    try:
        report = build_report(study, tracking_uri, out, ui_url=args.ui_url)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(report.to_json(), default=str))
        return 0
    print(terminal_tables(report))
    print(
        f"\nreport: {out / 'report.html'} (CSV, PNG and summary.md beside it"
        + (", also logged to the sweep's MLflow run)" if report.data.parent_run_id else ")")
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from sweeplab.track.serve import (
        ModelNotFound,
        example_inputs,
        example_rows,
        load_logged_model,
        parse_rows,
        predict_named,
        predict_rows,
        read_csv_rows,
        read_json_rows,
        read_named_inputs,
    )

    configure(with_optuna=False, install_stop=False)
    from sweeplab.train.experiment import resolve_device

    try:
        resolve_device(args.device)
    except (ConfigError, RuntimeError):  # RuntimeError: a name torch does not know
        raise UsageError(
            f"--device {args.device}: not a device here (cpu, cuda, cuda:N or mps where present)"
        ) from None
    sources = [name for name, given in (("--x", args.x), ("INPUT", args.input)) if given]
    if len(sources) > 1:
        raise UsageError("give the input once: --x rows, a CSV file, or - for JSON on stdin")
    try:
        store = existing_store(args.tracking_uri)
        model, spec, found = load_logged_model(args.model, store, args.device)
        extra: list[str] = []
        if spec.named_inputs:  # several inputs, by name, as JSON
            if args.x:
                raise UsageError(
                    f"--x: the model takes {', '.join(spec.named_inputs)} by name; give a JSON file or - for JSON on "
                    'stdin: {"' + '": [...], "'.join(spec.named_inputs) + '": [...]}'
                )
            if args.input:
                where = "stdin" if args.input == "-" else args.input
                try:
                    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text()
                except OSError as exc:
                    raise ValueError(f"{args.input}: cannot be read ({exc.strerror})") from None
                tensors = read_named_inputs(text, spec, where)
            else:
                tensors, source = example_inputs(args.model, store, spec)
                print(f"note: no input given: predicting {source}", file=sys.stderr)
            results = predict_named(model, spec, tensors)
        elif args.x:
            rows = parse_rows(args.x)
        elif args.input == "-":
            rows = read_json_rows(sys.stdin.read(), spec)
        elif args.input:
            rows, extra = read_csv_rows(args.input, spec)
        elif spec.in_features == 2:
            rows = [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]]  # the seed's three test points
        else:  # no input: the run's own example inputs, and say so
            rows, source = example_rows(args.model, store, spec)
            print(
                f"note: no input given: predicting {source}; give --x V1,V2,... ({spec.in_features} values a row), "
                "a CSV file or - for JSON rows",
                file=sys.stderr,
            )
        if not spec.named_inputs:
            results = predict_rows(model, spec, rows)
    except (ModelNotFound, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if extra:
        print(
            f"note: ignoring column(s) {', '.join(extra)} (the model takes {', '.join(spec.feature_names)})",
            file=sys.stderr,
        )
    if args.json:
        print(
            json.dumps(
                {"model": found, "task": spec.task, "features": list(spec.feature_names), "predictions": results}
            )
        )
        return 0
    print(f"model: {found}", file=sys.stderr)
    for i, item in enumerate(results):
        shown = (
            f"x={item['x']}" if isinstance(item["x"], list) and len(item["x"]) <= 8 else f"row {i}"
        )  # an image's 64 values say nothing
        print(f"{shown} -> {item['text']}")
    return 0


def _ui(args: argparse.Namespace) -> int:
    """The MLflow UI over the store, one server worker unless asked (four take 16-40 s to start on two cores).
    The URL is printed once the server answers; with a study, the link opens its runs best first."""
    from sweeplab.track.tracker import runs_link
    from sweeplab.track.ui_server import answers, start_ui_server, stop_ui_server

    configure(with_optuna=False)  # Ctrl-C or SIGTERM: the server goes with us
    uri = existing_store(args.tracking_uri)
    experiment_id = None
    if args.study:
        experiment_id = _experiment_id_of(_study_name(args.study), uri)
    elif not uri.startswith("sqlite:///"):
        from sweeplab.track.tracker import Tracker

        Tracker(uri).check_reachable()  # one line now, not a server retrying in the background
    if not _port_free(args.host, args.port):  # else a server already there (another store's UI) would answer for us
        raise UsageError(
            f"--port {args.port}: already in use on {args.host} (another MLflow UI?); try --port {args.port + 1}"
        )
    _warn_if_public(args.host)
    print(f"starting the MLflow UI over {display_uri(uri)} ...", file=sys.stderr, flush=True)

    signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))  # a closed terminal stops it as SIGTERM does
    process = start_ui_server(uri, args.host, args.port, args.workers, log=sys.stderr)  # stdout: our URL line only
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    try:
        while not answers(f"{base}/health"):
            if process.poll() is not None:
                print(
                    f"sweeplab: error: the MLflow UI did not start (exit code {process.returncode}; is port "
                    f"{args.port} taken? try --port)",
                    file=sys.stderr,
                )
                return 1
            stop_flag.wait(0.25)
        link = runs_link(base, experiment_id) if experiment_id else base
        print(f"MLflow UI: {link}  (Ctrl-C stops it)", flush=True)
        # MLflow 3.17's UI takes its view from the page's `workflowType` parameter (the link has it), else from the
        # browser's localStorage (`mlflow.workflowType_v1`), else GenAI: no server or experiment setting exists
        print(
            "note: runs opened by clicking inside the UI show in its GenAI view until this browser has chosen once: "
            'click "Model training" at the top of the sidebar (the UI remembers it per browser)',
            file=sys.stderr,
            flush=True,
        )
        while process.poll() is None:
            stop_flag.wait(0.5)
        return process.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        stop_ui_server(process)  # the server's whole process group: its workers and consumers too
        remove_mlflow_strays(uri)


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as uvicorn binds: SO_REUSEADDR, so a closed connection's
    TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _experiment_id_of(study: str, tracking_uri: str) -> str:
    from sweeplab.track.tracker import Tracker

    tracker = Tracker(tracking_uri)
    tracker.check_reachable()
    experiment_id = tracker.find_experiment(study)
    if experiment_id is None:
        raise UsageError(f"{study}: no such study (MLflow experiment) in {tracker.display_uri}")
    return experiment_id


def _warn_if_public(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}: anyone who can reach this port can read and write runs", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    """`mlflow models serve` of a registered champion, in this environment (`--env-manager local`), with this
    interpreter's scripts first on PATH: run bare, MLflow execs `uvicorn` from PATH and fails (exit 127) unless the
    virtual environment is activated."""
    if not args.model.startswith("models:/"):
        raise UsageError(f"{args.model}: serve takes a registered model, models:/NAME@ALIAS or models:/NAME/VERSION")
    configure(with_optuna=False, install_stop=False)
    store = existing_store(args.tracking_uri)
    from sweeplab.track.serve import ModelNotFound, resolve_run_id

    try:
        run_id, _ = resolve_run_id(args.model, store)
        example = _request_example(run_id, store)
    except ModelNotFound as exc:
        raise UsageError(str(exc)) from None
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model, "--env-manager", "local"]
    command += ["-h", args.host, "-p", str(args.port)]
    url = f"http://{args.host}:{args.port}/invocations"
    print(
        f"serving {args.model} on {url} (Ctrl-C stops it); e.g.\n"
        f"  curl -s {url} -H 'Content-Type: application/json' -d '{example}'",
        flush=True,
    )
    _warn_if_public(args.host)
    os.execve(sys.executable, command, env)
    return 0


def _request_example(run_id: str, store: str) -> str:
    """A request body for the champion of `run_id`: one row of zeros of its width, or its inputs by name."""
    import tempfile

    from sweeplab.track.tracker import Tracker
    from sweeplab.train.model import read_checkpoint

    with tempfile.TemporaryDirectory(prefix="sweeplab-") as tmp:
        try:
            _, spec = read_checkpoint(Tracker(store).download_checkpoint(run_id, Path(tmp)))
        except Exception:
            return '{"inputs": [[...]]}'
    if spec.named_inputs:
        return json.dumps({"inputs": {name: "[...]" for name in spec.named_inputs}}).replace('"[...]"', "[...]")
    return json.dumps({"inputs": [[0.0] * spec.in_features]})


def _server(args: argparse.Namespace) -> int:
    """An MLflow tracking server for many workers: a database backend store and served artifacts."""
    backend = args.backend_store_uri or os.environ.get("SWEEPLAB_BACKEND_STORE_URI") or "sqlite:///mlflow-server.db"
    artifacts = os.path.abspath(args.artifacts_destination)

    if has_secret(backend):
        raise UsageError(
            "--backend-store-uri: leave the password out of the URI; PostgreSQL reads it from $PGPASSWORD or ~/.pgpass"
        )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    print(
        f"MLflow tracking server on http://{args.host}:{args.port}: runs in {redact(backend)}, artifacts in "
        f"{artifacts} (Ctrl-C stops it)",
        flush=True,
    )
    _warn_if_public(args.host)
    # No GenAI job runner (as for `sweeplab ui`) unless the environment asks for one: its huey consumers serve
    # evaluations a sweep never runs, and MLflow leaves the store it makes for them in /dev/shm when stopped.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeplab", description="Optuna sweeps over a PyTorch loop, tracked in MLflow."
    )
    parser.add_argument("--version", action="version", version=f"sweeplab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train one experiment (experiments/*.yaml)")
    run.add_argument("experiment", help="experiment YAML file")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override fields: optimizer=SGD lr=0.05 hidden=32 noise=1.0 epochs=20 ... or data.val_size=0.2",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object with the curves and results")
    run.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log the run to MLflow like a sweep trial (default: on; --no-track skips MLflow entirely)",
    )
    run.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    run.set_defaults(func=_run)

    again = sub.add_parser("rerun", help="train a logged run's configuration again (its seed, its engine) and compare")
    again.add_argument("run_id", help="the MLflow run id of a trial, a repeat or a run")
    again.add_argument(
        "--track",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log the rerun to MLflow beside the original, tagged sweeplab.rerun_of (default: on)",
    )
    again.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    again.set_defaults(func=_rerun)

    def store_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
        )
        p.add_argument(
            "--storage",
            default=None,
            help="Optuna storage: a journal file path, or an RDB URL such as postgresql+psycopg://USER@HOST/DB "
            "(default: $SWEEPLAB_STORAGE, else optuna.journal beside the MLflow database)",
        )
        p.add_argument("--quiet", action="store_true", help="no progress output")

    sweep = sub.add_parser("sweep", help="run a sweep (sweeps/*.yaml); re-running resumes it")
    sweep.add_argument("sweep", help="sweep YAML file")
    sweep.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="n_trials=N workers=N study=NAME sampler=random pruner=none, or any experiment key (epochs=20)",
    )
    store_options(sweep)
    sweep.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the report (reports/STUDY/) at the end (default: on)",
    )
    sweep.set_defaults(func=_sweep)

    report = sub.add_parser("report", help="tables and pictures comparing how a sweep's trials converged")
    report.add_argument("study", metavar="SWEEP_OR_STUDY", help="a sweep file or a study name")
    report.add_argument("--tracking-uri", default=None)
    report.add_argument("--out", default=None, help="output folder (default: reports/STUDY/)")
    report.add_argument(
        "--ui-url",
        default=None,
        help="the MLflow UI the report's run links open (default: "
        "$SWEEPLAB_UI_URL, else http://127.0.0.1:5000, where "
        "`sweeplab ui` listens by default)",
    )
    report.add_argument(
        "--json",
        action="store_true",
        help="print the answer as JSON: per condition, the best run (id, params, best_val_loss), "
        "the settings close to it, factor importances and trial counts",
    )
    report.set_defaults(func=_report)

    worker = sub.add_parser("worker", help="join a sweep's study as one more worker (any machine)")
    worker.add_argument("sweep", help="sweep YAML file")
    worker.add_argument("overrides", nargs="*", metavar="key=value")
    store_options(worker)
    worker.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)
    worker.add_argument("--worker-index", type=int, default=0, help="offsets the sampler seed (default 0)")
    worker.set_defaults(func=_worker)

    predict = sub.add_parser("predict", help="predict with a logged model (run id, study name, models:/ URI)")
    predict.add_argument(
        "model",
        help="an MLflow run id, a sweep/study name (its best trial), a sweep file, "
        "or models:/NAME@ALIAS, models:/NAME/VERSION",
    )
    predict.add_argument(
        "input",
        nargs="?",
        help="a CSV file of feature columns, or - for JSON rows on stdin (default: the seed's three test points); "
        'a model of several inputs takes a JSON file (or -) of {"name": [...]} per input',
    )
    predict.add_argument("--x", action="append", metavar="V1,V2", help="one input row; repeat for more")
    predict.add_argument("--tracking-uri", default=None)
    predict.add_argument("--device", default="cpu", help="where to load the weights (default cpu)")
    predict.add_argument("--json", action="store_true", help="one JSON object with every prediction")
    predict.set_defaults(func=_predict)

    serve = sub.add_parser("serve", help="serve a champion over HTTP: `mlflow models serve`, set up to work as is")
    serve.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION (what a sweep prints)")
    serve.add_argument("--tracking-uri", default=None)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5001)
    serve.set_defaults(func=_serve)

    server = sub.add_parser("server", help="an MLflow tracking server for workers on many machines")
    server.add_argument(
        "--backend-store-uri",
        default=None,
        help="runs database: postgresql+psycopg://USER@HOST/DB (password from $PGPASSWORD or "
        "~/.pgpass) or sqlite:///FILE (default: $SWEEPLAB_BACKEND_STORE_URI, else "
        "sqlite:///mlflow-server.db)",
    )
    server.add_argument("--artifacts-destination", default="mlartifacts", help="where served artifacts are kept")
    server.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for a cluster)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=4, help="server worker processes")
    server.set_defaults(func=_server)

    ui = sub.add_parser("ui", help="serve the MLflow UI over the tracking store")
    ui.add_argument(
        "study",
        nargs="?",
        metavar="SWEEP_OR_STUDY",
        help="print the link to this study's runs, best first (a sweep file or a study name)",
    )
    ui.add_argument("--tracking-uri", default=None)
    ui.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for name in ("stdout", "stderr"):  # started with the descriptor closed (`2>&-`): what it would say goes nowhere
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (open for the life of the process)
    parser = build_parser()
    args, extra = parser.parse_known_args(_values_of_x(sys.argv[1:] if argv is None else list(argv)))
    if (
        getattr(args, "command", None) == "predict"
        and args.input is None
        and len(extra) == 1
        and (extra[0] == "-" or not extra[0].startswith("-"))
        and "=" not in extra[0]
    ):
        args.input, extra = extra[0], []  # the printed predict line with an input file appended after its options
    # `run EXP --json epochs=20`: key=value pairs may come after options too
    strays = [item for item in extra if "=" not in item or item.startswith("-")]
    if strays or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    if args.command in ("sweep", "worker"):  # a reader that leaves (`| head`, a closed terminal) stops no sweep
        sys.stdout, sys.stderr = _Unbreakable.wrap(sys.stdout), _Unbreakable.wrap(sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, UsageError, SettingError) as exc:
        print(f"sweeplab: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = (
            " (the trial in flight is recorded as failed; run the same command again to resume)"
            if args.command in ("sweep", "worker")
            else ""
        )
        print(f"sweeplab: interrupted{again}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sweeplab run ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        # Every failure ends in one line (SWEEPLAB_DEBUG=1 shows the traceback). ShapeError (labels that do not
        # fit the loss) and BatchError (items read mid-run that make no batch) are bad input, exit 2; SweepError and OutageError say why the sweep cannot go on; any other
        # error (a damaged or read-only store, a full disk) is named by its type, exit 1.
        if os.environ.get("SWEEPLAB_DEBUG"):
            raise
        kind = type(exc).__name__
        named = kind in ("ShapeError", "BatchError", "SweepError", "OutageError", "ReportWriteError")
        print(f"sweeplab: error: {one_line(exc, with_type=not named)}", file=sys.stderr)
        return 2 if kind in ("ShapeError", "BatchError") else 1


def _values_of_x(argv: list[str]) -> list[str]:
    """`--x -1,0.5` as `--x=-1,0.5`: argparse takes a value that starts with `-` (and is not a plain negative
    number) for an option and stops, though a row of numbers can start with a minus."""
    out: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "--x":
            value = next(items, None)
            if value is not None and value.startswith("-") and value[1:2] not in ("-", ""):
                out.append(f"--x={value}")
                continue
            out += [item] if value is None else [item, value]
            continue
        out.append(item)
    return out


class _Unbreakable:
    """A text stream that stops writing, silently, once its reader is gone (a broken pipe, a closed or lost
    terminal), instead of raising into the sweep: the work goes on, its runs, champions and report are written,
    and what would have been printed is dropped (the file descriptor then points at /dev/null, so child processes
    writing to it are fine too)."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    @classmethod
    def wrap(cls, stream):
        return stream if stream is None or isinstance(stream, cls) else cls(stream)

    def _lost(self) -> None:
        self.broken = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # BrokenPipeError, EIO from a hung-up terminal, a closed file
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._lost()

    def isatty(self) -> bool:
        return not self.broken and self._stream.isatty()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


MAX_MESSAGE = 500  # characters of an error message we print: a 57 MB line helps nobody


def one_line(exc: BaseException, with_type: bool = False) -> str:
    """An error as one printable line: its first line, cut to MAX_MESSAGE, every URL and password redacted (the
    message may be MLflow's or a driver's, quoting the URI it was given)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + " [...]"
    text = redact_text(text)
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def entry_point() -> None:
    """The console script. Interpreter teardown (unloading torch, dynamo's and MLflow's modules one by one) takes
    ~2 s after a sweep and does nothing a user needs. So once the command has returned, the non-daemon threads are
    joined and every exit handler has run (MLflow's and Optuna's, which flush and end runs; multiprocessing's and
    concurrent.futures', which end child processes; logging's), the process ends at once with the command's exit
    code: `_end_now` is registered first, so it runs last. An exception other than an exit (a crash, Ctrl-C
    outside a command) takes Python's own way out."""
    same_kernels_everywhere()
    atexit.register(_end_now)
    try:
        code = main()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            _exit_code.append(exc.code or 0)
        raise
    _exit_code.append(code)
    _leave_user_threads()
    sys.exit(code)


def _leave_user_threads(grace_s: float = 2.0) -> None:
    """A thread a user's module started and never ends (a non-daemon `threading.Thread` on import) would keep the
    process alive after the command returned: Python joins every non-daemon thread before its exit handlers run.
    Such threads get `grace_s` to end; then the exit handlers run now (`_end_now`, registered first, runs last and
    ends the process with the command's code), so the command still exits."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        atexit._run_exitfuncs()


_exit_code: list[int] = []


def _end_now() -> None:
    if _exit_code:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:  # None: the process was started with that descriptor closed (`>&-`)
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(_exit_code[-1])


if __name__ == "__main__":
    entry_point()
