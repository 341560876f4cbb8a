"""Does `engine: auto` buy its speed with a worse search? The default sweep over 5 sampler seeds, run by the
reference engine (TPE asked one trial at a time) and by `auto` (here: the vectorized engine, TPE asked in a
start-up batch and then LEARNING_ROUNDS batches), each in a fresh folder, whole process, report off. Prints, per
noise level, the best best_val_loss each run found, their medians over the seeds, and the wall times."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "optimizer_hidden_noise.yaml"
SEEDS = range(5)
CONDITIONS = ("0.3", "1.0")


def run(engine: str, seed: int) -> tuple[dict[str, float], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SWEEPLAB_STORAGE")}
    with tempfile.TemporaryDirectory(prefix="sweeplab-auto-") as tmp:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sweeplab",
                "sweep",
                str(SWEEP),
                f"engine={engine}",
                f"sampler.seed={seed}",
                "--quiet",
                "--no-report",
            ],
            cwd=tmp,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(Path(tmp) / "optuna.journal")))
        best = {
            noise: optuna.load_study(study_name=f"optimizer_hidden_noise[noise={noise}]", storage=storage).best_value
            for noise in CONDITIONS
        }
    return best, seconds


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = {"reference": [], "auto": []}
    for seed in SEEDS:
        for engine in rows:  # alternately, so the machine's drift hits both alike
            rows[engine].append(run(engine, seed))
            best, seconds = rows[engine][-1]
            print(
                f"seed {seed} {engine:9s} "
                + "  ".join(f"noise {n}: {best[n]:.4f}" for n in CONDITIONS)
                + f"  {seconds:.1f} s",
                flush=True,
            )
    print(
        "\n| engine | "
        + " | ".join(f"best_val_loss, noise {n} (5 seeds; median)" for n in CONDITIONS)
        + " | whole process (median) |"
    )
    print("|---|" + "---|" * (len(CONDITIONS) + 1))
    for engine, results in rows.items():
        cells = []
        for noise in CONDITIONS:
            values = [best[noise] for best, _ in results]
            cells.append(", ".join(f"{v:.4f}" for v in values) + f"; **{statistics.median(values):.4f}**")
        print(f"| {engine} | " + " | ".join(cells) + f" | {statistics.median(s for _, s in results):.1f} s |")


if __name__ == "__main__":
    main()
