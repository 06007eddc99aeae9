"""What a checkpoint file is, read before srkit accepts it: its format from the first bytes, and its top-level keys.

`srkit weights import NAME FILE` copies a file the user obtained elsewhere into the cache; a wrong file (a text
file, a truncated download, another model's checkpoint) would otherwise be accepted and fail much later, inside
an engine, with a library's error.  Formats are told from content, not names: a PyTorch checkpoint is a zip
archive holding `data.pkl` or a bare pickle stream, safetensors starts with the length of a JSON header, an ncnn
`.param` file with its magic number.  Keys are read with `weights_only=True` (memory-mapped where possible), the
way the engines read them, so nothing in the file is executed.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

PICKLE_SUFFIXES = {".pth", ".pkl", ".pt", ".ckpt", ".bin"}
NCNN_MAGIC = b"7767517"
FORMAT_NAMES = {
    "pickle": "a PyTorch checkpoint (.pth/.pkl)",
    "safetensors": "a safetensors file",
    "ncnn-param": "an ncnn .param file",
    "json": "a JSON file",
}


class CheckpointError(ValueError):
    """The file is not what the registry expects; the message is one line naming what it is instead."""


def expected_format(registry_path: str, entry_format: str) -> str | None:
    """What a file of an entry must be, from its registry path (None: anything, e.g. a tokenizer's text)."""
    suffix = Path(registry_path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".param":
        return "ncnn-param"
    if suffix == ".json":
        return "json"
    if suffix == ".bin" and entry_format == "ncnn":
        return None  # raw ncnn weights: no header to check
    return "pickle" if suffix in PICKLE_SUFFIXES else None


def sniff(path: Path) -> str:
    """pickle | safetensors | ncnn-param | json | unknown, from the file's first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return "pickle"
        return "unknown"
    if _safetensors_header(path) is not None:  # before the pickle test: a header length may begin 0x80 0x02
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(NCNN_MAGIC):
        return "ncnn-param"
    if head.lstrip()[:1] in (b"{", b"["):
        try:
            json.loads(path.read_text(encoding="utf-8"))
            return "json"
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    return "unknown"


def _safetensors_header(path: Path) -> dict | None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= size - 8:
            return None
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    return header if isinstance(header, dict) else None


def top_level_keys(path: Path, kind: str) -> list[str]:
    """The names at the top of a checkpoint: tensor names of safetensors, dict keys of a pickle."""
    if kind == "safetensors":
        header = _safetensors_header(path) or {}
        return [key for key in header if key != "__metadata__"]
    import torch

    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the old (non-zip) format cannot be memory-mapped
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a plain checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as plain tensors (weights_only): {first}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a dictionary of weights")
    return [str(key) for key in content]


def check_file(path: Path, kind: str | None, keys: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError unless `path` is of format `kind` and has every key of `keys` at its top level.

    Each item of `keys` may list alternatives with `|` (`params_ema|params`: either will do)."""
    if kind is None:
        return
    found = sniff(path)
    if found != kind:
        what = FORMAT_NAMES.get(found, "in no format srkit knows")
        raise CheckpointError(f"{path} is {what}, not {FORMAT_NAMES[kind]}")
    if not keys or kind not in ("pickle", "safetensors"):
        return
    present = set(top_level_keys(path, kind))
    missing = [item for item in keys if not any(option in present for option in item.split("|"))]
    if missing:
        sample = ", ".join(sorted(present)[:5]) or "nothing"
        raise CheckpointError(
            f"{path} lacks the key(s) {', '.join(missing)} this model's checkpoint has (found: {sample}); "
            "is it the right file?"
        )


__all__ = ["CheckpointError", "check_file", "expected_format", "sniff", "top_level_keys"]
