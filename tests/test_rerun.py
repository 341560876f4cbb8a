"""#38: every trial reproducible on its own: `sweeplab rerun RUN_ID` and `sweeplab.run(like=RUN_ID)` retrain a logged
run's configuration (its seed, its engine) into a run tagged `sweeplab.rerun_of`, and its curves equal the
original's, read back from MLflow here, epoch by epoch."""

from pathlib import Path

from mlflow import MlflowClient

import sweeplab
from sweeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "experiments" / "training_loop_lab.yaml"


def _curve(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _rerun_of(client, run_id):
    experiment = client.get_run(run_id).info.experiment_id
    (found,) = client.search_runs([experiment], f"tags.`sweeplab.rerun_of` = '{run_id}'")
    return found


def test_a_reference_run_is_reproduced_bit_for_bit(store, capsys):
    uri = f"sqlite:///{store / 'r.db'}"
    assert main(["run", str(LAB), "epochs=15", "seed=5", "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    (original,) = client.search_runs([client.get_experiment_by_name("training_loop_lab").experiment_id])
    capsys.readouterr()
    assert main(["rerun", original.info.run_id, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    again = _rerun_of(client, original.info.run_id)
    for key in ("train_loss", "val_loss"):
        assert _curve(client, again.info.run_id, key) == _curve(client, original.info.run_id, key)
    assert again.data.params["seed"] == "5" and again.data.metrics["best_epoch"] == original.data.metrics["best_epoch"]
    assert "curves within 0 (relative)" in out and "the same best epoch" in out


def test_a_stacked_trial_reruns_bit_for_bit_whatever_its_group(store):
    """The MLP's stacked members: every trial of a group of six (hidden sizes 4 to 64 padded to the widest, Adam
    and SGD), rerun without its group. A member's numbers do not depend on how many members train beside it, but on
    the width its group padded it to (a matmul sums over it: 1.1e-6 relative apart by epoch 27 when a hidden-4
    trial reruns unpadded) and on whether it trained alone (a batched matmul of one matrix takes another kernel:
    4e-7 when the widest reruns alone), so the run records both and the rerun replays them: bit for bit."""
    uri = f"sqlite:///{store / 's.db'}"
    (store / "s.yaml").write_text(
        f"study: st\nexperiment: {LAB}\nbase: {{train: {{epochs: 30}}}}\nengine: vectorized\n"
        "space:\n  lr: {low: 0.003, high: 0.1, log: true}\n  hidden: {choices: [4, 16, 64]}\n"
        "  optimizer: {choices: [Adam, SGD]}\nsampler: {type: random, seed: 2}\nn_trials: 6\n"
    )
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--quiet", "--no-report"]) == 0
    client = MlflowClient(uri)
    trials = client.search_runs([client.get_experiment_by_name("st").experiment_id], "tags.`sweeplab.role` = 'trial'")
    assert len(trials) == 6 and {t.data.tags["sweeplab.engine"] for t in trials} == {"vectorized"}
    assert {(t.data.tags["sweeplab.stacked_width"], t.data.tags["sweeplab.stacked_members"]) for t in trials} == {
        ("64", "6")
    }
    for original in trials:
        result = sweeplab.run(like=original.info.run_id, tracking_uri=uri)
        again = _rerun_of(client, original.info.run_id)
        assert again.data.tags["sweeplab.engine"] == "vectorized"
        for key in ("train_loss", "val_loss"):
            mine, theirs = _curve(client, again.info.run_id, key), _curve(client, original.info.run_id, key)
            assert len(mine) == len(theirs) == 30
            assert mine == theirs
        assert result.best_epoch == original.data.metrics["best_epoch"]
        assert "curves within 0 (relative)" in result.rerun and "the same best epoch" in result.rerun


def test_rerun_of_a_missing_run_is_one_line(store, capsys):
    assert main(["rerun", "0123456789abcdef", "--tracking-uri", f"sqlite:///{store / 'x.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run '0123456789abcdef'" in err
