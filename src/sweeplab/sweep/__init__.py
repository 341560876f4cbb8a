"""The sweep runtime: a sweep file -> Optuna trials -> engines -> MLflow runs -> champions.

Also the function `sweeplab.sweep(spec, *, tracking_uri=None, storage=None, quiet=False, **overrides)`: run a sweep
from Python (`spec` a sweep file's path or a dict of its form) and get a SweepResult (.trials, .best, .champion,
.report()). sweeplab/__init__.py makes this package callable; the function is sweeplab.api.sweep.

- spec.py: the sweep file's schema (SweepSpec, ParamSpec) and `load_sweep`
- probes.py: the checks before any store (`settle`: the engine, the device, the data, the user's model)
- search.py: Optuna's side: storages, studies, a trial's params from the space
- ledger.py: leases, heartbeats, tells and recovery of the study's trials
- batching.py: how many trials the next batch asks for
- driver.py: `run_sweep` / `run_worker`: lease -> train -> record, the helpers, the champions
- writers.py: where trained runs are written (inline, or by writer processes)
- background.py: the report's process, forked beside the sweep

It stands on sweeplab.train (the engines) and sweeplab.track (the recorder, the champion).
"""
