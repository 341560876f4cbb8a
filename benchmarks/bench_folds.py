"""k-fold cross-validation's cost (`data.folds: 5`): folds stacked against folds one by one, side by side in one run.

Runs the search of sweeps/wine_cv.yaml (16 trials, each 5 folds of the 130 training wines: 80 fold members; its
`confirm:` left out) with `engine=vectorized` (every batch's folds stacked as members of its groups) and with
`engine=reference` (each fold trained after the other), each in a fresh folder, and reads the search's span from its
trial runs' start and end times in MLflow. The same trials without folds (`data.folds=null`) give what 5 folds cost
on each engine. Prints the spans and the ratios. Usage: python benchmarks/bench_folds.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "wine_cv.yaml"


def search_span(engine: str, folds: bool) -> tuple[float, int]:
    """(seconds from the first trial run's start to the last one's end, trial runs) of the search with `engine`."""
    with tempfile.TemporaryDirectory(prefix="bench-folds-") as folder:
        uri = f"sqlite:///{Path(folder) / 'runs.db'}"
        settings = [f"engine={engine}", "confirm=null", *([] if folds else ["data.folds=null"])]
        command = [sys.executable, "-m", "sweeplab", "sweep", str(SWEEP), *settings, "--quiet", "--no-report"]
        subprocess.run([*command, "--tracking-uri", uri], cwd=folder, check=True, capture_output=True)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("wine_cv").experiment_id
        runs = client.search_runs([experiment], "tags.`sweeplab.role` = 'trial'", max_results=1000)
        return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000, len(runs)


def main() -> None:
    spans = {
        (engine, folds): search_span(engine, folds) for engine in ("vectorized", "reference") for folds in (True, False)
    }
    for (engine, folds), (seconds, trials) in spans.items():
        print(f"{engine:10s} {'5 folds' if folds else 'no folds':8s} search {seconds:6.2f} s ({trials} trials)")
    for engine in ("vectorized", "reference"):
        print(
            f"{engine}: 5 folds cost {spans[engine, True][0] / spans[engine, False][0]:5.2f}x the search without folds"
        )
    print(f"5 folds, one by one / stacked: {spans['reference', True][0] / spans['vectorized', True][0]:5.2f}x")


if __name__ == "__main__":
    main()
