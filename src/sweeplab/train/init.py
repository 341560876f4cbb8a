"""`model.init_from`: a model's first weights taken from another run, a registered model, or a file (fine-tuning).

The weights are a state_dict read with `torch.load(weights_only=True)`: a local `.pt` file (relative to the
experiment file; a sweeplab checkpoint or a plain state_dict), or, for `runs:/RUN_ID`, `models:/NAME@ALIAS` and
`models:/NAME/VERSION`, that run's best state in the tracking store. The store is the track layer's to read: a
command names the fetcher for its store (`use_fetcher`) before anything trains, and each source is read once per
process. Keys are matched by name and shape: a model key the source lacks, a source key the model lacks, or a shape
that differs is one line naming the key (and both shapes), unless an `exclude` glob names it, which keeps the
model's fresh weights there (a new head). What was loaded is named by `source_label` (the run's tag).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable

import torch

from sweeplab.config import ConfigError, ExperimentConfig
from sweeplab.train.model import ModelSpec, build_model

# uri -> (its run's best state, what it resolved to: "models:/digits@champion (version 2, run 3f2c...)")
Fetcher = Callable[[str], tuple[dict, str]]
_fetcher: Fetcher | None = None
_LOADED: dict[tuple, tuple[dict[str, torch.Tensor], str]] = {}


def use_fetcher(fetcher: Fetcher | None) -> None:
    """The command's way to its tracking store's weights (track/serve.fetch_weights for its URI)."""
    global _fetcher
    _fetcher = fetcher


def _load(uri: str, code_dir: str | None) -> tuple[dict[str, torch.Tensor], str]:
    key = (uri, code_dir, id(_fetcher))
    if key not in _LOADED:
        if uri.startswith(("runs:/", "models:/")):
            if _fetcher is None:
                raise ConfigError(f"model.init_from: {uri} needs a tracking store (give --tracking-uri)")
            payload, label = _fetcher(uri)
        else:
            path = Path(uri) if Path(uri).is_absolute() or code_dir is None else Path(code_dir) / uri
            if not path.is_file():
                raise ConfigError(f"model.init_from: no file {path}")
            label = f"{uri}"
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                why = str(exc).splitlines()[0][:200]
                raise ConfigError(f"model.init_from: {label} is not a state_dict torch reads safely ({why})") from None
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"model.init_from: {label} holds no state_dict (name -> tensor)")
        _LOADED[key] = (state, label)
    return _LOADED[key]


def source_label(config: ExperimentConfig) -> str | None:
    """What `model.init_from` resolved to (the run's `sweeplab.init_from` tag), or None."""
    source = config.model.init_source
    return None if source is None else _load(source.uri, config.code_dir)[1]


def initial_model(config: ExperimentConfig, spec: ModelSpec) -> torch.nn.Module:
    """A trial's model as it starts training: built from its spec (drawing its initial weights from torch's RNG),
    then `model.init_from`'s weights loaded. Every engine, and the checks before any store, start here."""
    model = build_model(spec, config.code_dir)
    start_from(config, model)
    return model


def start_from(config: ExperimentConfig, model: torch.nn.Module) -> None:
    """Load `model.init_from`'s weights into `model`, by name and shape, leaving `exclude`d keys as they are."""
    source = config.model.init_source
    if source is None:
        return
    state, label = _load(source.uri, config.code_dir)
    excluded = lambda key: any(fnmatch.fnmatchcase(key, glob) for glob in source.exclude)  # noqa: E731
    own = model.state_dict()
    for key, tensor in own.items():
        if excluded(key):
            continue
        if key not in state:
            raise ConfigError(f"model.init_from: {label} has no {key!r} (exclude it to keep it fresh)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"model.init_from: {key}: the model's {list(tensor.shape)} against {list(state[key].shape)} in "
                f"{label} (exclude it to keep it fresh)"
            )
    extra = [key for key in state if key not in own and not excluded(key)]
    if extra:
        raise ConfigError(f"model.init_from: {label}'s {extra[0]!r} is not in the model (exclude it)")
    with torch.no_grad():
        for key, tensor in own.items():
            if not excluded(key):
                tensor.copy_(state[key])
