"""What the commands print: the seed's epoch lines and a run's summary (`sweeplab run`), the sweep's progress bars
and its closing summary (`sweeplab sweep`), and the commands to paste next, written as the user invoked sweeplab.
cli.py decides what to print when; the numbers come from the History (train/loop.py) and the studies (sweep/ledger.py).
Light to import, like cli.py: each heavy module (tqdm, Optuna through the ledger, MLflow through tracking) is
imported by the function that prints with it."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys

from sweeplab.stores import redact


class SeedPrinter:
    """Prints the seed's epoch lines (epoch 1 and every `every`-th) as the training runs."""

    def __init__(self, name: str, every: int):
        self.name, self.every = name, every

    def header(self) -> None:
        print(self.name, flush=True)

    def __call__(self, record) -> None:
        if record.epoch == 1 or record.epoch % self.every == 0:
            print(
                f"epoch={record.epoch:3d} train_loss={record.train_loss:.4f} val_loss={record.val_loss:.4f}", flush=True
            )
        return None


def prediction_texts(result) -> list[str]:
    from sweeplab.track.serve import describe_outputs

    return [row["text"] for row in describe_outputs(result.predictions, result.spec)]


def run_summary(result, tracker) -> dict:
    from sweeplab.track.serve import describe_outputs

    history = result.history
    summary = {
        "name": result.config.name,
        "status": history.status,
        "stop_reason": history.stop_reason,
        "best_val": history.best_val_loss,
        "best_epoch": history.best_epoch,
        "objective": {
            "metric": result.config.objective.metric,
            "direction": result.config.objective.direction,
            "best": history.best_value,
        },
        "predictions": [row["prediction"] for row in describe_outputs(result.predictions, result.spec)],
        "train_loss": history.train_loss,
        "val_loss": history.val_loss,
        "metrics": history.metrics,
        "best_metrics": history.best_metrics,
        "confusion_matrix": history.confusion_matrix,
        "device": str(result.device),
        "seconds": history.seconds,
    }
    if getattr(result, "test", None):  # data.test_size: the best state's (or the refit's) scores, once
        summary["test"] = result.test
    if getattr(result, "refit", None) is not None:  # data.folds: the model is the refit's
        summary["refit"] = {"epochs": result.refit.epochs_run, "mlflow_run_id": result.refit_run_id}
    if tracker:
        summary["mlflow_run_id"] = tracker.run_id
    return summary


class Progress:
    """A tqdm bar per condition: trials finished out of its budget, and the best value so far; conditions run side
    by side get their bars together, one line each. On a terminal they redraw in place; on other output (a log,
    CI) a bar writes a line at most every 15 s and when its condition ends. `--quiet` turns it off."""

    def __init__(self, study_name: str, enabled: bool = True, header: str = ""):
        self.study_name, self.enabled, self.header = study_name, enabled, header  # header: before the first bar
        self.tty = sys.stderr.isatty()
        self.bars: dict[str, object] = {}

    def update(self, study, n_trials: int, condition: str = "") -> None:
        if "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets"):  # Jupyter's own progress bars
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm

        from sweeplab.sweep.ledger import best_trials, finished_count

        if not self.enabled:
            return
        bar = self.bars.get(condition)
        if bar is None:
            tqdm.monitor_interval = 0  # no monitor thread: local helpers are forked from this process
            if not self.bars and self.header:  # said once the sweep runs (not before an error that stops it)
                print(self.header, file=sys.stderr, flush=True)
            name = f"{self.study_name} {condition}" if condition else self.study_name
            bar = self.bars[condition] = tqdm(
                total=n_trials,
                desc=name,
                unit="trial",
                file=sys.stderr if self.tty or "ipykernel" in sys.modules else _Lines(),
                dynamic_ncols=True,
                mininterval=0.1 if self.tty else 15,
                bar_format="{desc} {bar:30} {n_fmt}/{total_fmt} trials [{elapsed}<{remaining}]{postfix}",
                ascii=not self.tty,
                position=len(self.bars),
            )
        top = best_trials(study, 1)
        bar.set_postfix_str(f"best {top[0].value:.4g} (#{top[0].number})" if top else "best -", refresh=False)
        bar.update(min(finished_count(study), n_trials) - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}


_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """tqdm's output for a log or CI: each redraw on a line of its own, not glued to the last one by a carriage
    return."""

    def write(self, text: str) -> None:
        text = _CURSOR.sub("", text).replace("\r", "\n").strip("\n")  # bars side by side move the cursor
        if text.strip():
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def print_sweep_summary(outcome, sweep, tracking_uri: str, storage_url: str) -> None:
    """Per condition (or for the whole sweep): trial counts, the best trials with their searched values, the
    champion; then the commands to browse and to predict, as they work pasted here."""
    from sweeplab.sweep.ledger import best_trials, outcome_counts
    from sweeplab.sweep.search import values_of
    from sweeplab.track.tracker import condition_label, value_text

    champions = []
    for part in outcome.parts:
        counts = outcome_counts(part.study)
        where = f", {condition_label(part.sweep.spec.condition)}" if part.sweep.spec.condition else ""
        print(
            f"study {sweep.spec.study}{where}: "
            + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
            + f" ({part.ran} run now)"
        )
        top = best_trials(part.study, 5)
        if top:
            names = list(sweep.spec.space)
            widths = [max(len(name), 9) for name in names]
            column = part.sweep.base_config.objective.column
            print(
                f"{'trial':>5}  "
                + " ".join(f"{name:>{w}}" for name, w in zip(names, widths))
                + f"  {column:>13} {'best_epoch':>10}  run"
            )
            for trial in top:
                values = values_of(trial.params, part.sweep.spec.space)
                cells = " ".join(f"{value_text(values.get(name)):>{w}}" for name, w in zip(names, widths))
                print(
                    f"{trial.number:>5}  {cells}  {trial.value:>{len(column)}.4f} {value_text(trial.best_epoch):>10}  "
                    f"{trial.run_id or ''}"
                )
        confirmation = getattr(part, "confirmation", None)
        if confirmation is not None and confirmation.ranking:
            column = part.sweep.base_config.objective.column
            print(f"confirmed over seeds (the search's seed and {sweep.spec.confirm.seeds} more), best mean first:")
            print(f"{'trial':>5}  {'mean':>10} {'std':>9} {'min':>10} {'max':>10} {'seeds':>5}  run")
            for trial, seeded in confirmation.ranking:
                print(
                    f"{trial.number:>5}  {seeded.mean:>10.4f} {seeded.std:>9.4f} {min(seeded.values):>10.4f} "
                    f"{max(seeded.values):>10.4f} {seeded.n:>5}  {trial.run_id or ''}"
                )
            if confirmation.verdict is not None:
                print(confirmation.verdict.sentence)
        if part.champion:
            champion = part.champion
            champions.append(champion)
            state = "registered" if champion.new else "unchanged"
            mean = champion.tags.get("sweeplab.objective_mean")
            by = f", best mean over {champion.tags.get('sweeplab.seeds')} seeds" if mean is not None else ""
            if "sweeplab.refit_of" in champion.tags:  # data.folds: the winner trained again on the whole split
                by += f", refit on the whole training split: run {champion.run_id}"
            print(f"champion: {champion.uri} (version {champion.version}, trial #{champion.trial}{by}, {state})")
            if champion.test:  # data.test_size: the champion's weights on the split the search never saw
                print(f"  test: {test_text(champion.test, part.sweep.base_config.objective.metric)}")
        print()
    commands = sweep_commands(outcome, sweep, tracking_uri)
    print(f"browse:   {commands['browse']}")
    for line in commands["predict"]:
        print(f"predict:  {line}")
    if commands["serve"]:
        print(f"serve:    {commands['serve']}  (HTTP, mlflow models serve)")


def sweep_commands(outcome, sweep, tracking_uri: str) -> dict:
    """The commands that browse a sweep's runs and predict with (and serve) its champions, as they work pasted in
    this folder: {"browse": str, "predict": [str per champion], "serve": str or None (the first champion's; the
    others differ only by their name)}. What the sweep prints last, and `SweepResult.commands`."""
    me = invocation()
    store = f" --tracking-uri {shlex.quote(redact(tracking_uri))}"
    uris = [part.champion.uri for part in outcome.parts if part.champion is not None]
    return {
        "browse": f"{me} ui {shlex.quote(sweep.spec.study)}{store}",
        "predict": [f"{me} predict {uri}{store}" for uri in uris],
        "serve": f"{me} serve {uris[0]}{store}" if uris else None,
    }


def invocation() -> str:
    """sweeplab as the user invoked it, so a printed command works pasted in the folder it ran in: `sweeplab`
    when that is what PATH finds, else the path they typed (`.venv/bin/sweeplab` in the checkout), else
    `python -m sweeplab` with this interpreter."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "sweeplab":
        found = shutil.which("sweeplab")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return "sweeplab"
        return shlex.quote(argv0)
    return f"{shlex.quote(sys.executable)} -m sweeplab"


def test_text(scores: dict[str, float], metric: str) -> str:
    """`test_accuracy 0.9583, test_loss 0.1234 (the held-out test split, scored once)`: the objective's first."""
    first = "test_" + metric.removeprefix("val_")
    names = sorted(scores, key=lambda name: (name != first, name != "test_loss", name))
    shown = ", ".join(f"{name} {scores[name]:.4g}" for name in names[:4])
    return f"{shown} (the held-out test split, scored once)"
