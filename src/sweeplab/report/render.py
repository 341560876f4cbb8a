"""The report as people read it: the terminal tables (`terminal_tables`), summary.md and the self-contained
report.html (tables, pictures inlined, run links into the MLflow UI)."""

from __future__ import annotations

import base64
import html
import math

import jinja2
import numpy as np
import pandas as pd

from sweeplab.report.answer import DEFAULT_GOAL, Goal
from sweeplab.report.load import LEARNED_BELOW, SweepData
from sweeplab.report.pictures import loss_name
from sweeplab.report.tables import Report
from sweeplab.track.tracker import condition_label, run_link


def shown_columns(goal: Goal = DEFAULT_GOAL) -> list[str]:
    column = goal.column
    return [
        "trials",
        "completed",
        "pruned",
        "diverged",
        "failed",
        "learned",
        f"{column}_q1",
        f"{column}_median",
        f"{column}_q3",
        f"{column}_{'min' if goal.minimize else 'max'}",
        "best_epoch_median",
        "epochs_to_converge_median",
        "best_trial",
    ]


SHOWN = shown_columns()


def short_name(goal: Goal = DEFAULT_GOAL) -> str:
    """`bvl` for best_val_loss, `bva` for best_val_accuracy: the terminal table's column prefix."""
    return "".join(word[0] for word in goal.column.split("_"))


def _short(column: str, goal: Goal = DEFAULT_GOAL) -> str:
    short = {
        f"{goal.column}_": f"{short_name(goal)}_",
        "epochs_to_converge_median": "conv_med",
        "best_epoch_median": "best_ep_med",
    }
    for long, abbreviation in short.items():
        column = column.replace(long, abbreviation)
    return column


def answer_text(report: Report) -> list[str]:
    """The answer, first: one paragraph per condition."""
    factors = report.data.factors
    searched = [answer.sentence(factors, report.data.goal) for answer in report.answers]
    confirmed = [found.sentence(factors, report.data.goal.column) for found in report.confirmed]
    return confirmed + searched + test_sentences(report.data)  # the ranking over seeds first: it is the champion's


def test_sentences(data) -> list[str]:
    """data.test_size: what each champion scored on the held-out test split, once, after the search."""
    first = "test_" + data.goal.metric.removeprefix("val_")
    out = []
    for trial, refit, scores in sorted(data.tested, key=lambda t: t[0]):
        shown = ", ".join(
            f"{name} {scores[name]:.4g}" for name in sorted(scores, key=lambda n: (n != first, n != "test_loss", n))[:3]
        )
        who = f"the refit of trial #{trial}" if refit else f"trial #{trial}"
        out.append(f"On the held-out test split, which the search never saw, the champion ({who}) scores {shown}.")
    return out


def terminal_tables(report: Report) -> str:
    """The answer, then the per-factor tables (within each condition), compact, for the terminal."""
    counts = report.data.trials["state"].value_counts().to_dict()
    lines = [
        f"report for {report.data.study}: {len(report.data.trials)} trials ("
        + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        + ")",
        "",
    ]
    lines += answer_text(report)
    goal = report.data.goal
    order = shown_columns(goal)
    for name, table in report.tables.items():
        if " x " in name:
            continue
        shown = table[[c for c in table.columns if c not in order] + [c for c in order if c in table.columns]]
        shown = shown.rename(columns=lambda c: _short(c, goal))
        lines += ["", shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")]
    lines += [
        "",
        f"({short_name(goal)}: {goal.column} over completed trials: quartiles q1, median, q3 and the "
        f"{'minimum' if goal.minimize else 'maximum'}; learned: best_val_loss at most {LEARNED_BELOW:g} x the "
        "baseline of a constant prediction; blank where the runs logged no baseline)",
    ]
    return "\n".join(lines)


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _top(data: SweepData, n: int = 10) -> pd.DataFrame:
    trials, goal = data.trials, data.goal
    columns = [
        c
        for c in [
            "trial",
            *data.conditions,
            *data.factors,
            *dict.fromkeys([goal.column, "best_val_loss"]),
            "best_epoch",
            "epochs_to_converge",
            "gap_at_best",
            "run_id",
        ]
        if c in trials.columns
    ]
    done = trials[(trials["state"] == "completed") & np.isfinite(goal.values(trials))]
    if data.conditions:  # the best of each condition, then the next best: its rank in its condition says so
        done = done.assign(
            rank=done.groupby(data.conditions)[goal.column].rank(method="first", ascending=goal.minimize).astype(int)
        )
        return done.sort_values(["rank", goal.column], ascending=[True, goal.minimize])[["rank", *columns]].head(n)
    return done.sort_values(goal.column, ascending=goal.minimize)[columns].head(n)


def _shown(table: pd.DataFrame, goal: Goal = DEFAULT_GOAL) -> pd.DataFrame:
    order = shown_columns(goal)
    return table[
        [c for c in table.columns if c not in order and not c.startswith((goal.column, "best_epoch", "epochs_to"))]
        + [c for c in order if c in table.columns]
    ]


def summary_markdown(report: Report, pictures: list[str] = ()) -> str:
    """summary.md: each condition's answer a paragraph of its own, the tables, and the pictures beside it
    (`pictures`: their names, written as NAME.png in the same folder)."""
    data = report.data
    answers = [line for answer in answer_text(report) for line in (answer, "")]  # Markdown joins adjacent lines
    parts = [
        f"# Sweep report: {data.study}",
        "",
        *answers,
        f"{len(data.trials)} trials: "
        + ", ".join(f"{n} {s}" for s, n in sorted(data.trials["state"].value_counts().items())),
        "",
        *_confirmed_markdown(report),
        "## Best trials",
        "",
        _markdown_table(_top(data)),
    ]
    for name, table in report.tables.items():
        parts += ["", f"## By {name}", "", _markdown_table(_shown(table, data.goal))]
    if pictures:
        parts += ["", "## Pictures"]
        for name in pictures:
            parts += ["", f"![{name.replace('_', ' ')}]({name}.png)"]
    parts += [""] + [f"Note: {note}" for note in data.notes]
    return "\n".join(parts) + "\n"


def _confirmed_markdown(report: Report) -> list[str]:
    parts = []
    for found in report.confirmed:
        where = f" ({condition_label(found.condition)})" if found.condition else ""
        parts += [f"## Confirmed over seeds{where}", "", _markdown_table(found.table), ""]
        if found.verdict:
            parts += [found.verdict.sentence, ""]
    return parts


def html_page(report: Report, pictures: dict[str, bytes], ui_url: str) -> str:
    """report.html from templates/report.html.j2 (autoescaped; the tables pandas renders are marked safe)."""
    data = report.data
    top = _top(data)
    links = top.copy()
    if "run_id" in links.columns and data.experiment_id:
        links["run_id"] = [
            f'<a href="{html.escape(run_link(ui_url, data.experiment_id, run))}">{run[:8]}</a>'
            for run in links["run_id"]
        ]
    number = lambda v: f"{v:.4g}"  # noqa: E731
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("sweeplab.report", "templates"), autoescape=True, keep_trailing_newline=True
    )
    return environment.get_template("report.html.j2").render(
        study=data.study,
        answer=answer_text(report),
        n_trials=len(data.trials),
        counts=", ".join(f"{n} {s}" for s, n in sorted(data.trials["state"].value_counts().items())),
        ui_url=ui_url,
        best_trials=links.to_html(index=False, escape=False, float_format=number, na_rep=""),
        pictures=[(name, base64.b64encode(png).decode()) for name, png in pictures.items()],
        tables=[
            (name, _shown(table, data.goal).to_html(index=False, float_format=number, na_rep=""))
            for name, table in report.tables.items()
        ],
        confirmed=[
            (
                condition_label(found.condition),
                found.table.to_html(index=False, float_format=number, na_rep=""),
                found.verdict.sentence if found.verdict else "",
            )
            for found in report.confirmed
        ],
        notes=data.notes,
        objective=data.goal.column,
        better="lower" if data.goal.minimize else "higher",
        loss=loss_name(data),
        folds=data.folds,
    )
