"""sweeplab: Optuna sweeps over a PyTorch training loop, every trial tracked in MLflow.

Start at cli.py for the commands, loop.py for the training loop, experiment.py for how a config becomes a run.
"""

__version__ = "0.1.0"
