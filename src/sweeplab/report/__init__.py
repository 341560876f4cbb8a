"""pandas reports that compare how trials converged, built from what MLflow recorded (never by re-training).

load.py (runs -> tidy frames) -> tables.py (convergence tables per factor, fANOVA importances, the answer) ->
pictures.py (PNG) and render.py (terminal, Markdown, HTML); `build_report` here writes them to a folder (CSV, PNG,
answer.json, summary.md, report.html) and logs them to the sweep's parent run. A report over 500 trials takes
seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sweeplab.report.load import ReportError, SweepData, load_runs
from sweeplab.report.pictures import draw, warm_up
from sweeplab.report.render import answer_text, html_page, summary_markdown, terminal_tables
from sweeplab.report.tables import Report, all_factor_tables, answers_of, factor_table, param_importances
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
    out.mkdir(parents=True, exist_ok=True)
    files = []
    data.trials.to_csv(out / "trials.csv", index=False)
    data.curves.to_csv(out / "curves.csv", index=False)
    files += [out / "trials.csv", out / "curves.csv"]
    for name, table in tables.items():
        path = out / f"by_{name.replace(' x ', '_x_')}.csv"
        table.to_csv(path, index=False)
        files.append(path)
    report = Report(data, tables, files, answers)
    (out / "answer.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
    pictures = draw(data, answers)
    for name, png in pictures.items():
        (out / f"{name}.png").write_bytes(png)
        files.append(out / f"{name}.png")
    (out / "summary.md").write_text(summary_markdown(report, list(pictures)))
    (out / "report.html").write_text(html_page(report, pictures, ui_url))
    files += [out / "answer.json", out / "summary.md", out / "report.html"]
    if log_to_mlflow and data.parent_run_id:
        Tracker(tracking_uri).log_report(data.parent_run_id, out, "\n\n".join(answer_text(report)))
    return report


DEFAULT_UI_URL = "http://127.0.0.1:5000"


def report_for_sweep(study: str, tracking_uri: str, out: str) -> dict:
    """The report `sweeplab sweep` ends with, built in its background process (background.Forked): the files in
    `out`, and what the sweep then prints and logs to the parent run (`Tracker.log_report`)."""
    report = build_report(study, tracking_uri, Path(out), log_to_mlflow=False)
    return {
        "tables": terminal_tables(report),
        "note": "\n\n".join(answer_text(report)),
        "parent_run_id": report.data.parent_run_id,
    }
