"""Any batch, any data size (issue #30): a GRU over variable-length sequences with the user's collate_fn and a
forward of two arguments, a two-input model with dict items (stacked), a memory-mapped data set read lazily by
DataLoader workers, and bad data as one line. Each is first the user's plain PyTorch loop, written here, then the
same in sweeplab; the curves must agree, the logged best metric must be what the best checkpoint scores in the
user's own class, and the champion must answer named inputs without sweeplab or the user's module."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from test_user_model import assert_refused_before_writing, write
from torch import nn
from torch.utils.data import DataLoader, Subset

from sweeplab.cli import main
from sweeplab.config import ConfigError, build_experiment, load_experiment
from sweeplab.train.engines import Job, choose, engine_named
from sweeplab.train.experiment import RunResult, run_experiment

from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rows_file  # noqa: E402
import two_inputs  # noqa: E402
import vowels  # noqa: E402


def plain_loop(model, train_loader, val_loader, optimizer, loss_fn, epochs):
    """The user's own loop: per-sample averaged losses, validation in eval mode under no_grad, accuracy."""
    curves = {"train_loss": [], "val_loss": [], "val_accuracy": []}
    for _ in range(epochs):
        model.train()
        total, n = 0.0, 0
        for inputs, target in train_loader:
            out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            loss = loss_fn(out, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(target)
            n += len(target)
        curves["train_loss"].append(total / n)
        model.eval()
        total, n, right = 0.0, 0, 0
        with torch.no_grad():
            for inputs, target in val_loader:
                out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
                total += loss_fn(out, target).item() * len(target)
                right += int((out.argmax(1) == target).sum())
                n += len(target)
        curves["val_loss"].append(total / n)
        curves["val_accuracy"].append(right / n)
    return curves


def vowels_config(folder: Path, **train) -> dict:
    shutil.copy(EXPERIMENTS / "vowels.py", folder / "vowels.py")
    shutil.copy(EXPERIMENTS / "japanese_vowels.yaml", folder / "jv.yaml")
    (folder / "data").mkdir(exist_ok=True)
    shutil.copy(EXPERIMENTS / "data" / "japanese_vowels.npz", folder / "data" / "japanese_vowels.npz")
    return load_experiment(folder / "jv.yaml", train)


def test_a_gru_with_its_collate_fn_trains_exactly_as_its_plain_pytorch_loop(tmp_path):
    config = vowels_config(tmp_path, **{"epochs": 3, "model.init_args.hidden": 16})
    result = run_experiment(config)
    # the user's script: the same seed, the archive's split, their DataLoaders with their collate_fn
    torch.manual_seed(0)
    parts = vowels.utterances()
    model = vowels.VowelGRU(n_classes=9, hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    shuffle = torch.Generator().manual_seed(7)  # train.shuffle_seed's default, as the seed's loop shuffles
    train = DataLoader(parts["train"], batch_size=32, shuffle=True, collate_fn=vowels.pad_batch, generator=shuffle)
    val = DataLoader(parts["val"], batch_size=32, collate_fn=vowels.pad_batch)  # a lazy set validates in batches
    curves = plain_loop(model, train, val, optimizer, nn.CrossEntropyLoss(), 3)
    history = result.history
    assert history.train_loss == pytest.approx(curves["train_loss"], rel=1e-6)
    assert history.val_loss == pytest.approx(curves["val_loss"], rel=1e-6)
    assert history.metrics["val_accuracy"] == pytest.approx(curves["val_accuracy"])
    assert result.dataset.lazy and result.spec.named_inputs == ["padded_x", "lengths"]
    assert curves["val_accuracy"][-1] > 0.5  # it learns: 9 speakers, chance is 0.15


@pytest.mark.slow
def test_a_sweep_of_the_gru_logs_what_its_checkpoints_score_and_its_champion_answers_by_name(tmp_path, monkeypatch):
    config_dir = tmp_path / "exp"
    config_dir.mkdir()
    vowels_config(config_dir)
    sweep = write(
        config_dir,
        "sweep.yaml",
        """\
        study: vowels_test
        experiment: jv.yaml
        engine: auto
        space:
          lr: {choices: [0.003, 0.02]}
        base: {train: {epochs: 3}, model: {init_args: {hidden: 16}}}
        sampler: {type: grid}
        n_trials: 2
        """,
    )
    uri = f"sqlite:///{tmp_path / 'vowels runs.db'}"
    assert main(["sweep", str(sweep), "--tracking-uri", uri, "--storage", f"journal:{tmp_path / 'o.journal'}"]) == 0
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("vowels_test")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "best_val_accuracy" in r.data.metrics]
    assert len(runs) == 2
    val = vowels.utterances()["val"]
    (padded, lengths), labels = vowels.pad_batch([val[i] for i in range(len(val))])
    for run in runs:  # the logged best equals what the best checkpoint scores in the user's own class
        path = client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(tmp_path))
        payload = torch.load(path, weights_only=True)
        model = vowels.VowelGRU(**payload["model_spec"]["init_args"])
        model.load_state_dict(payload["state_dict"])
        model.eval()
        with torch.no_grad():
            accuracy = int((model(padded, lengths).argmax(1) == labels).sum()) / len(labels)
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    # the champion in a process that can import neither sweeplab nor vowels (it travels with the model)
    champion = client.get_model_version_by_alias("vowels_test", "champion")
    path = client.download_artifacts(champion.run_id, "checkpoint/best.pt", str(tmp_path / "champ"))
    payload = torch.load(path, weights_only=True)
    model = vowels.VowelGRU(**payload["model_spec"]["init_args"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    with torch.no_grad():
        expected = model(padded[:5], lengths[:5]).argmax(1).tolist()
    request = {"padded_x": padded[:5].tolist(), "lengths": lengths[:5].tolist()}
    script = textwrap.dedent(
        f"""\
        import sys, json
        import importlib.util
        assert importlib.util.find_spec("vowels") is None  # not here: it travels with the model
        sys.modules["sweeplab"] = None  # any import of sweeplab now fails
        import numpy as np, mlflow
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/vowels_test@champion")
        request = json.loads({json.dumps(json.dumps(request))})
        labels = model.predict({{"padded_x": np.array(request["padded_x"]), "lengths": np.array(request["lengths"])}})
        names = [item["name"] for item in model.metadata.metadata["inputs"]["inputs"]]
        print(json.dumps({{"labels": np.asarray(labels).tolist(), "names": names}}))
        """
    )
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=empty, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["names"] == ["padded_x", "lengths"]
    assert out["labels"] == expected
    # `sweeplab predict` takes the same request as JSON, by name
    (tmp_path / "request.json").write_text(json.dumps(request))
    monkeypatch.chdir(empty)
    assert main(["predict", "models:/vowels_test@champion", str(tmp_path / "request.json"), "--tracking-uri", uri]) == 0


@pytest.mark.slow
def test_the_rebuilt_champion_is_served_by_mlflow_models_serve(tmp_path):
    config_dir = tmp_path / "exp"
    config_dir.mkdir()
    vowels_config(config_dir)
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    sweep = write(
        config_dir,
        "sweep.yaml",
        """\
        study: served_vowels
        experiment: jv.yaml
        space:
          lr: {choices: [0.02]}
        base: {train: {epochs: 2}, model: {init_args: {hidden: 8}}}
        sampler: {type: grid}
        n_trials: 1
        """,
    )
    assert main(["sweep", str(sweep), "--tracking-uri", uri, "--storage", f"journal:{tmp_path / 'o.journal'}"]) == 0
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/served_vowels@champion"]
    server = subprocess.Popen(
        [*command, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def post(body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    frames = np.random.default_rng(0).normal(size=(2, 9, 12)).round(3).tolist()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        ok = post({"inputs": {"padded_x": frames, "lengths": [9, 5]}})
        wrong = post({"inputs": {"padded_x": [[[0.1, 0.2]]], "lengths": [1]}})
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("served_vowels", "champion")
    payload = torch.load(
        client.download_artifacts(champion.run_id, "checkpoint/best.pt", str(tmp_path)), weights_only=True
    )
    model = vowels.VowelGRU(**payload["model_spec"]["init_args"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    with torch.no_grad():
        expected = model(torch.tensor(frames, dtype=torch.float32), torch.tensor([9, 5])).argmax(1).tolist()
    assert ok == (200, {"predictions": expected})
    # #36.6: the champion's own line, without MLflow's echo of the whole request before it
    assert (
        wrong[0] == 400 and wrong[1]["message"] == "input: padded_x has shape [1, 1, 2]; the model takes [N, any, 12]"
    )


TWO_SETTINGS = [
    {"optimizer": "Adam", "lr": 0.003},
    {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9},
    {"optimizer": "AdamW", "lr": 0.01, "weight_decay": 0.1},
    {"optimizer": "RMSprop", "lr": 0.001},
    {"optimizer": "Adam", "lr": 0.01, "clip_grad_norm": 0.5},
]


def two_input_configs(folder: Path) -> list:
    shutil.copy(EXPERIMENTS / "two_inputs.py", folder / "two_inputs.py")
    out = []
    for extra in TWO_SETTINGS:
        raw = {
            "task": "multiclass",
            "seed": 2,
            "data": {"source": "python", "class_path": "two_inputs.digits_two_inputs", "val_size": 0.2},
            "model": {"class_path": "two_inputs.ImageAndProfile", "init_args": {"channels": 4, "hidden": 8}},
            "train": {"epochs": 4, "batch_size": 64, **extra},
        }
        out.append(build_experiment(raw, "test", folder))
    return out


def test_a_two_input_model_with_dict_items_stacks_and_each_member_equals_its_reference_twin(tmp_path):
    assert choose(two_input_configs(tmp_path))[0] == "vectorized"
    reference = [Job(None, c) for c in two_input_configs(tmp_path)]
    stacked = [Job(None, c) for c in two_input_configs(tmp_path)]
    engine_named("reference").train(reference, None)
    engine_named("vectorized").train(stacked, None)
    for ref, vec in zip(reference, stacked):
        assert not isinstance(vec.result, RunResult)  # trained stacked, not sent to the reference loop
        a, b = ref.result.history, vec.result.history
        assert b.best_epoch == a.best_epoch
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-4)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
    finals = {round(job.result.history.val_loss[-1], 4) for job in reference}
    assert len(finals) == len(TWO_SETTINGS)  # the settings differ, so the comparison above could fail
    # and the reference loop is the user's plain loop: model(image=..., profile=...) on the dict's rows
    first = reference[0].result
    torch.manual_seed(2)
    inputs, labels = two_inputs.digits_two_inputs()
    model = two_inputs.ImageAndProfile(n_classes=10, channels=4, hidden=8)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(42))
    n_val = int(len(labels) * 0.2)
    train_idx, val_idx = perm[: len(labels) - n_val], perm[len(labels) - n_val :]
    items = [({k: torch.from_numpy(v[i]) for k, v in inputs.items()}, int(labels[i])) for i in range(len(labels))]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    shuffle = torch.Generator().manual_seed(7)
    train = DataLoader(Subset(items, train_idx.tolist()), batch_size=64, shuffle=True, generator=shuffle)
    val = DataLoader(Subset(items, val_idx.tolist()), batch_size=n_val)

    def dict_loop():
        def call(batch):
            return model(**batch)

        curves = []
        for _ in range(4):
            model.train()
            for batch, target in train:
                loss = nn.functional.cross_entropy(call(batch), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.no_grad():
                batch, target = next(iter(val))
                curves.append(nn.functional.cross_entropy(call(batch), target).item())
        return curves

    assert first.history.val_loss == pytest.approx(dict_loop(), rel=1e-5)


def test_a_memory_mapped_set_read_lazily_by_two_workers_trains_as_a_plain_dataloader_loop(tmp_path):
    rows_file.write_rows(tmp_path / "data", 4000)
    shutil.copy(ROOT / "benchmarks" / "rows_file.py", tmp_path / "rows_file.py")
    raw = {
        "task": "multiclass",
        "seed": 3,
        "data": {
            "source": "python",
            "class_path": "rows_file.RowFile",
            "init_args": {"folder": str(tmp_path / "data")},
            "num_workers": 2,
            "val_size": 0.1,
        },
        "model": {"hidden": 16},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.003},
    }
    config = build_experiment(raw, "test", tmp_path)
    engine, reason = choose([config])
    assert engine == "reference" and "read lazily through a DataLoader" in reason
    result = run_experiment(config)
    assert result.dataset.lazy and result.dataset.x_train is None  # never read into tensors
    torch.manual_seed(3)
    dataset = rows_file.RowFile(str(tmp_path / "data"))
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(42))
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.003)
    shuffle = torch.Generator().manual_seed(7)
    train = DataLoader(Subset(dataset, perm[:3600].tolist()), 128, shuffle=True, num_workers=2, generator=shuffle)
    val = DataLoader(Subset(dataset, perm[3600:].tolist()), batch_size=128, num_workers=2)
    curves = plain_loop(model, train, val, optimizer, nn.CrossEntropyLoss(), 2)
    assert result.history.train_loss == pytest.approx(curves["train_loss"], rel=1e-6)
    assert result.history.val_loss == pytest.approx(curves["val_loss"], rel=1e-6)


DOUBLED = """\
import numpy as np
import torch
from sklearn.datasets import load_digits


def digits(times=1.0):
    data = load_digits()
    return (data.data / 16.0 * times).astype(np.float32), data.target


def doubled(items):
    return torch.stack([x for x, _ in items]) * 2, torch.stack([torch.as_tensor(y) for _, y in items])
"""


def test_the_built_in_mlp_takes_the_shape_a_stacking_collate_fn_keeps_and_trains_as_on_data_made_so(tmp_path):
    """A collate_fn that keeps each item's shape (here it doubles the features) used to leave the built-in MLP
    without a feature count ("takes one tensor of features; the data gives [8, 64]"). Now it is sized from the
    items (64 features), and training through the collate_fn gives exactly the curves of the same data doubled by
    the loader itself (x * 2 is exact in float32), read through a DataLoader without one."""
    write(tmp_path, "doubling.py", DOUBLED)
    common = "task: multiclass\nmodel: {hidden: 16}\ntrain: {epochs: 3, batch_size: 64, lr: 0.01, loader: dataloader}\n"
    write(
        tmp_path,
        "a.yaml",
        common + "data: {source: python, class_path: doubling.digits, collate_fn: doubling.doubled}\n",
    )
    write(tmp_path, "b.yaml", common + "data: {source: python, class_path: doubling.digits, init_args: {times: 2.0}}\n")
    through_collate = run_experiment(load_experiment(tmp_path / "a.yaml"))
    made_so = run_experiment(load_experiment(tmp_path / "b.yaml"))
    assert through_collate.spec.in_features == 64 and through_collate.dataset.input_shape == (64,)
    assert through_collate.history.train_loss == made_so.history.train_loss
    assert through_collate.history.val_loss == made_so.history.val_loss
    assert through_collate.history.val_loss[-1] < through_collate.history.val_loss[0]


BAD_DATA = """\
import numpy as np
import torch


class Items(torch.utils.data.Dataset):
    def __init__(self, kind):
        self.kind = kind

    def __len__(self):
        return 20

    def __getitem__(self, i):
        if self.kind == "single":
            return torch.zeros(3)
        if self.kind == "ragged" and i % 2:
            return torch.zeros(4), 0
        if self.kind == "arrays":  # numpy inputs in a dict, of two lengths
            return {"a": np.zeros(3 + i % 2, dtype=np.float32)}, i % 2
        return torch.zeros(3), i % 2


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), 0


def stream():
    return Stream()


def broken_collate(items):
    raise ValueError("no padding for you")
"""


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            "class_path: bad.Items, init_args: {kind: single}",
            "bad.Items(): item 8 is Tensor; an item must be (inputs, target)",
        ),
        (
            "class_path: bad.Items, init_args: {kind: ragged}",
            "bad.Items(): item 3's inputs [4] differ from item 8's [3]",
        ),
        ("class_path: bad.Items, init_args: {kind: arrays}", "item 3's inputs {a: [4] float32} differ from item 8's"),
        ("class_path: bad.stream", "returned an IterableDataset"),
        (
            "class_path: bad.Items, init_args: {kind: fine}, collate_fn: bad.broken_collate",
            "data.collate_fn: collating items 0-7 raised ValueError: no padding for you",
        ),
    ],
)
def test_bad_data_is_one_line_naming_the_field_and_item_and_nothing_written(store, capsys, data, expected):
    write(store, "bad.py", BAD_DATA)
    write(store, "exp.yaml", f"task: binary\ndata: {{source: python, {data}, val_size: 10}}\n")
    assert_refused_before_writing(store, ["run", str(store / "exp.yaml")], expected, capsys)


LATE_BAD = """\
import torch


class Late(torch.utils.data.Dataset):
    \"\"\"60 items of 3 features; item `bad` has 4 (kind ragged), or holds 7s, which the collate_fn refuses.\"\"\"

    def __init__(self, bad, kind):
        self.bad, self.kind = bad, kind

    def __len__(self):
        return 60

    def __getitem__(self, i):
        if i == self.bad:
            return (torch.zeros(4), 1) if self.kind == "ragged" else (torch.full((3,), 7.0), 1)
        return torch.full((3,), i / 60), i % 2


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x)


def refuse_sevens(items):
    if any(float(x.max()) == 7.0 for x, _ in items):
        raise ValueError("a seven")
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["ragged", "refused"])
def test_an_item_the_pre_flight_did_not_read_fails_the_run_in_one_line_naming_its_index(store, capsys, kind, workers):
    """The pre-flight reads 8 validation and 2 training items. A bad item past those was found only mid-run, as
    `RuntimeError: stack expects each tensor to be equal size` (exit 1) that named no item. The bad item here is
    the training split's last (random_split's permutation of 60 by split_seed 0, worked out below), so the
    pre-flight cannot see it; read by the loop itself or by 2 DataLoader workers, it is named by its index in the
    user's Dataset, exit 2, and no run is left (it fails in the first epoch, before its run is started)."""
    n_train = 50
    bad = int(torch.randperm(60, generator=torch.Generator().manual_seed(0))[n_train - 1])
    write(store, "late.py", LATE_BAD)
    collate = ", collate_fn: late.refuse_sevens" if kind == "refused" else ""
    write(
        store,
        "exp.yaml",
        f"task: binary\ndata: {{source: python, class_path: late.Late, init_args: {{bad: {bad}, kind: {kind}}}, "
        f"val_size: 10, num_workers: {workers}{collate}}}\nmodel: {{class_path: late.Net}}\n"
        "train: {epochs: 2, batch_size: 8}\n",
    )
    uri = f"sqlite:///{store}/runs.db"
    assert main(["run", str(store / "exp.yaml"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    if kind == "ragged":
        pattern = (
            rf"sweeplab: error: data.class_path: late.Late\(\) \(training split\): item {bad}'s inputs \[4\] "
            rf"differ from item \d+'s \[3\] \(give data.collate_fn to batch items of different shapes\)"
        )
    else:
        line = LATE_BAD.splitlines().index('        raise ValueError("a seven")') + 1
        pattern = rf"sweeplab: error: data.collate_fn: collating items [\d, ]*\b{bad}\b[\d, ]* raised ValueError: a seven \(late.py line {line}\)"
    assert re.fullmatch(pattern, err[0]), err[0]
    client = MlflowClient(uri)  # the run starts once its first epoch has trained: no half-written run
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.slow
def test_a_two_input_champion_answers_by_name_without_sweeplab_or_the_users_module(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    shutil.copy(EXPERIMENTS / "two_inputs.py", folder / "two_inputs.py")
    shutil.copy(EXPERIMENTS / "two_inputs.yaml", folder / "two_inputs.yaml")
    sweep = write(
        folder,
        "sweep.yaml",
        """\
        study: two_inputs_test
        experiment: two_inputs.yaml
        base: {train: {epochs: 2}}
        space:
          lr: {choices: [0.003, 0.01]}
        sampler: {type: grid}
        n_trials: 2
        """,
    )
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    assert main(["sweep", str(sweep), "--tracking-uri", uri, "--storage", f"journal:{tmp_path / 'o.journal'}"]) == 0
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("two_inputs_test", "champion")
    payload = torch.load(
        client.download_artifacts(champion.run_id, "checkpoint/best.pt", str(tmp_path)), weights_only=True
    )
    model = two_inputs.ImageAndProfile(**payload["model_spec"]["init_args"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    inputs, labels = two_inputs.digits_two_inputs()
    with torch.no_grad():
        expected = model(torch.from_numpy(inputs["image"][:6]), torch.from_numpy(inputs["profile"][:6]))
    request = {name: value[:6].astype("float64").tolist() for name, value in inputs.items()}
    script = textwrap.dedent(
        f"""\
        import sys, json
        import importlib.util
        assert importlib.util.find_spec("two_inputs") is None
        sys.modules["sweeplab"] = None
        import numpy as np, mlflow
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/two_inputs_test@champion")
        request = json.loads({json.dumps(json.dumps(request))})
        arrays = {{name: np.array(value) for name, value in request.items()}}
        labels = model.predict(arrays)
        proba = model.predict(arrays, params={{"output": "probabilities"}})
        single = {{name: value.astype("float32") for name, value in arrays.items()}}
        refused = {{}}
        for case, bad in (("extra", {{**arrays, "extra": arrays["profile"]}}),
                          ("bools", {{**arrays, "profile": arrays["profile"] > 0}})):
            try:
                model.predict(bad)
                refused[case] = "accepted"
            except Exception as exc:
                refused[case] = str(exc)
        print(json.dumps({{"labels": np.asarray(labels).tolist(), "proba": proba.to_numpy().tolist(),
                          "float32": np.asarray(model.predict(single)).tolist(), "refused": refused,
                          "schema": model.metadata.signature.inputs is None}}))
        """
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["labels"] == expected.argmax(1).tolist()
    assert np.allclose(out["proba"], torch.softmax(expected.double(), 1).numpy(), atol=1e-5)
    # #36.6/7: float32 arrays as well as float64 (no TensorSpec to refuse one of them); an unknown input and
    # booleans are refused in one line
    assert out["float32"] == out["labels"] and out["schema"]
    assert out["refused"]["extra"] == "input: unknown extra (the model takes image, profile)"
    assert out["refused"]["bools"] == "input: profile holds booleans; the model takes numbers (float32)"


def test_a_small_dataset_of_two_inputs_is_read_into_memory_and_stacks(store):
    """#40: the two-input digits as a map-style Dataset (no targets, no class count) train exactly as the same data
    given as arrays (the reference loop, bit for bit), and their trials stack."""
    from mlflow import MlflowClient

    from sweeplab.cli import main
    from sweeplab.config import load_experiment
    from sweeplab.train.engines import choose
    from sweeplab.train.experiment import run_experiment

    items = load_experiment(ROOT / "experiments" / "two_inputs_dataset.yaml", {"epochs": 3})
    arrays = load_experiment(ROOT / "experiments" / "two_inputs.yaml", {"epochs": 3})
    a, b = run_experiment(items), run_experiment(arrays)
    assert not a.dataset.lazy and "read into memory" in a.dataset.description and a.dataset.n_outputs == 10
    assert a.history.train_loss == b.history.train_loss and a.history.val_loss == b.history.val_loss
    assert choose([items])[0] == "vectorized"
    (store / "s.yaml").write_text(
        f"study: items\nexperiment: {ROOT / 'experiments' / 'two_inputs_dataset.yaml'}\nbase: {{train: {{epochs: 2}}}}\n"
        "space:\n  lr: {choices: [0.001, 0.003]}\nsampler: {type: grid}\nn_trials: 2\n"
    )
    uri = f"sqlite:///{store / 'i.db'}"
    assert main(["sweep", str(store / "s.yaml"), "--tracking-uri", uri, "--quiet", "--no-report"]) == 0
    client = MlflowClient(uri)
    trials = client.search_runs(
        [client.get_experiment_by_name("items").experiment_id], "tags.`sweeplab.role` = 'trial'"
    )
    assert {t.data.tags["sweeplab.stacked_members"] for t in trials} == {"2"}


NO_TARGETS = """\
import torch
import vowels


class Unlabelled(torch.utils.data.Dataset):
    \"\"\"The archive's utterances as a plain PyTorch user writes a Dataset: no `targets`, no class count. Item
    `bad` says speaker 12 (there are 9).\"\"\"

    def __init__(self, utterances, bad=None):
        self.utterances, self.bad = utterances, bad

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, i):
        frames, speaker = self.utterances[i]
        return frames, (torch.tensor(12) if i == self.bad else speaker)


def unlabelled(bad=None, bad_val=None):
    parts = vowels.utterances()
    return {"train": Unlabelled(parts["train"], bad), "val": Unlabelled(parts["val"], bad_val)}


class Speakers(vowels.VowelGRU):
    \"\"\"Its head says 9 speakers: what a plain PyTorch script hard-codes.\"\"\"

    def __init__(self, hidden=32):
        super().__init__(9, hidden=hidden)
"""


def unlabelled_config(folder: Path, **overrides) -> dict:
    vowels_config(folder)
    write(folder, "unlabelled.py", NO_TARGETS)
    overrides = {"data.class_path": "unlabelled.unlabelled", "model.class_path": "unlabelled.Speakers", **overrides}
    return load_experiment(folder / "jv.yaml", {"epochs": 3, "model.init_args.hidden": 16, **overrides})


def test_a_dataset_without_labels_or_a_class_count_takes_it_from_the_models_output_width(tmp_path):
    """#40: the GRU's Dataset with no `targets` and no data.n_classes trains on the number of classes its model's
    head gives (9), exactly as the user's plain loop with the same head (test above's), and its run says 9."""
    config = unlabelled_config(tmp_path)
    result = run_experiment(config)
    torch.manual_seed(0)
    parts = vowels.utterances()
    model = vowels.VowelGRU(n_classes=9, hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    shuffle = torch.Generator().manual_seed(7)
    train = DataLoader(parts["train"], batch_size=32, shuffle=True, collate_fn=vowels.pad_batch, generator=shuffle)
    val = DataLoader(parts["val"], batch_size=32, collate_fn=vowels.pad_batch)
    curves = plain_loop(model, train, val, optimizer, nn.CrossEntropyLoss(), 3)
    assert result.dataset.lazy and result.dataset.y_train is None and result.dataset.n_classes == 9
    assert result.history.train_loss == pytest.approx(curves["train_loss"], rel=1e-6)
    assert result.history.val_loss == pytest.approx(curves["val_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (  # the constructor needs the count itself: nothing to read it from
            {"model.class_path": "vowels.VowelGRU"},
            "data.n_classes: model.class_path: vowels.VowelGRU() takes n_classes, and nothing says how many classes "
            "there are (the Dataset has no `targets`): give data.n_classes, or model.init_args.n_classes",
        ),
        (  # validation item 3 (the pre-flight reads the first 8) says 12 against the model's 9
            {"data.init_args": {"bad_val": 3}},
            "data.class_path: unlabelled.unlabelled(): item 3's target 12 is outside the 9 classes (0..8)",
        ),
    ],
)
def test_a_class_count_nothing_gives_or_a_label_outside_it_is_one_line(tmp_path, overrides, expected):
    config = unlabelled_config(tmp_path, **overrides)
    with pytest.raises(ConfigError) as refused:
        run_experiment(config)
    assert str(refused.value) == expected


def test_a_label_outside_the_models_classes_read_mid_run_is_named_by_its_item_and_nothing_written(store, capsys):
    """Item 200 of the training split says speaker 12: the pre-flight reads 2 training items, so the loop meets
    it, and says which item in one line (the loss's IndexError named none), exit 2, no run left."""
    unlabelled_config(store, **{"data.init_args": {"bad": 200}})
    write(
        store,
        "exp.yaml",
        "task: multiclass\ndata: {source: python, class_path: unlabelled.unlabelled, init_args: {bad: 200}, "
        "collate_fn: vowels.pad_batch}\nmodel: {class_path: unlabelled.Speakers, init_args: {hidden: 8}}\n"
        "train: {epochs: 1, batch_size: 32}\n",
    )
    uri = f"sqlite:///{store}/runs.db"
    assert main(["run", str(store / "exp.yaml"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "sweeplab: error: data.class_path: unlabelled.unlabelled() (training split): item 200's target 12 is "
        "outside the 9 classes (0..8)"
    ]
    client = MlflowClient(uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
