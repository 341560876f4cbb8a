"""The documentation's generated pages: the experiment and sweep file references from the pydantic schema (every
key, its type, default, whether a sweep can search it, what it means), and the notebook as a page. mkdocs calls
`on_files` (mkdocs.yml `hooks:`), so the pages are made at each build from the code itself and cannot drift from
it; nothing generated is committed. `python docs/gen_pages.py` prints the experiment reference."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sweeplab.config import ALIASES, ExperimentConfig
from sweeplab.sweep.spec import NOT_RESULTS, ParamSpec, SweepSpec

DOCS = Path(__file__).resolve().parent


def type_text(annotation: Any) -> str:
    """A field's type in a few words: `float`, `one of: mse, l1`, `int or none`, `list of float`."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is Literal:
        return "one of: " + ", ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        texts = [type_text(a) for a in args]
        optional = len(args) < len(typing.get_args(annotation))
        return " or ".join(dict.fromkeys(texts)) + (" or none" if optional else "")
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {type_text(args[1])}" if len(args) == 2 else "map"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "none")


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(its fields' defaults)"
    return f"`{json.dumps(value)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, field, model) for every field, nested models flattened (their own fields under the key)."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel) and nested is not ParamSpec:
            out += rows(nested, f"{key}.")
        else:
            out.append((key, field, model))
    return out


def experiment_reference() -> str:
    short = {dotted: alias for alias, dotted in ALIASES.items()}
    lines = [
        "# The experiment file",
        "",
        "One training run, fully described (`experiments/*.yaml`; `sweeplab run FILE key=value ...`). Generated from",
        "the schema (`sweeplab.config.ExperimentConfig`) at each build of this site. A key is given by its dotted",
        "path or, where it has one, its short name (`lr` for `train.lr`), in the file, on the command line",
        "(`epochs=20`) and in a sweep's `space`. *Searchable*: whether a sweep's `space` or `conditions` may vary it",
        "(the others do not change what a trial finds). A user's class (`model.class_path`, a loss, a scheduler) takes",
        "its constructor's arguments under `init_args`, each searchable by its flat name.",
        "",
        "| key | short | type | default | searchable | what it is |",
        "|---|---|---|---|---|---|",
    ]
    for key, field, _ in rows(ExperimentConfig):
        if key == "data.fold":
            continue  # set by sweeplab itself
        searchable = "no" if key in NOT_RESULTS or key.split(".")[0] in NOT_RESULTS or key == "data.folds" else "yes"
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        alias = f"`{short[key]}`" if key in short else ""
        lines.append(
            f"| `{key}` | {alias} | {type_text(field.annotation)} | {default_text(field)} | {searchable} | {description} |"
        )
    return "\n".join(lines) + "\n"


def sweep_reference() -> str:
    lines = [
        "# The sweep file",
        "",
        "A search (`sweeps/*.yaml`; `sweeplab sweep FILE key=value ...`): a base experiment, a search space, a",
        "sampler, a pruner and a budget. Generated from the schema (`sweeplab.sweep.spec.SweepSpec`) at each build.",
        "Any key of [the experiment file](experiment.md) given on the command line changes the base experiment.",
        "",
        "| key | type | default | what it is |",
        "|---|---|---|---|",
    ]
    for key, field, _ in rows(SweepSpec):
        if key == "condition":
            continue  # set by sweeplab itself
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{key}` | {type_text(field.annotation)} | {default_text(field)} | {description} |")
    lines += [
        "",
        "## One parameter of `space`",
        "",
        (ParamSpec.__doc__ or "").strip().replace("\n    ", " "),
        "",
        "| key | type | default |",
        "|---|---|---|",
    ]
    for key, field, _ in rows(ParamSpec):
        lines.append(f"| `{key}` | {type_text(field.annotation)} | {default_text(field)} |")
    return "\n".join(lines) + "\n"


def notebook_page(path: Path = DOCS / "sweeplab_notebook.ipynb") -> str:
    """The shipped notebook as a page: its markdown, its code, and its outputs as they were last run (text, and
    pictures inline)."""
    notebook = json.loads(path.read_text())
    lines = [
        "# The notebook",
        "",
        f"[`docs/{path.name}`]({path.name}) as it was last run (`tests/test_api.py` runs it in a Jupyter kernel).",
        "",
    ]
    for cell in notebook["cells"]:
        source = "".join(cell.get("source", []))
        if cell["cell_type"] == "markdown":
            lines += [source, ""]
            continue
        lines += ["```python", source, "```", ""]
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                png = data["image/png"].replace("\n", "")
                lines += [f"![output](data:image/png;base64,{png})", ""]
            elif "text/plain" in data or "text" in output:
                text = "".join(data.get("text/plain", output.get("text", [])))
                lines += ["```text", text.rstrip(), "```", ""]
    return "\n".join(lines)


def on_files(files, config):
    """mkdocs hook: the generated pages, added to the build's files (never written into docs/)."""
    from mkdocs.structure.files import File

    for uri, content in (
        ("reference/experiment.md", experiment_reference()),
        ("reference/sweep.md", sweep_reference()),
        ("notebook.md", notebook_page()),
    ):
        files.append(File.generated(config, uri, content=content))
    return files


if __name__ == "__main__":
    print(experiment_reference())
