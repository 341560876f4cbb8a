"""The confirmation's cost (`confirm: {top, seeds}`): its repeats' wall time against the search's, stacked and on the
reference loop, side by side in one run.

Runs sweeps/breast_cancer_confirmed.yaml (16 trials, then the top 3 over 4 more seeds: 12 repeats) with
`engine=vectorized` and with `engine=reference`, each in a fresh folder, and reads each phase's span from its runs'
start and end times in MLflow (the search: the trial runs; the confirmation: the repeat runs). Prints the spans and
the ratios. Usage: python benchmarks/bench_confirm.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "breast_cancer_confirmed.yaml"


def phases(engine: str) -> tuple[float, float, int, int]:
    """(search seconds, confirmation seconds, trial runs, repeat runs) of one sweep with `engine`."""
    with tempfile.TemporaryDirectory(prefix="bench-confirm-") as folder:
        uri = f"sqlite:///{Path(folder) / 'runs.db'}"
        command = [sys.executable, "-m", "sweeplab", "sweep", str(SWEEP), f"engine={engine}", "--quiet", "--no-report"]
        subprocess.run([*command, "--tracking-uri", uri], cwd=folder, check=True, capture_output=True)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("breast_cancer_confirmed").experiment_id

        def span(role: str) -> tuple[float, int]:
            runs = client.search_runs([experiment], f"tags.`sweeplab.role` = '{role}'", max_results=1000)
            start = min(r.info.start_time for r in runs)
            end = max(r.info.end_time for r in runs)
            return (end - start) / 1000, len(runs)

        (search, trials), (confirm, repeats) = span("trial"), span("confirm")
        return search, confirm, trials, repeats


def main() -> None:
    stacked, reference = phases("vectorized"), phases("reference")
    for name, (search, confirm, trials, repeats) in (("stacked", stacked), ("reference", reference)):
        print(
            f"{name:10s} search {search:6.2f} s ({trials} trials)   confirmation {confirm:6.2f} s ({repeats} repeats)"
            f"   confirmation / search {confirm / search:5.2f}"
        )
    print(f"confirmation, reference / stacked: {reference[1] / stacked[1]:5.2f}x")


if __name__ == "__main__":
    main()
