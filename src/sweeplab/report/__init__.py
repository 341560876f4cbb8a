"""pandas reports that compare how trials converged, built from what MLflow recorded (never by re-training).

load.py (runs -> tidy frames) -> tables.py (convergence tables per factor, fANOVA importances, the answer) ->
pictures.py (PNG) and render.py (terminal, Markdown, HTML); `build_report` here writes them to a folder (CSV, PNG,
answer.json, summary.md, report.html) and logs them to the sweep's parent run. A report over 500 trials takes
seconds."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from sweeplab.report.load import ReportError, SweepData, load_runs
from sweeplab.report.pictures import draw, warm_up
from sweeplab.report.render import answer_text, html_page, summary_markdown, terminal_tables
from sweeplab.report.tables import (
    Report,
    all_factor_tables,
    answers_of,
    confirmed_of,
    factor_table,
    param_importances,
)
from sweeplab.track.tracker import Tracker

__all__ = [
    "DEFAULT_UI_URL",
    "Report",
    "ReportError",
    "SweepData",
    "answer_text",
    "build_report",
    "factor_table",
    "load_runs",
    "param_importances",
    "report_for_sweep",
    "terminal_tables",
    "warm_up",
]


def build_report(
    study: str, tracking_uri: str, out: Path, log_to_mlflow: bool = True, ui_url: str | None = None
) -> Report:
    """The report's files in `out`. Its run links open the MLflow UI at `ui_url` (default $SWEEPLAB_UI_URL, else
    where `sweeplab ui` listens by default, http://127.0.0.1:5000)."""
    ui_url = (ui_url or os.environ.get("SWEEPLAB_UI_URL") or DEFAULT_UI_URL).rstrip("/")
    data = load_runs(study, tracking_uri)
    tables = all_factor_tables(data.trials, data.factors, data.conditions, data.continuous, data.goal)
    answers = answers_of(data)
    confirmed = confirmed_of(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out}: cannot make the report's folder there ({exc.strerror})") from None
    files = [write_whole(out / "trials.csv", data.trials.to_csv(index=False))]
    files.append(write_whole(out / "curves.csv", data.curves.to_csv(index=False)))
    for name, table in tables.items():
        files.append(write_whole(out / f"by_{name.replace(' x ', '_x_')}.csv", table.to_csv(index=False)))
    for found in confirmed:
        where = "_".join(f"{k}-{v}" for k, v in found.condition.items())
        files.append(write_whole(out / f"confirmed{'_' + where if where else ''}.csv", found.table.to_csv(index=False)))
    report = Report(data, tables, files, answers, confirmed)
    write_whole(out / "answer.json", json.dumps(report.to_json(), indent=2, default=str))
    pictures = draw(data, answers, confirmed)
    for name, png in pictures.items():
        files.append(write_whole(out / f"{name}.png", png))
    write_whole(out / "summary.md", summary_markdown(report, list(pictures)))
    write_whole(out / "report.html", html_page(report, pictures, ui_url))
    files += [out / "answer.json", out / "summary.md", out / "report.html"]
    if log_to_mlflow and data.parent_run_id:
        Tracker(tracking_uri).log_report(data.parent_run_id, out, "\n\n".join(answer_text(report)))
    return report


DEFAULT_UI_URL = "http://127.0.0.1:5000"


class ReportWriteError(OSError):
    """A report file that could not be written (a full disk, a folder that refuses it): one line, exit 1."""


def write_whole(path: Path, content: str | bytes) -> Path:
    """The file written whole or not at all: into a hidden file beside it, flushed to disk, then renamed into
    place, so a full disk leaves the previous file (or none), never a 0-byte or cut-short one."""
    data = content.encode() if isinstance(content, str) else content
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise ReportWriteError(f"report: {path} not written ({exc.strerror or exc})") from None
    return path


def report_for_sweep(study: str, tracking_uri: str, out: str) -> dict:
    """The report `sweeplab sweep` ends with, built in its background process (background.Forked): the files in
    `out`, and what the sweep then prints and logs to the parent run (`Tracker.log_report`)."""
    report = build_report(study, tracking_uri, Path(out), log_to_mlflow=False)
    return {
        "tables": terminal_tables(report),
        "note": "\n\n".join(answer_text(report)),
        "parent_run_id": report.data.parent_run_id,
    }
