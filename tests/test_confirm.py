"""#38: `confirm: {top, seeds}`: the top configurations of a sweep trained again over more seeds, the champion by its
mean over seeds, the report's verdict on the leader's lead. Every expected number is recomputed here from the runs'
own logged metrics (numpy, statistics, scipy's Welch test), not from sweeplab's ranking."""

import json
import statistics
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from scipy import stats

from sweeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """\
study: confirmed
experiment: {lab}
base: {{train: {{epochs: 12}}}}
space:
  lr: {{low: 0.003, high: 0.3, log: true}}
  hidden: {{choices: [4, 16]}}
sampler: {{type: random, seed: 3}}
n_trials: 5
confirm: {{top: {top}, seeds: {seeds}}}
{extra}"""


def _sweep(store, top=3, seeds=2, extra="", args=()):
    path = store / "sweep.yaml"
    path.write_text(
        SWEEP.format(lab=ROOT / "experiments" / "training_loop_lab.yaml", top=top, seeds=seeds, extra=extra)
    )
    uri = f"sqlite:///{store / 'runs.db'}"  # absolute: MLflow caches a store's engine by its URI
    assert main(["sweep", str(path), "--tracking-uri", uri, "--quiet", *args]) == 0
    return MlflowClient(uri)


def _runs(client, role):
    experiment = client.get_experiment_by_name("confirmed")
    return client.search_runs([experiment.experiment_id], f"tags.`sweeplab.role` = '{role}'", max_results=1000)


def test_repeats_are_tagged_child_runs_and_the_champion_is_the_best_mean(store, capsys):
    client = _sweep(store, top=3, seeds=2)
    trials, repeats = _runs(client, "trial"), _runs(client, "confirm")
    parent = _runs(client, "sweep")[0].info.run_id
    top3 = sorted(trials, key=lambda r: r.data.metrics["best_val_loss"])[:3]
    assert len(repeats) == 6
    by_original: dict[str, list] = {}
    for run in repeats:
        original = client.get_run(run.data.tags["sweeplab.confirms"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        # the same params as the trial it repeats, but the seed: 42 -> 43, 44; the split keeps its own seed
        differ = {k for k in original.data.params if original.data.params[k] != run.data.params.get(k)}
        assert differ == {"seed"} and run.data.params["data.split_seed"] == original.data.params["data.split_seed"]
        by_original.setdefault(original.info.run_id, []).append(run)
    assert set(by_original) == {r.info.run_id for r in top3}
    for runs in by_original.values():
        assert sorted(int(r.data.params["seed"]) for r in runs) == [43, 44]
    # the ranking, recomputed from the logged metrics: the search run's value and its repeats'
    values = {
        r.info.run_id: [r.data.metrics["best_val_loss"]]
        + [x.data.metrics["best_val_loss"] for x in by_original[r.info.run_id]]
        for r in top3
    }
    best = min(values, key=lambda run_id: statistics.fmean(values[run_id]))
    version = client.get_model_version_by_alias("confirmed", "champion")
    assert version.tags["sweeplab.source_run_id"] == best
    assert float(version.tags["sweeplab.objective_mean"]) == pytest.approx(statistics.fmean(values[best]), rel=1e-12)
    assert float(version.tags["sweeplab.objective_std"]) == pytest.approx(statistics.stdev(values[best]), rel=1e-12)
    assert version.tags["sweeplab.seeds"] == "3"
    # the report's verdict: Welch's t-test of the leader against the runner-up, recomputed with scipy
    ranked = sorted(values, key=lambda run_id: statistics.fmean(values[run_id]))
    welch = stats.ttest_ind(values[ranked[0]], values[ranked[1]], equal_var=False)
    answer = json.loads((store / "reports" / "confirmed" / "answer.json").read_text())
    (confirmed,) = answer["confirmed"]
    assert [row["run_id"] for row in confirmed["ranking"]] == ranked
    assert confirmed["p_value"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert confirmed["beyond_noise"] == (welch.pvalue < 0.05)
    out = capsys.readouterr().out
    assert "confirmed over seeds" in out and f"p = {welch.pvalue:.3g}" in out
    assert "best mean over 3 seeds" in out


def test_a_resume_trains_only_the_repeats_it_lacks(store):
    client = _sweep(store, top=2, seeds=2)
    first = {r.info.run_id for r in _runs(client, "confirm")}
    assert len(first) == 4
    _sweep(store, top=2, seeds=2)  # nothing new
    assert {r.info.run_id for r in _runs(client, "confirm")} == first
    _sweep(store, top=2, seeds=3)  # one more seed: one more repeat per configuration
    after = _runs(client, "confirm")
    assert len(after) == 6 and first < {r.info.run_id for r in after}
    assert sorted(int(r.data.params["seed"]) for r in after if r.info.run_id not in first) == [45, 45]
    study = optuna.load_study(
        study_name="confirmed:confirm",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(store / "optuna.journal"))
        ),
    )
    assert len(study.trials) == 6


def test_seed_in_the_space_is_refused_with_confirm(store, capsys):
    path = store / "sweep.yaml"
    path.write_text(
        SWEEP.format(lab=ROOT / "experiments" / "training_loop_lab.yaml", top=2, seeds=2, extra="").replace(
            "  hidden:", "  seed: {choices: [1, 2]}\n  hidden:"
        )
    )
    assert main(["sweep", str(path), "--tracking-uri", "sqlite:///runs.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "confirm:" in err and "seed" in err
    assert not (store / "runs.db").exists()
