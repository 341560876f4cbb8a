"""The champion through MLflow's own clients (issue #19, items 2, 3 and 6): `mlflow.pyfunc.load_model` in a process
that cannot import sweeplab, and `mlflow models serve --env-manager local` over HTTP. A classifier's champion
answers in labels (probabilities on request), named columns are read by name, bad input is refused; the
expected numbers are the checkpoint's own weights put through a hand-written forward pass here."""

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from sweeplab.cli import main

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
ROWS = [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0], [2.0, -3.0]]


def one_trial_sweep(folder: Path, study: str, task: str) -> Path:
    path = folder / f"{study}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        study: {study}
        experiment: {ROOT / "experiments/training_loop_lab.yaml"}
        base: {{task: {task}, train: {{epochs: 12}}}}
        space:
          hidden: {{choices: [8]}}
        sampler: {{type: grid}}
        n_trials: 1
        """)
    )
    return path


@pytest.fixture(scope="module")
def champions(tmp_path_factory):
    """A binary, a multiclass and a regression sweep of one trial each, in a store not named mlflow.db."""
    tmp = tmp_path_factory.mktemp("champions")
    uri = f"sqlite:///{tmp}/classifiers.db"
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        for study, task in (
            ("binary_lab", "binary"),
            ("multiclass_lab", "multiclass"),
            ("regression_lab", "regression"),
        ):
            assert (
                main(["sweep", str(one_trial_sweep(tmp, study, task)), "--quiet", "--no-report", "--tracking-uri", uri])
                == 0
            )
    finally:
        os.chdir(cwd)
    return tmp, uri, MlflowClient(uri, registry_uri=uri)


def logits_by_hand(client: MlflowClient, study: str, folder: Path, rows=ROWS) -> torch.Tensor:
    """The champion's checkpoint through relu(x W0' + b0) W2' + b2, written out here."""
    version = client.get_model_version_by_alias(study, "champion")
    path = client.download_artifacts(version.run_id, "checkpoint/best.pt", str(folder))
    state = torch.load(path, weights_only=True)["state_dict"]
    x = torch.tensor(rows, dtype=torch.float64)
    hidden = torch.relu(x @ state["net.0.weight"].double().T + state["net.0.bias"].double())
    return hidden @ state["net.2.weight"].double().T + state["net.2.bias"].double()


def probabilities_by_hand(logits: torch.Tensor, task: str) -> list[list[float]]:
    if task == "binary":
        p1 = 1 / (1 + torch.exp(-logits[:, 0]))
        return torch.stack([1 - p1, p1], dim=1).tolist()
    e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return (e / e.sum(dim=1, keepdim=True)).tolist()


def without_sweeplab(folder: Path, body: str) -> dict:
    """Run `body` in a fresh interpreter where `import sweeplab` fails; it prints one JSON line."""
    script = "import sys\nsys.modules['sweeplab'] = None  # any import of sweeplab now fails\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("study, task", [("binary_lab", "binary"), ("multiclass_lab", "multiclass")])
def test_a_classifier_champion_gives_labels_and_probabilities_on_request(champions, tmp_path, study, task):
    folder, uri, client = champions
    out = without_sweeplab(
        folder,
        f"""\
        import json, numpy as np, pandas as pd, mlflow
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/{study}@champion")
        rows = {ROWS!r}
        labels = np.asarray(model.predict(np.array(rows))).tolist()
        proba = model.predict(pd.DataFrame(rows, columns=["x1", "x2"]), params={{"output": "probabilities"}})
        print(json.dumps({{"labels": labels, "proba": proba.to_numpy().tolist(), "columns": list(proba.columns),
                          "meta": model.metadata.metadata}}))
        """,
    )
    expected = probabilities_by_hand(logits_by_hand(client, study, tmp_path), task)
    classes = 2 if task == "binary" else 3
    assert out["columns"] == [str(c) for c in range(classes)]
    assert out["labels"] == [max(range(classes), key=row.__getitem__) for row in expected]
    for got, want in zip(out["proba"], expected):
        assert got == pytest.approx(want, abs=1e-6)
    assert out["meta"]["task"] == task and out["meta"]["classes"] == list(range(classes))
    assert out["meta"]["feature_names"] == ["x1", "x2"]


@pytest.mark.slow
def test_named_columns_are_read_by_name_and_bad_input_is_refused(champions, tmp_path):
    folder, uri, client = champions
    out = without_sweeplab(
        folder,
        f"""\
        import json, numpy as np, pandas as pd, mlflow
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/binary_lab@champion")
        proba = lambda x: model.predict(x, params={{"output": "probabilities"}}).to_numpy()[:, 1].tolist()
        rows = {ROWS!r}
        out = {{"swapped": proba(pd.DataFrame({{"x2": [r[1] for r in rows], "x1": [r[0] for r in rows]}})),
               "ints": proba([[1, 2], [-1, 0]]), "array": proba(np.array(rows, dtype=np.float32))}}
        errors = {{}}
        for name, bad in {{"extra": pd.DataFrame({{"x1": [1.0], "x2": [2.0], "x3": [0.0]}}),
                          "missing": pd.DataFrame({{"x1": [1.0]}}), "nan": np.array([[np.nan, 1.0]]),
                          "inf": [[1.0, float("inf")]], "text": pd.DataFrame({{"x1": ["a"], "x2": [1.0]}}),
                          "width": [[1.0, 2.0, 3.0]], "param": None}}.items():
            try:
                if name == "param":
                    model.predict([[1.0, 2.0]], params={{"output": "logits"}})
                else:
                    model.predict(bad)
                errors[name] = "accepted"
            except Exception as exc:
                errors[name] = str(exc)
        out["errors"] = errors
        print(json.dumps(out))
        """,
    )
    p1 = [row[1] for row in probabilities_by_hand(logits_by_hand(client, "binary_lab", tmp_path), "binary")]
    assert out["swapped"] == pytest.approx(p1, abs=1e-6)  # by name: x2 given first is still x2
    assert out["array"] == pytest.approx(p1, abs=1e-6)
    ints = [
        row[1]
        for row in probabilities_by_hand(
            logits_by_hand(client, "binary_lab", tmp_path / "i", [[1.0, 2.0], [-1.0, 0.0]]), "binary"
        )
    ]
    assert out["ints"] == pytest.approx(ints, abs=1e-6)
    errors = out["errors"]
    assert "unknown column(s) x3 (the model takes x1, x2)" in errors["extra"]
    assert "missing column(s) x2" in errors["missing"]
    assert "column x1: 'nan' is not a finite number" in errors["nan"]
    assert "column x2: 'inf' is not a finite number" in errors["inf"]
    assert "column x1: 'a' is not a number" in errors["text"]
    assert "rows of 3 values; the model takes 2" in errors["width"]
    assert "params.output: 'logits'" in errors["param"]
    assert all("\n" not in message for message in errors.values())


@pytest.mark.slow
def test_mlflow_models_serve_reads_csv_columns_by_name_and_refuses_nan(champions, tmp_path):
    folder, uri, client = champions
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/multiclass_lab@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def post(body: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        csv = "x2,x1\n" + "".join(f"{x2},{x1}\n" for x1, x2 in ROWS)
        status, labels = post(csv.encode(), "text/csv")
        status_p, proba = post(
            json.dumps(
                {
                    "dataframe_split": {"columns": ["x2", "x1"], "data": [[x2, x1] for x1, x2 in ROWS]},
                    "params": {"output": "probabilities"},
                }
            ).encode(),
            "application/json",
        )
        status_bad, bad = post(b"x1,x2\n1.0,NaN\n", "text/csv")
        # #27.6: no rows is one answer however it is sent; a row nested once more is not a row
        empty = [
            post(json.dumps(body).encode(), "application/json")
            for body in ({"inputs": []}, {"dataframe_split": {"columns": ["x1", "x2"], "data": []}})
        ]
        nested = post(json.dumps({"inputs": [[[1.0, 2.0]]]}).encode(), "application/json")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    expected = probabilities_by_hand(logits_by_hand(client, "multiclass_lab", tmp_path), "multiclass")
    assert status == 200 and labels["predictions"] == [max(range(3), key=row.__getitem__) for row in expected]
    assert status_p == 200
    for got, want in zip(proba["predictions"], expected):
        assert [got[str(c)] for c in range(3)] == pytest.approx(want, abs=1e-6)
    assert status_bad == 400 and "column x2: 'nan' is not a finite number" in bad["message"]
    assert [code for code, _ in empty] == [400, 400], empty
    assert nested[0] == 400 and "an array of shape [1, 1, 2]; the model takes rows of 2 values" in nested[1]["message"]


@pytest.mark.slow
def test_a_regression_champion_refuses_what_it_cannot_answer_in_json(champions):
    """#27.6: [[1e308, 1e308]] and [[1e39, 1]] were answered with NaN/Infinity (HTTP 200, not JSON), [[[1, 2]]] as
    [[1, 2]], and params={"output": ...} was ignored."""
    folder, uri, _ = champions
    out = without_sweeplab(
        folder,
        f"""\
        import json, mlflow
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/regression_lab@champion")
        errors = {{}}
        for name, bad, params in (("huge", [[1e308, 1e308]], None), ("float32", [[1e39, 1.0]], None),
                                  ("nested", [[[1.0, 2.0]]], None), ("param", [[1.0, 2.0]], {{"output": "labels"}}),
                                  ("bools", [[True, False]], None), ("text", [[1.0, "2"]], None)):
            try:
                model.predict(bad, params=params)
                errors[name] = "accepted"
            except Exception as exc:
                errors[name] = str(exc)
        ok = model.predict([[1.0, 2.0]], params={{"output": "values"}}).tolist()
        print(json.dumps({{"errors": errors, "ok": ok}}))
        """,
    )
    errors = out["errors"]
    assert (
        errors["huge"] == "input: row 0, column x1: '1e+308' is not a finite number (NaN, infinity, or beyond float32)"
    )
    assert (
        errors["float32"]
        == "input: row 0, column x1: '1e+39' is not a finite number (NaN, infinity, or beyond float32)"
    )
    assert errors["nested"] == "input: an array of shape [1, 1, 2]; the model takes rows of 2 values"
    assert errors["param"] == "params.output: 'labels'; a regression model gives values"
    # #36.6: answered 200 before (numpy reads True as 1.0 and "2" as 2.0)
    assert errors["bools"] == "input: row 0, column x1: 'True' is not a number"
    assert errors["text"] == "input: row 0, column x2: '2' is not a number"
    assert len(out["ok"]) == 1 and len(out["ok"][0]) == 1


def test_sweeplab_predict_prints_the_probability_of_the_label_it_prints(champions, tmp_path, capsys):
    _, uri, client = champions
    assert main(["predict", "models:/binary_lab@champion", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]]
    expected = probabilities_by_hand(logits_by_hand(client, "binary_lab", tmp_path, rows), "binary")
    assert lines == [f"x={row} -> label={int(p[1] > 0.5)} p={max(p):.2f}" for row, p in zip(rows, expected)]


def test_the_logged_model_names_its_registered_version(champions):
    _, _, client = champions
    version = client.get_model_version_by_alias("binary_lab", "champion")
    experiment = client.get_experiment_by_name("binary_lab").experiment_id
    (logged,) = [m for m in client.search_logged_models([experiment]) if m.artifact_location == version.source]
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "binary_lab", "version": version.version}]
    assert logged.source_run_id == version.run_id


@pytest.mark.slow
def test_a_csv_of_twelve_thousand_columns_gets_its_champion(store, capsys):
    """#19.7: the version's spec tag held every feature name and went past MLflow's 100,000 characters, so a wide
    CSV never got a champion, on every re-run."""
    import numpy as np
    import pandas as pd

    x = np.random.default_rng(0).normal(size=(10, 12_000))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(12_000)]).assign(y=2 * x[:, 0])
    frame.to_csv(store / "wide.csv", index=False)
    (store / "e.yaml").write_text("data: {source: csv, path: wide.csv, target: y, val_size: 3}\ntrain: {epochs: 2}\n")
    (store / "s.yaml").write_text(
        "study: wide\nexperiment: e.yaml\nspace:\n  hidden: {choices: [2]}\nsampler: {type: grid}\nn_trials: 1\n"
    )
    assert main(["sweep", str(store / "s.yaml"), "--quiet", "--no-report"]) == 0
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    version = client.get_model_version_by_alias("wide", "champion")
    assert json.loads(version.tags["sweeplab.model_spec"])["feature_names"] == "12000 names, in model.json"


def test_two_sweeps_ending_at_once_register_the_champion_once(champions):
    """#19.7: two sweeps on one study registered the same run as versions 1 and 2; one printed "version 1" while
    the alias pointed to 2."""
    import threading

    from sweeplab.sweep.ledger import TrialSummary
    from sweeplab.track.champion import register_champion
    from sweeplab.track.tracker import Tracker

    _, uri, client = champions
    run_id = client.get_model_version_by_alias("binary_lab", "champion").run_id
    experiment = client.get_experiment_by_name("binary_lab").experiment_id
    best = TrialSummary(0, 0.5, run_id, 3, {})
    start, results = threading.Barrier(2), []

    def register() -> None:
        tracker = Tracker(uri)
        start.wait()
        results.append(register_champion(tracker, best, "binary_lab", experiment, alias="twice"))

    threads = [threading.Thread(target=register) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alias = client.get_model_version_by_alias("binary_lab", "twice").version
    assert sorted(r.new for r in results) == [False, True] and {r.version for r in results} == {alias}
    assert len(client.search_model_versions(f"name = 'binary_lab' and run_id = '{run_id}'")) == 2  # champion, twice


def test_an_export_cut_short_leaves_no_pending_logged_model_after_the_rerun(store, monkeypatch, lab_path):
    """#19.7: a full disk failed the export and then the write marking it FAILED; the re-run left the PENDING
    logged model beside its READY one."""
    import sweeplab.track.champion as champion

    (store / "s.yaml").write_text(
        f"study: full\nexperiment: {lab_path}\nspace: {{hidden: {{choices: [4]}}}}\n"
        "sampler: {type: grid}\nn_trials: 1\n"
    )

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(champion, "save_pyfunc_model", full)
        patched.setattr(MlflowClient, "finalize_logged_model", full)
        assert main(["sweep", str(store / "s.yaml"), "epochs=2", "--quiet", "--no-report"]) == 1
    assert main(["sweep", str(store / "s.yaml"), "epochs=2", "--quiet", "--no-report"]) == 0
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    models = client.search_logged_models([client.get_experiment_by_name("full").experiment_id])
    assert [str(m.status) for m in models] == ["READY"]
