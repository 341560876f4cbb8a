"""A user's own code, named by import path: their nn.Module (`model.class_path`) and their data loader
(`data.class_path`), each with `init_args` (LightningCLI's convention).

A module is looked for beside the experiment file first (no install needed), then on sys.path; it is imported
only because a config the user gave names it. Every way of getting it wrong (no such module or name, a module
that raises on import, a class that is not an nn.Module, a constructor that raises or gets an unknown argument)
is a ConfigError of one line naming the field. model.py builds the models; data.py calls the loaders.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from sweeplab.config import ConfigError
from sweeplab.stop import Stopped, stop_flag

# Constructor parameters the data decides, filled in when init_args leaves them out: the user should not have to
# repeat the data's shape in the model's config.
DATA_ARGS = ("in_features", "in_channels", "input_shape", "n_classes", "num_classes", "out_features", "n_outputs")


# Objects given in place of import paths (sweeplab.sweep / sweeplab.run from Python: a class defined in a notebook),
# by the path that names them in the config; processes forked from this one have them too.
REGISTERED: dict[str, Any] = {}


def path_of(obj: Any) -> str:
    """The import path that stands for `obj` in a config: `module.QualName` where that finds it again (a class in
    a module, or in a notebook's `__main__`), else a name registered in this process (a class made in a function)."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not name:
        raise ConfigError(f"{obj!r} has no name to stand for it; give a class or a function")
    found = sys.modules.get(module)
    for part in name.split("."):
        found = getattr(found, part, None)
    path = f"{module}.{name}"
    if found is not obj:  # `<locals>` in the name, or shadowed since: known by this process only
        path = f"{module}.{getattr(obj, '__name__', 'object')}_{id(obj):x}".replace("<", "").replace(">", "")
    REGISTERED[path] = obj
    return path


def in_main(path: str) -> bool:
    """Whether the path names an object of `__main__` (a notebook's, or a script's run as a program)."""
    return path.split(".")[0] == "__main__"


def import_object(path: str, code_dir: str | None, field: str, where: str = "beside the experiment file") -> Any:
    """`module.name` -> the object, the module looked for in `code_dir` (`where` says what that folder is) first.
    One-line ConfigErrors."""
    if path in REGISTERED:
        return REGISTERED[path]
    module_name, _, attribute = path.rpartition(".")
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)  # kept: the trials, and torch.export, need the module again
    forget_if_elsewhere(module_name, code_dir)
    try:
        with user_code():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and exc.name.split(".")[0] == module_name.split(".")[0]:
            place = f"{where} ({code_dir}) or on sys.path" if code_dir else "on sys.path"
            raise ConfigError(f"{field}: no module {module_name!r} {place}") from None
        raise ConfigError(f"{field}: importing {module_name} failed: {error_text(exc)}") from None
    except Exception as exc:  # the user's module raised on import: say where
        raise ConfigError(f"{field}: importing {module_name} raised {error_text(exc)}") from None
    except (SystemExit, KeyboardInterrupt) as exc:  # sys.exit() or a raise in the module, not a Ctrl-C (Stopped)
        if isinstance(exc, Stopped):
            raise
        raise ConfigError(f"{field}: importing {module_name} {exit_text(exc)}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{field}: module {module_name} ({_file_of(module)}) has no {attribute!r}") from None


def forget_if_elsewhere(module_name: str, code_dir: str | None) -> None:
    """A module of that name imported earlier from another folder (another experiment in this process) is not the
    one beside this experiment file: forget it, so this one is imported."""
    top = module_name.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is None or not code_dir:
        return
    here = Path(code_dir)
    candidates = [here / f"{top}.py", here / top / "__init__.py"]
    file = getattr(loaded, "__file__", None)
    if any(c.is_file() for c in candidates) and (
        file is None or Path(file).resolve() not in {c.resolve() for c in candidates}
    ):
        for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def model_class(
    path: str, code_dir: str | None, field: str = "model.class_path", where: str = "beside the experiment file"
) -> type:
    cls = import_object(path, code_dir, field, where)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        kind = "class" if isinstance(cls, type) else type(cls).__name__
        raise ConfigError(f"{field}: {path} is a {kind}, not a torch.nn.Module subclass")
    return cls


def data_args(
    cls: type, init_args: dict[str, Any], input_shape: tuple[int, ...], n_outputs: int, n_classes: int | None
) -> dict[str, Any]:
    """init_args plus the DATA_ARGS the constructor takes and init_args leaves out, from the data."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # a builtin or C extension constructor
        return dict(init_args)
    known = {"out_features": n_outputs, "n_outputs": n_outputs}
    if input_shape:  # () for several inputs, or one whose shape a collate_fn decides: nothing to fill in
        known.update(in_features=math.prod(input_shape), input_shape=list(input_shape))
    if len(input_shape) > 1:
        known["in_channels"] = input_shape[0]
    if n_classes is not None:
        known["n_classes"] = known["num_classes"] = n_classes
    filled = dict(init_args)
    for name in DATA_ARGS:
        if name in parameters and name not in filled and name in known:
            filled[name] = known[name]
    return filled


def instantiate(cls: type, init_args: dict[str, Any], path: str, field: str = "model") -> Any:
    """cls(**init_args), with a constructor that raises or refuses an argument said in one line."""
    try:
        signature = inspect.signature(cls.__init__)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = [] if accepts_any else [k for k in init_args if k not in signature.parameters or k == "self"]
    except (TypeError, ValueError):
        unknown = []
    if unknown:
        raise ConfigError(f"{field}.init_args: {path} takes no argument {unknown[0]!r}")
    try:
        with user_code():
            return cls(**init_args)
    except (SystemExit, KeyboardInterrupt) as exc:
        if isinstance(exc, Stopped):
            raise
        raise ConfigError(f"{field}.class_path: {path}({_args_text(init_args)}) {exit_text(exc)}") from None
    except TypeError as exc:
        raise ConfigError(
            f"{field}.init_args: {path}({_args_text(init_args)}) refused its arguments: {error_text(exc)}"
        ) from None
    except Exception as exc:
        raise ConfigError(f"{field}.class_path: {path}({_args_text(init_args)}) raised {error_text(exc)}") from None


# Sources of `__main__` objects handed to a process that does not have them (a spawned writer): path -> text.
MAIN_SOURCES: dict[str, str] = {}


def main_source(path: str) -> str | None:
    """The source of an object of `__main__` (a notebook's class): `inspect.getsource`, where this process has it,
    else what the sweep process handed over (MAIN_SOURCES)."""
    obj = REGISTERED.get(path)
    if obj is None:
        return MAIN_SOURCES.get(path)
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # defined in an interpreter without source (a plain `python -c`)
        return None


def main_sources() -> tuple[tuple[str, str], ...]:
    """(path, source) of every registered object whose source this process has: what a spawned writer process
    needs to log a notebook class's code with its runs (it cannot import `__main__` of this process)."""
    found = ((path, main_source(path)) for path in REGISTERED)
    return tuple((path, text) for path, text in found if text is not None)


def source_of(path: str, code_dir: str | None = None) -> tuple[Path, str] | None:
    """(file, sha256) of the module that `path` (module.name) comes from (imported here, or where it would be
    imported from: a writer process never imports it); None for a module without a source file, and for an
    object of `__main__` (main_source gives its source)."""
    if in_main(path) or path in REGISTERED:
        return None
    module = sys.modules.get(path.rpartition(".")[0])
    file = getattr(module, "__file__", None)
    if file is None and "." not in path.rpartition(".")[0]:
        found = find_module_file(path, code_dir)
        file = str(found) if found else None
    if not file or not file.endswith(".py"):
        return None
    data = Path(file).read_bytes()
    return Path(file), hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def user_code():
    """While the user's module, constructor or loader runs: what it prints goes to stderr, so `--json` output stays
    JSON, and Ctrl-C stops it at once (stop.StopFlag.interruptible)."""
    target = sys.stderr if sys.stderr is not None else open(os.devnull, "w")  # noqa: SIM115 (stderr closed: 2>&-)
    with stop_flag.interruptible(), contextlib.redirect_stdout(target):
        yield


def call_users(function: Callable[[], Any], where: str, doing: str = "") -> Any:
    """`function()` as the user's code runs (contained: user_code), its failure one ConfigError: `{where}{doing}
    raised ValueError: ... (my_nets.py line 12)`, or `{where} called sys.exit(...)` for code that tries to end
    the process. Ctrl-C (Stopped) goes through."""
    try:
        with user_code():
            return function()
    except (SystemExit, KeyboardInterrupt) as exc:
        if isinstance(exc, Stopped):
            raise
        raise ConfigError(f"{where} {exit_text(exc)}") from None
    except Exception as exc:
        raise ConfigError(f"{where}{doing} raised {error_text(exc)}") from None


def exit_text(exc: BaseException) -> str:
    """A user's module or constructor that tried to end the process, in a few words."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}){_where(exc)}: user code must not end the process"
    return f"raised KeyboardInterrupt{_where(exc)}"


def _args_text(init_args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in init_args.items())[:200]


def _file_of(module) -> str:
    return getattr(module, "__file__", None) or "built in"


def error_text(exc: BaseException) -> str:
    """`ValueError: message (my_nets.py line 12)`: the exception, on one line, and where the user's code raised it."""
    message = (str(exc).strip().splitlines() or [""])[0][:200]
    where = _where(exc)
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({Path(exc.filename).name} line {exc.lineno})"
        message = exc.msg
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"


def _where(exc: BaseException) -> str:
    """` (my_nets.py line 12)`: the last frame of the user's own code in the traceback, or nothing."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/sweeplab/" not in f.filename and "importlib" not in f.filename and "/torch/" not in f.filename
    ]
    return f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""


def find_module_file(path: str, code_dir: str | None) -> Path | None:
    """The file a module path would import from, without importing it (for the note of what must travel)."""
    module_name = path.rpartition(".")[0]
    top = module_name.split(".")[0]
    if code_dir and (Path(code_dir) / f"{top}.py").is_file():
        return Path(code_dir) / f"{top}.py"
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found and found.origin else None
