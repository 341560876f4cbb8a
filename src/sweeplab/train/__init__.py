"""Everything that trains, knowing nothing of MLflow or Optuna: a config in, a trained run (a History) out.

- data.py: the data sets (the seed's, scikit-learn's, a CSV, the user's loader) and their splits
- items.py: how items become batches, and how a bad item is named (its split, its index in the user's Dataset)
- model.py: the seed's MLP or the user's class; a checkpoint is its state_dict plus what rebuilds it
- plugins.py: the user's code, imported by path and run contained (its prints, exits and Ctrl-C)
- epoch.py: what an epoch means, once for K members: its record, its metrics, every decision (Curves), the
  batch order and the per-sample average; the reference loop holds it at K = 1
- loop.py: the seed's loop: the per-batch step, validation, fit (epoch.Curves at K = 1), predict
- sources.py: what code an import path runs (the user's modules), found and hashed without importing it
- experiment.py: config -> trained run (`run_experiment`), and the checks run before any store exists
- engines.py: how a batch of trials trains: the reference loop, or stacked (stacked/: the shared epoch loop and
  the stacked optimizers, the MLP's hand-written forward, the torch.func forward of any model)

Nothing here imports MLflow or Optuna (tests/test_config.py checks it): the sweep (sweeplab.sweep) and the
tracking (sweeplab.track) stand on this layer, never the other way round.
"""
