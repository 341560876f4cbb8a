"""MLflow: where trained runs are written and read back.

- tracker.py: the one client of the tracking store (runs, params, metrics, tags, the experiment's view)
- recorder.py: a History -> an MLflow run (curves, best state, checkpoint, config), and its trial told
- champion.py: a condition's best trial registered as a model (`models:/STUDY@champion`), with its pyfunc
- pyfunc_model.py: the champion's "models from code" file; it imports nothing of sweeplab
- serve.py: a logged model loaded back (weights_only) for `sweeplab predict` and `sweeplab.load_model`

It stands on sweeplab.train (a History, a checkpoint) and never imports Optuna: the recorder reaches the study
only through the `Ledger` contract (recorder.py) that sweeplab.sweep's ledger fulfils.
"""
