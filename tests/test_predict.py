"""`sweeplab predict` and the Python API, against the seed's lab logged to a real temporary MLflow store.
The expected predictions are the seed's printed ones: 12.05, 3.00, 4.98."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import sweeplab
from sweeplab.cli import main

ROOT = Path(__file__).resolve().parents[1]
SEED_LINES = ["x=[1.0, 2.0] -> pred=12.05", "x=[-1.0, 0.5] -> pred=3.00", "x=[0.0, 0.0] -> pred=4.98"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The lab as a tracked run and as a one-trial sweep (whose champion is the lab's model)."""
    import os

    tmp = tmp_path_factory.mktemp("predict")
    sweep = tmp / "lab.yaml"
    sweep.write_text(
        f"study: lab\nexperiment: {ROOT / 'experiments/training_loop_lab.yaml'}\n"
        "space:\n  hidden: {choices: [16]}\nsampler: {type: grid}\nn_trials: 1\n"
    )
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["run", str(ROOT / "experiments/training_loop_lab.yaml"), "--json"]) == 0
        assert main(["sweep", str(sweep), "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("training_loop_lab").experiment_id])
    return tmp, uri, run.info.run_id


def predict_cli(capsys, *args):
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.strip()


@pytest.mark.parametrize("reference", ["run", "lab", "models:/lab@champion", "models:/lab/1", "sweep-file"])
def test_each_kind_of_model_reference_predicts_the_seeds_points(logged, capsys, reference):
    tmp, uri, run_id = logged
    reference = {"run": run_id, "sweep-file": str(tmp / "lab.yaml")}.get(reference, reference)
    code, out, _ = predict_cli(capsys, reference, "--tracking-uri", uri)
    assert code == 0 and out == SEED_LINES


def test_inputs_from_flags_csv_and_json_stdin(logged, capsys, monkeypatch, tmp_path):
    _, uri, run_id = logged
    code, out, _ = predict_cli(capsys, run_id, "--x", "1.0,2.0", "--x", "0,0", "--tracking-uri", uri)
    assert out == [SEED_LINES[0], SEED_LINES[2]]
    (tmp_path / "in.csv").write_text("id,x2,x1\na,2.0,1.0\nb,0.5,-1.0\n")  # columns by name, in any order
    code, out, err = predict_cli(capsys, run_id, str(tmp_path / "in.csv"), "--tracking-uri", uri)
    assert out == SEED_LINES[:2] and "ignoring column(s) id" in err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO('[[0, 0], {"x1": -1, "x2": 0.5}]'))
    code, out, _ = predict_cli(capsys, run_id, "-", "--tracking-uri", uri, "--json")
    result = json.loads(out[-1])
    assert [round(p["prediction"], 2) for p in result["predictions"]] == [4.98, 3.00]


@pytest.mark.parametrize(
    "args, message",
    [
        (["0123456789abcdef0123456789abcdef"], "no such run id, study or sweep"),
        (["no_such_study"], "no_such_study: no such run id, study or sweep"),
        (["models:/lab@nobody"], "models:/lab@nobody: no such registered model version"),
        (["models:/ghost/3"], "models:/ghost/3: no such registered model version"),
        (["RUN", "--x", "1,2,3"], "input row 0 has 3 values; the model takes 2 (x1, x2)"),
        (["RUN", "--x", "1,two"], "--x 1,two: 'two' is not a number"),
        (["RUN", "CSV"], "missing feature column(s) x2"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(logged, capsys, tmp_path, args, message):
    _, uri, run_id = logged
    (tmp_path / "bad.csv").write_text("x1\n1.0\n")
    args = [{"RUN": run_id, "CSV": str(tmp_path / "bad.csv")}.get(a, a) for a in args]
    code, _, err = predict_cli(capsys, *args, "--tracking-uri", uri)
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_a_run_without_a_best_state_is_a_clear_error(logged, capsys):
    _, uri, _ = logged
    client = MlflowClient(uri)
    empty = client.create_run(client.get_experiment_by_name("training_loop_lab").experiment_id).info.run_id
    code, _, err = predict_cli(capsys, empty, "--tracking-uri", uri)
    assert code == 2 and f"run {empty} has no best state (checkpoint/best.pt)" in err


def test_python_api(logged):
    _, uri, run_id = logged
    model = sweeplab.load_model("models:/lab@champion", tracking_uri=uri)
    assert isinstance(model, torch.nn.Module) and not model.training
    values = sweeplab.predict(run_id, [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]], tracking_uri=uri)
    assert [f"{v:.2f}" for v in values.tolist()] == ["12.05", "3.00", "4.98"]


@pytest.mark.slow
def test_champion_through_pyfunc_without_sweeplab_predicts_the_seeds_points(logged):
    tmp, _, _ = logged
    script = textwrap.dedent("""\
        import sys, numpy as np, mlflow
        mlflow.set_tracking_uri("sqlite:///mlflow.db")
        model = mlflow.pyfunc.load_model("models:/lab@champion")
        out = np.asarray(model.predict(np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]], dtype=np.float32)))
        assert "sweeplab" not in sys.modules
        print(" ".join(f"{v:.2f}" for v in out.ravel()))
        """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["12.05", "3.00", "4.98"]


def test_a_checkpoint_saved_from_cuda_loads_on_the_cpu(tmp_path, monkeypatch):
    """Tensors tagged as CUDA storage (what torch.save writes on a GPU) cannot load here without mapping."""
    from sweeplab.train.model import ModelSpec, build_model, load_checkpoint, save_checkpoint

    spec = ModelSpec(in_features=2, hidden=(4,), out_features=1)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    import torch.serialization as serialization

    monkeypatch.setattr(serialization, "location_tag", lambda storage: "cuda:0")
    save_checkpoint(tmp_path / "gpu.pt", state, spec)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)  # what an unmapped load would do
    model, _ = load_checkpoint(tmp_path / "gpu.pt", map_location="cpu")
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, state[name])


@pytest.mark.parametrize(
    "command", [["run", str(ROOT / "experiments/training_loop_lab.yaml")], ["predict", "lab"], ["report", "lab"]]
)
def test_an_unreachable_tracking_server_is_one_line(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the one line, without ~15 s of retries
    assert main([*command, "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the MLflow tracking store" in err


def test_the_readmes_negative_rows_and_an_input_file_after_the_options(logged, capsys, tmp_path):
    """#19.5: `--x -1,0.5` was taken for an option; an input file appended to the printed predict line was refused."""
    _, uri, _ = logged
    code, out, _ = predict_cli(capsys, "lab", "--x", "1.0,2.0", "--x", "-1,0.5", "--tracking-uri", uri)
    assert code == 0 and out == SEED_LINES[:2]
    (tmp_path / "in.csv").write_text("x1,x2\n1.0,2.0\n-1.0,0.5\n0,0\n")
    code, out, _ = predict_cli(capsys, "models:/lab@champion", "--tracking-uri", uri, str(tmp_path / "in.csv"))
    assert code == 0 and out == SEED_LINES


def test_a_database_tracking_store_that_stays_down_is_an_outage(tmp_path, monkeypatch, capsys):
    """#27.3: a PostgreSQL tracking store that stayed down through every retry exited 2 (bad input); an outage
    exits 1, as during a sweep. Nothing listens on port 9; the retries are shortened to two of 0.1 s."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWEEPLAB_RETRY_WAITS", "0.1,0.1")
    uri = "postgresql+psycopg://someone@127.0.0.1:9/mlflow"
    assert main(["run", str(ROOT / "experiments/training_loop_lab.yaml"), "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach the MLflow tracking store for 0 s" in err
    assert list(tmp_path.iterdir()) == []  # nothing written
