"""`make sweep` as shipped, this checkout against another one (a commit before a change), alternating.

Each run is `python -m sweeplab sweep sweeps/optimizer_hidden_noise.yaml` (40 trials, TPE, `engine: auto`, report
and two champions), whole process, in a fresh folder, the other checkout's source first on PYTHONPATH (same venv,
same packages). It prints each pair's times, the medians and their ratio, and whether both found the same trials
(every trial's params, state and value, per condition) and the same best trials.

Usage: git worktree add /tmp/before HEAD~1 && python benchmarks/bench_against.py /tmp/before [PAIRS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "sweeps/optimizer_hidden_noise.yaml"
TRIALS = """
import json, sys, optuna
from optuna.storages.journal import JournalFileBackend
storage = optuna.storages.JournalStorage(JournalFileBackend(sys.argv[1]))
out = {}
for summary in sorted(optuna.get_all_study_summaries(storage), key=lambda s: s.study_name):
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials = [(t.number, t.params, t.state.name, t.value) for t in study.trials]
    out[summary.study_name] = {"trials": trials, "best": study.best_trial.number}
print(json.dumps(out, sort_keys=True))
"""


def one_sweep(checkout: Path) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="sweeplab-against-") as folder:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sweeplab", "sweep", str(checkout / SWEEP), "--quiet"],
            cwd=folder,
            env=env,
            check=True,
            capture_output=True,
        )
        seconds = time.perf_counter() - started
        found = subprocess.run(
            [sys.executable, "-c", TRIALS, str(Path(folder) / "optuna.journal")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return seconds, json.loads(found)


def main() -> None:
    other = Path(sys.argv[1]).resolve()
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    ours, theirs, same = [], [], True
    for pair in range(pairs):
        order = [(ROOT, ours), (other, theirs)] if pair % 2 else [(other, theirs), (ROOT, ours)]
        found = {}
        for checkout, times in order:
            seconds, trials = one_sweep(checkout)
            times.append(seconds)
            found[checkout] = trials
        same &= found[ROOT] == found[other]
        print(f"pair {pair + 1}: this checkout {ours[-1]:.2f} s, {other} {theirs[-1]:.2f} s", flush=True)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(
        f"median: this checkout {statistics.median(ours):.2f} s ({min(ours):.2f}-{max(ours):.2f}), other "
        f"{statistics.median(theirs):.2f} s ({min(theirs):.2f}-{max(theirs):.2f}); ratio {ratio:.3f}"
    )
    print("same trials and bests in every pair:", same)


if __name__ == "__main__":
    main()
