"""One experiment, from config to trained model: seed, data, model, optimizer, batches, fit.

The order of random draws is the seed's (torch.manual_seed, data X and noise, then the model's initial weights),
so the lab config reproduces the seed's numbers. cli.py (`sweeplab run`) and search.py (each trial) call
`run_experiment`; the loop itself is in loop.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .config import ConfigError, ExperimentConfig
from .data import Dataset, make_dataset
from .loop import Callback, History, LoaderBatches, TensorBatches, fit, loss_for_task, predict
from .model import MLP, ModelSpec, build_model


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not there is a config error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name} requested but MPS is not available on this machine")
    return device


def build_optimizer(config: ExperimentConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    train = config.train
    decay = {} if train.weight_decay is None else {"weight_decay": train.weight_decay}
    if train.optimizer == "SGD":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, **decay)
    if train.optimizer == "RMSprop":
        return torch.optim.RMSprop(params, lr=train.lr, momentum=train.momentum, **decay)
    optimizer = torch.optim.AdamW if train.optimizer == "AdamW" else torch.optim.Adam
    return optimizer(params, lr=train.lr, **decay)


def model_spec_for(config: ExperimentConfig, dataset: Dataset) -> ModelSpec:
    return ModelSpec(
        in_features=dataset.n_features,
        hidden=tuple(config.model.hidden_sizes),
        out_features=dataset.n_outputs,
        activation=config.model.activation,
        dropout=config.model.dropout,
        task=config.task,
        feature_names=dataset.feature_names,
    )


@dataclass
class RunResult:
    config: ExperimentConfig
    dataset: Dataset
    spec: ModelSpec
    model: MLP
    history: History
    device: torch.device
    predictions: torch.Tensor  # model outputs for config.predict_x, best state restored


def run_experiment(config: ExperimentConfig, callbacks: Iterable[Callback] = ()) -> RunResult:
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    dataset = make_dataset(config)
    if config.predict_x and any(len(row) != dataset.n_features for row in config.predict_x):
        raise ConfigError(f"predict_x: rows must have {dataset.n_features} values, one per feature")
    spec = model_spec_for(config, dataset)
    model = build_model(spec).to(device)
    optimizer = build_optimizer(config, model.parameters())
    train = config.train
    batches = TensorBatches if train.loader == "tensor" else LoaderBatches
    shuffle_gen = torch.Generator().manual_seed(train.shuffle_seed) if train.shuffle_seed is not None else None
    train_batches = batches(dataset.x_train, dataset.y_train, train.batch_size, shuffle=train.shuffle,
                            generator=shuffle_gen, device=device)
    val_batches = batches(dataset.x_val, dataset.y_val, train.val_batch_size or dataset.x_val.shape[0],
                          device=device)
    history = fit(model, optimizer, loss_for_task(config.task, train.loss), train_batches, val_batches,
                  train.epochs, task=config.task, callbacks=callbacks)
    x = torch.tensor(config.predict_x, dtype=torch.float32) if config.predict_x else torch.empty(0, dataset.n_features)
    predictions = predict(model, x)
    return RunResult(config, dataset, spec, model, history, device, predictions)
