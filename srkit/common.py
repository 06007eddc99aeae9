"""Small helpers every layer shares: atomic writes, one-line error text, device resolution, typed options.

They live here once so that the engines, the trainer, the registry, the benchmark and the CLI all behave the same
way (an interrupted write never leaves half a file; an error is one line; `--device` and `-O key=value` mean the same
everywhere).  This module imports nothing from srkit.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` to write to; renamed onto `path` when the block ends without an error.

    Readers never see half a file, and a failed or interrupted write leaves no temporary file behind.  The result
    gets the usual permissions (mkstemp creates 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".srkit-tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Write into `folder.partial`, then swap it in: a checkpoint or export folder is complete or absent."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError quotes its message
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def check_choice(value: object, choices: Iterable[object], name: str) -> None:
    """Refuse a value that is not one of `choices`, in the one wording every such check uses:
    "--alpha must be one of model, resize, drop, got 'keep'" (`name` as the user wrote the setting)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got '{value}'")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` = CUDA when PyTorch sees a GPU, else the CPU; an unusable request is a clear ValueError.  (PyTorch is
    imported here, not with the module: the helpers above serve the command line before PyTorch loads.)"""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return resolved


def build_options(options_class: type, values: Mapping[str, Any], owner: str = "this model") -> Any:
    """A typed options dataclass from loose values (CLI `-O k=v` strings or Python kwargs), with clear errors.

    Keys may use dashes; strings are converted to the field's declared type (bool, int, float, or None where the
    field allows it; a field whose default's type has `from_text(text, default)` parses its own text form).  Validation in the dataclass's `__post_init__` runs here, before any model is loaded.
    """
    known = {f.name: f for f in dataclasses.fields(options_class)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in known:
            raise ValueError(f"option '{key}' is not known to {owner}; known: {', '.join(sorted(known)) or 'none'}")
        fld = known[key]
        parse = getattr(type(fld.default), "from_text", None)
        kwargs[key] = parse(value, fld.default) if isinstance(value, str) and parse else _coerce(value, fld)
    return options_class(**kwargs)


def field_docs(options_class: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and its bases (the string literal after the field, as srkit
    writes options and hyper-parameters), read from the source: what `--help` and `srkit models NAME` show."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for cls in reversed(options_class.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for field_node, doc in itertools.pairwise(body):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):  # fmt: skip
                docs[field_node.target.id] = " ".join(doc.value.value.split())
    return docs


def _coerce(value: Any, fld: dataclasses.Field) -> Any:
    if not isinstance(value, str):
        return value
    kind = fld.type if isinstance(fld.type, str) else getattr(fld.type, "__name__", str(fld.type))
    if value.lower() in ("none", "null") and "None" in kind:
        return None
    if kind.startswith("bool"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"option '{fld.name}' expects true/false, got '{value}'")
    for caster, label in ((int, "int"), (float, "float")):
        if kind.startswith(label):
            try:
                return caster(value)
            except ValueError:
                raise ValueError(f"option '{fld.name}' expects {label}, got '{value}'") from None
    return value


__all__ = ["atomic_folder", "atomic_path", "build_options", "check_choice", "field_docs", "one_line", "resolve_device"]
