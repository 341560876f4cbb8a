"""What code a user's import path runs, found without running any of it.

`import nets` runs more than `nets.py`: a package folder `nets/` beside it wins over the file, `evilpkg.nets` runs
`evilpkg/__init__.py` first, and `nets.py` runs the `layers.py` it imports. `user_modules` finds all of it as
Python's own finders would (sys.meta_path over sys.path, each package's __path__), reading files and never
importing them, and follows the import statements of each of the user's modules (those outside the interpreter's
own library and site-packages) to the user's modules they import. Imports made at run time by a computed name
(`importlib.import_module(name)`) are not seen.

Three uses: a run records the sha256 of each (recorder: the `sweeplab.model_sources` tag; the code/ artifacts), a
resumed study compares them (sweep.driver.code_settings), and a run's module is imported for `predict` or
`load_model` only after `check_modules` found every file Python would import to hash to what the run recorded.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Found:
    """One module as `import` would find it: the file it runs (None: built in, frozen, or a namespace package
    without one) and, for a package, where its submodules are looked for."""

    name: str
    origin: Path | None
    locations: tuple[str, ...] | None

    @property
    def package(self) -> bool:
        return self.locations is not None

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.origin.read_bytes()).hexdigest() if self.origin is not None else None

    @property
    def relative_file(self) -> str:
        """Where the module's file goes in a folder that is put on sys.path: `a/b.py`, `a/__init__.py`."""
        parts = self.name.split(".")
        return "/".join(parts) + ("/__init__.py" if self.package else ".py")


def _system_folders() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    folders = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    folders |= {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(Path(f).resolve() for f in folders if f)


def is_users(found: Found) -> bool:
    """A module of the user's: a .py file outside the interpreter's library and site-packages, and not sweeplab."""
    if found.origin is None or found.origin.suffix != ".py" or found.name.split(".")[0] == "sweeplab":
        return False
    origin = found.origin.resolve()
    return not any(origin.is_relative_to(folder) for folder in _system_folders())


class Finder:
    """Resolves module names as `import` would at this moment, without importing: a module already imported is
    the one `import` returns; otherwise each finder of sys.meta_path is asked, as importlib does."""

    def __init__(self, search: list[str] | None = None):
        self.search = search  # folders put before sys.path (a code folder), as the import will have them
        self.cache: dict[str, Found | None] = {}

    def find(self, name: str) -> Found | None:
        if name not in self.cache:
            self.cache[name] = self._find(name)
        return self.cache[name]

    def _find(self, name: str) -> Found | None:
        module = sys.modules.get(name)
        if module is not None and name != "__main__":
            file = getattr(module, "__file__", None)
            path = getattr(module, "__path__", None)
            return Found(name, Path(file) if file else None, tuple(path) if path is not None else None)
        parent, _, _ = name.rpartition(".")
        path = None
        if parent:
            found = self.find(parent)
            if found is None or not found.package:
                return None
            path = list(found.locations)
        saved = list(sys.path)
        if self.search:
            sys.path[:0] = [folder for folder in self.search if folder not in sys.path]
        try:
            spec = None
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                try:
                    spec = find_spec(name, path, None)
                except (ImportError, ValueError, AttributeError):
                    spec = None
                if spec is not None:
                    break
        finally:
            sys.path[:] = saved
        if spec is None:
            return None
        origin = Path(spec.origin) if spec.origin and spec.has_location else None
        locations = spec.submodule_search_locations
        return Found(name, origin, tuple(locations) if locations is not None else None)

    def chain(self, name: str) -> list[Found | None]:
        """`a`, `a.b`, `a.b.c`: what `import a.b.c` runs, in order (None where one is not found)."""
        parts = name.split(".")
        return [self.find(".".join(parts[: i + 1])) for i in range(len(parts))]


def _imported_names(found: Found) -> list[str]:
    """The absolute module names a module's import statements name (each `from a import b` also as `a.b`, which
    is a module when `a` is a package)."""
    try:
        tree = ast.parse(found.origin.read_bytes(), filename=str(found.origin))
    except (SyntaxError, ValueError, OSError):
        return []
    package = found.name if found.package else found.name.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = ".".join(filter(None, [base, node.module or ""]))
            else:
                module = node.module or ""
            if not module:
                continue
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names


def user_modules(module_name: str, search: list[str] | None = None) -> dict[str, Found]:
    """Every module of the user's that `import module_name` runs, by name: the chain to it (each package's
    `__init__.py`) and the user's modules they import, followed to the end. A module on the chain that is not the
    user's (a library's) stops nothing: it is the library's; its imports are not followed."""
    finder = Finder(search)
    out: dict[str, Found] = {}
    queue = [module_name]
    while queue:
        name = queue.pop()
        for found in finder.chain(name):
            if found is None or found.name in out or not is_users(found):
                continue
            out[found.name] = found
            queue += _imported_names(found)
    return out


def source_hashes(module_name: str, search: list[str] | None = None) -> dict[str, str]:
    """{module: sha256} of `user_modules`: what a run records of the code it trained with."""
    return {name: found.sha256 for name, found in sorted(user_modules(module_name, search).items())}


class SourceMismatch(ValueError):
    """A module that would be imported is not the code the run recorded: nothing was imported."""


def check_modules(module_name: str, recorded: dict[str, str], search: list[str] | None = None) -> None:
    """Before `import module_name`: every file it would run (the chain to it, the user's modules they import, as
    `user_modules` finds them with `search` first on sys.path) must hash to what `recorded` ({module: sha256}, from
    the tracking store) holds for it. A package is accepted only when its `__init__.py` was recorded too; a
    namespace package or a built-in where the run had a file of its own is refused. Raises SourceMismatch, one
    line naming the file."""
    finder = Finder(search)
    if None in finder.chain(module_name):
        raise SourceMismatch(f"no module {module_name!r} to import (looked in {', '.join(search or [])} and sys.path)")
    for found in finder.chain(module_name):
        if found.name in recorded and (found.origin is None or found.sha256 != recorded[found.name]):
            where = found.origin or f"{found.name} (no file of its own)"
            raise SourceMismatch(
                f"{where}: not the source the run trained {found.name} from (its sha256 differs from the run's)"
            )
        if found.name not in recorded and is_users(found):
            what = "package" if found.package else "module"
            raise SourceMismatch(
                f"{found.origin}: the {what} {found.name}, which the run did not record, would be imported first"
            )
    for name, found in user_modules(module_name, search).items():
        if name not in recorded:
            raise SourceMismatch(f"{found.origin}: {name} would be imported, and the run did not record it")
        if recorded[name] != found.sha256:
            raise SourceMismatch(
                f"{found.origin}: not the source the run trained {name} from (its sha256 differs from the run's)"
            )
    importlib.invalidate_caches()


def import_paths(config) -> dict[str, str]:
    """{field: module.name} of every import path a config names for code of its own (the model, the data loader,
    the collate_fn, a loss, optimizer, scheduler or metric by class_path): what a trial's code is. torch's classes
    by short name have no module and are left out."""
    train = config.train
    found = {
        "model.class_path": config.model.class_path,
        "data.class_path": config.data.class_path if config.data.source == "python" else None,
        "data.collate_fn": config.data.collate_fn,
    }
    for field in ("optimizer", "loss", "scheduler"):
        value = getattr(train, field)
        found[f"train.{field}.class_path"] = getattr(value, "class_path", None)
    for metric in config.metrics:
        if not isinstance(metric, str):
            found[f"metrics.{metric.name}.class_path"] = metric.class_path
    return {field: path for field, path in found.items() if path and "." in path}
