"""`sweeplab run | sweep | worker | report | predict | ui`: parse, call, print. Nothing else lives here.

Heavy libraries are imported inside the command that needs them: `sweeplab run --no-track` never imports
MLflow or Optuna, so it starts as fast as torch allows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from . import __version__
from .config import ConfigError


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit code 2."""


def _run(args: argparse.Namespace) -> int:
    from .config import load_experiment, parse_overrides

    # The config is checked before torch is even imported: a typo costs milliseconds, not seconds.
    config = load_experiment(args.experiment, parse_overrides(args.overrides))
    from ._eager import skip_dynamo_wrappers
    from .experiment import run_experiment

    skip_dynamo_wrappers()
    printer = None if args.json else _SeedPrinter(config.name, config.print_every)
    if printer:
        printer.header()
    callbacks = [printer] if printer else []
    tracker = None
    if args.track:
        from .tracking import RunTracker, resolve_tracking_uri

        tracker = RunTracker.for_experiment(config, resolve_tracking_uri(args.tracking_uri), args.experiment)
        callbacks.append(tracker.epoch_callback)
    try:
        result = run_experiment(config, callbacks=callbacks)
    except BaseException as exc:
        if tracker:
            tracker.fail(exc)
        raise
    if tracker:
        tracker.finish(result)
    history = result.history
    if args.json:
        print(json.dumps(_run_summary(result, tracker)))
        return 0
    if history.status != "completed":
        print(f"stopped: {history.stop_reason}")
    print("best_val:", round(history.best_val_loss, 4))
    print("predictions:")
    for row, line in zip(config.predict_x, _prediction_texts(result)):
        print(f"x={row} -> {line}")
    print(f"best_epoch: {history.best_epoch}")
    if tracker:
        print(f"mlflow run: {tracker.run_id} ({tracker.tracking_uri_display})")
    return 0


class _SeedPrinter:
    """Prints the seed's epoch lines (epoch 1 and every `every`-th) as the training runs."""

    def __init__(self, name: str, every: int):
        self.name, self.every = name, every

    def header(self) -> None:
        print(self.name, flush=True)

    def __call__(self, record) -> None:
        if record.epoch == 1 or record.epoch % self.every == 0:
            print(f"epoch={record.epoch:3d} train_loss={record.train_loss:.4f} val_loss={record.val_loss:.4f}",
                  flush=True)
        return None


def _prediction_texts(result) -> list[str]:
    from .serve import describe_outputs

    return [row["text"] for row in describe_outputs(result.predictions, result.spec)]


def _run_summary(result, tracker) -> dict:
    from .serve import describe_outputs

    history = result.history
    summary = {
        "name": result.config.name,
        "status": history.status,
        "stop_reason": history.stop_reason,
        "best_val": history.best_val_loss,
        "best_epoch": history.best_epoch,
        "predictions": [row["prediction"] for row in describe_outputs(result.predictions, result.spec)],
        "train_loss": history.train_loss,
        "val_loss": history.val_loss,
        "metrics": history.metrics,
        "best_metrics": history.best_metrics,
        "confusion_matrix": history.confusion_matrix,
        "device": str(result.device),
        "seconds": history.seconds,
    }
    if tracker:
        summary["mlflow_run_id"] = tracker.run_id
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweeplab", description="Optuna sweeps over a PyTorch loop, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"sweeplab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train one experiment (experiments/*.yaml)")
    run.add_argument("experiment", help="experiment YAML file")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override fields: optimizer=SGD lr=0.05 hidden=32 noise=1.0 epochs=20 ... or data.val_size=0.2")
    run.add_argument("--json", action="store_true", help="print one JSON object with the curves and results")
    run.add_argument("--track", action=argparse.BooleanOptionalAction, default=False,
                     help="log the run to MLflow (default: off)")
    run.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run EXP --json epochs=20`: key=value pairs may come after options too
    strays = [item for item in extra if "=" not in item or item.startswith("-")]
    if strays or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(strays or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"sweeplab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweeplab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sweeplab run ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        from .loop import ShapeError

        if isinstance(exc, ShapeError):
            print(f"sweeplab: error: {exc}", file=sys.stderr)
            return 2
        raise


def entry_point() -> None:
    """The console script. When the command touched neither MLflow nor Optuna (whose exit handlers flush
    logs and end runs), everything it owes the user is on stdout/stderr once flushed, and skipping
    interpreter teardown saves ~0.35 s of unloading torch, more than this whole command's training."""
    code = main()
    if not {"mlflow", "optuna"} & sys.modules.keys():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
