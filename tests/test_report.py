"""Reports, checked against numbers worked out by hand (hand-made runs with known curves) and against plain
recomputation from the raw MLflow metric histories of a real small sweep."""

import math
import statistics
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from sweeplab.cli import main
from sweeplab.report import build_report, factor_table, load_runs
from sweeplab.report.render import terminal_tables

ROOT = Path(__file__).resolve().parents[1]


def log_run(client, experiment_id, trial, params, train, val, outcome="completed"):
    run_id = client.create_run(
        experiment_id, tags={"sweeplab.role": "trial", "sweeplab.trial_number": str(trial), "sweeplab.outcome": outcome}
    ).info.run_id
    metrics = [Metric("train_loss", v, 0, e) for e, v in enumerate(train, 1)]
    metrics += [Metric("val_loss", v, 0, e) for e, v in enumerate(val, 1)]
    finite = [v for v in val if math.isfinite(v)]
    if outcome == "completed":
        metrics.append(Metric("best_val_loss", min(finite), 0, 1))
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, {"completed": "FINISHED", "pruned": "KILLED"}.get(outcome, "FAILED"))
    return run_id


@pytest.fixture
def hand_made(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("hand")
    p = lambda o, h, n: {"train.optimizer": o, "model.hidden": h, "data.noise": n, "train.lr": 0.01}  # noqa: E731
    log_run(client, experiment, 0, p("Adam", 16, 0.3), [9, 4, 2, 1.5, 0.9, 0.8], [10, 5, 2, 1.04, 1.0, 1.2])
    log_run(client, experiment, 1, p("Adam", 32, 0.3), [8, 3, 1, 0.5], [6, 3, 2.0, 2.5])
    log_run(client, experiment, 2, p("SGD", 16, 1.0), [20, 15, 12], [18, 16, 30], outcome="pruned")
    log_run(client, experiment, 3, p("SGD", 32, 1.0), [5, float("nan")], [4, float("nan")], outcome="diverged")
    log_run(client, experiment, 4, p("SGD", 16, 0.3), [3, 2, 1], [4, 3, 3.0])
    return uri


def test_hand_made_curves_give_known_convergence_numbers(hand_made):
    trials = load_runs("hand", hand_made).trials.set_index("trial")
    # trial 0: best 1.0 at epoch 5; within 5% (<= 1.05) first at epoch 4; gap 1.0 - 0.9; trapezoid area of
    # [10, 5, 2, 1.04, 1.0, 1.2] = (10+1.2)/2 + 5 + 2 + 1.04 + 1.0 = 14.64
    row = trials.loc[0]
    assert (row.best_val_loss, row.best_epoch, row.epochs_to_converge, row.epochs_run) == (1.0, 5, 4, 6)
    assert row.gap_at_best == pytest.approx(0.1) and row.auc_val_loss == pytest.approx(14.64)
    assert (row.final_train_loss, row.final_val_loss) == (0.8, 1.2)
    # trial 1: best 2.0 at epoch 3, gap 2.0 - 1.0; trial 4: a tie at 3.0, the first (epoch 2) counts
    assert (trials.loc[1].best_epoch, trials.loc[1].gap_at_best) == (3, 1.0)
    assert (trials.loc[4].best_epoch, trials.loc[4].epochs_to_converge) == (2, 2)
    assert trials.loc[3].state == "diverged" and trials.loc[3].best_val_loss == 4.0
    assert trials.loc[2].state == "pruned"


def test_factor_tables_count_outcomes_and_average_completed_trials_only(hand_made):
    trials = load_runs("hand", hand_made).trials
    table = factor_table(trials, ["optimizer"]).set_index("optimizer")
    assert table.loc["Adam", ["trials", "completed", "pruned", "diverged"]].tolist() == [2, 2, 0, 0]
    assert table.loc["Adam", "best_val_loss_median"] == pytest.approx((1.0 + 2.0) / 2)
    assert "best_val_loss_mean" not in table.columns  # a few non-learners would decide a mean
    assert table.loc["Adam", "best_trial"] == 0
    # SGD: three trials, one of each outcome; only trial 4 (3.0) is averaged
    assert table.loc["SGD", ["trials", "completed", "pruned", "diverged"]].tolist() == [3, 1, 1, 1]
    assert table.loc["SGD", "best_val_loss_median"] == 3.0 and table.loc["SGD", "best_trial"] == 4
    pairs = factor_table(trials, ["optimizer", "noise"]).set_index(["optimizer", "noise"])
    assert pairs.loc[("SGD", 0.3), "completed"] == 1 and pairs.loc[("SGD", 1.0), "completed"] == 0


def test_report_files_are_valid_and_logged(hand_made, tmp_path):
    report = build_report("hand", hand_made, tmp_path / "out")
    names = {f.name for f in report.files}
    assert {
        "trials.csv",
        "curves.csv",
        "by_optimizer.csv",
        "by_optimizer_x_hidden.csv",
        "summary.md",
        "report.html",
        "val_curves.png",
        "parallel_coordinates.png",
        "answer.json",
    } <= names
    for png in tmp_path.glob("out/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = (tmp_path / "out/report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table" in page and 'src="http' not in page
    summary = (tmp_path / "out/summary.md").read_text()
    assert "| optimizer |" in summary
    # #27.8: the pictures beside it are linked, each one that was written (3 here, as in the page)
    linked = [line for line in summary.splitlines() if line.startswith("![")]
    assert len(linked) == 3 and all((tmp_path / "out" / line.split("](")[1][:-1]).is_file() for line in linked)
    curves = __import__("pandas").read_csv(tmp_path / "out/curves.csv")
    assert list(curves.columns) == ["trial", "run_id", "epoch", "split", "loss"] and len(curves) == 2 * (
        6 + 4 + 3 + 2 + 3
    )


def test_report_of_a_real_sweep_matches_the_raw_metric_histories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"study: real\nexperiment: {ROOT / 'experiments/training_loop_lab.yaml'}\nspace:\n"
        "  optimizer: {choices: [Adam, SGD]}\n  lr: {low: 0.005, high: 0.05, log: true}\n"
        "  hidden: {choices: [8, 16]}\nsampler: {type: random, seed: 3}\nn_trials: 5\n"
    )
    assert main(["sweep", str(sweep), "epochs=12", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "report for real: 5 trials" in out and (tmp_path / "reports/real/report.html").exists()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    trials = load_runs("real", uri).trials
    by_optimizer: dict[str, list[float]] = {}
    for row in trials.itertuples():
        val = [m.value for m in sorted(client.get_metric_history(row.run_id, "val_loss"), key=lambda m: m.step)]
        best = min(val)
        assert row.best_val_loss == best and row.best_epoch == val.index(best) + 1
        assert row.epochs_to_converge == next(i for i, v in enumerate(val, 1) if v <= best * 1.05)
        by_optimizer.setdefault(client.get_run(row.run_id).data.params["train.optimizer"], []).append(best)
    table = factor_table(trials, ["optimizer"]).set_index("optimizer")
    for optimizer, values in by_optimizer.items():
        assert table.loc[optimizer, "best_val_loss_median"] == pytest.approx(statistics.median(values), rel=1e-12)
        assert table.loc[optimizer, "best_val_loss_min"] == min(values)
    parent = [
        r
        for r in client.search_runs([client.get_experiment_by_name("real").experiment_id])
        if r.data.tags.get("sweeplab.role") == "sweep"
    ][0]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_unknown_study_is_one_line(tmp_path, capsys):
    MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_experiments()  # a store, without that study
    assert main(["report", "ghost", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "sweeplab: error: ghost: no such study (MLflow experiment) in the tracking store"
    )


def test_a_run_that_never_learned_has_no_epochs_to_converge(tmp_path):
    """Trial 30 of the default sweep went 38.7 -> 36.9: within 5% of its own best from epoch 1, yet predicting no
    better than a constant (baseline_val_loss ~14 for noise 1.0: var(y) = 9 + 4 + 1). By hand: it never learned;
    the learner's best 0.5 <= 14 / 2, and its first epoch within 5% of 0.5 is epoch 4 (0.52)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("learn")
    never = log_run(client, experiment, 0, {"train.lr": 1e-4}, [39, 38, 37.5, 37], [38.7, 37.8, 37.2, 36.9])
    learner = log_run(client, experiment, 1, {"train.lr": 1e-2}, [20, 5, 1, 0.5], [12, 3, 0.9, 0.52, 0.5])
    for run_id in (never, learner):
        client.log_metric(run_id, "baseline_val_loss", 14.0, step=0)
    trials = load_runs("learn", uri).trials.set_index("trial")
    assert not trials.loc[0, "learned"] and math.isnan(trials.loc[0, "epochs_to_converge"])
    assert trials.loc[1, "learned"] and trials.loc[1, "epochs_to_converge"] == 4


def test_runs_without_a_baseline_are_neither_counted_as_learned_nor_as_not(tmp_path):
    """A lazy data set without `targets` logs no baseline_val_loss. Its trials' `learned` is unknown: the Adam
    row, whose two trials logged none, shows a blank, not "2" (every trial counted as learned, as before) nor
    "0"; the SGD row counts its one trial with a baseline (best 0.5 <= 14 / 2) and leaves the other out."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("lazy")
    p = lambda o: {"train.optimizer": o, "model.hidden": 8, "data.noise": 0.3}  # noqa: E731
    log_run(client, experiment, 0, p("Adam"), [3, 2], [3, 2.5])
    log_run(client, experiment, 1, p("Adam"), [3, 1], [3, 1.0, 0.9])
    with_baseline = log_run(client, experiment, 2, p("SGD"), [20, 5, 1], [12, 3, 0.5])
    client.log_metric(with_baseline, "baseline_val_loss", 14.0, step=0)
    log_run(client, experiment, 3, p("SGD"), [20, 9], [12, 30])
    trials = load_runs("lazy", uri).trials.set_index("trial")
    assert trials.loc[0, "learned"] is None and trials.loc[1, "learned"] is None and trials.loc[2, "learned"]
    assert trials.loc[1, "epochs_to_converge"] == 3  # unknown is not ruled out: 0.9 is its first within 5%
    table = factor_table(trials.reset_index(), ["optimizer"]).set_index("optimizer")
    assert math.isnan(table.loc["Adam", "learned"]) and table.loc["SGD", "learned"] == 1
    report = build_report("lazy", uri, tmp_path / "out")
    adam = next(line for line in terminal_tables(report).splitlines() if line.lstrip().startswith("Adam"))
    assert adam.split()[1:7] == ["2", "2", "0", "0", "0", "1.3"]  # trials..failed, then bvl_q1 (0.9 + 1.6 / 4)


@pytest.mark.slow
def test_run_links_open_the_model_training_view_of_the_ui_asked_for(hand_made, tmp_path, monkeypatch, capsys):
    """#19.6: run links opened the GenAI view (no workflowType) and always assumed port 5000."""
    import re

    from sweeplab.track.tracker import Tracker

    experiment = Tracker(hand_made).client.get_experiment_by_name("hand").experiment_id
    build_report("hand", hand_made, tmp_path / "default")
    links = re.findall(r'href="([^"]+)"', (tmp_path / "default/report.html").read_text())
    assert links and all(
        re.fullmatch(
            rf"http://127\.0\.0\.1:5000/#/experiments/{experiment}/runs/[0-9a-f]{{32}}"
            r"\?workflowType=machine_learning",
            link,
        )
        for link in links
    )
    assert (
        main(
            [
                "report",
                "hand",
                "--tracking-uri",
                hand_made,
                "--out",
                str(tmp_path / "other"),
                "--ui-url",
                "http://127.0.0.1:5123/",
            ]
        )
        == 0
    )
    links = re.findall(r'href="([^"]+)"', (tmp_path / "other/report.html").read_text())
    assert links and all(link.startswith(f"http://127.0.0.1:5123/#/experiments/{experiment}/runs/") for link in links)
    monkeypatch.setenv("SWEEPLAB_UI_URL", "http://127.0.0.1:6001")
    build_report("hand", hand_made, tmp_path / "env")
    assert "http://127.0.0.1:6001/#/experiments/" in (tmp_path / "env/report.html").read_text()
