"""Two workers against one on the distributed path: Optuna's RDB storage on PostgreSQL and an MLflow tracking
server backed by it, both started here on 127.0.0.1 (Debian's postgresql package must be installed).

Each side runs a 40-trial sweep of the lab's model (80 epochs) as `sweeplab worker` processes started together;
reported: whole wall time and the trial phase (first trial run start to last trial run end, from MLflow).
Usage: python benchmarks/bench_cluster.py [N_TRIALS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import PASSWORD, start_mlflow_server, start_postgres  # noqa: E402


def run_workers(n_workers: int, study: str, n_trials: int, folder: Path, env: dict[str, str]) -> tuple[float, float]:
    sweep = folder / f"{study}.yaml"
    sweep.write_text(
        f"study: {study}\nexperiment: {ROOT / 'experiments/training_loop_lab.yaml'}\nspace:\n"
        "  optimizer: {choices: [Adam, AdamW, SGD, RMSprop]}\n  lr: {low: 0.0001, high: 0.3, log: true}\n"
        "  hidden: {choices: [4, 8, 16, 32, 64]}\n  noise: {choices: [0.3, 1.0]}\n"
        f"sampler: {{type: random, seed: 0}}\nn_trials: {n_trials}\nengine: reference\n"
    )
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeplab", "worker", str(sweep), "--worker-index", str(i), "--quiet"],
            cwd=folder,
            env={**env, "OMP_NUM_THREADS": "1"},
        )
        for i in range(n_workers)
    ]
    for proc in procs:
        assert proc.wait() == 0
    whole = time.perf_counter() - start
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [
        r
        for r in client.search_runs([client.get_experiment_by_name(study).experiment_id], max_results=1000)
        if r.data.tags.get("sweeplab.role") == "trial" and r.info.status == "FINISHED"
    ]
    assert len(runs) == n_trials, len(runs)
    phase = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    return whole, phase


def main() -> None:
    n_trials = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    postgres = start_postgres()
    server = None
    try:
        postgres.create_database("mlflow")
        postgres.create_database("optuna")
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        env.pop("MLFLOW_TRACKING_URI", None)
        with tempfile.TemporaryDirectory() as folder:
            server = start_mlflow_server(postgres.url("mlflow"), Path(folder), env)
            env.update(MLFLOW_TRACKING_URI=server.url, SWEEPLAB_STORAGE=postgres.url("optuna"))
            one = run_workers(1, "one", n_trials, Path(folder), env)
            two = run_workers(2, "two", n_trials, Path(folder), env)
    finally:
        if server:
            server.stop()
        postgres.destroy()
    print(f"{n_trials}-trial sweep on PostgreSQL + mlflow server   whole wall    trial phase")
    print(f"1 worker                                        {one[0]:8.2f} s   {one[1]:8.2f} s")
    print(f"2 workers                                       {two[0]:8.2f} s   {two[1]:8.2f} s")
    print(f"speed-up: whole {one[0] / two[0]:4.2f}x, trial phase {one[1] / two[1]:4.2f}x (goal >= 1.6x)")


if __name__ == "__main__":
    main()
