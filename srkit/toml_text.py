"""Top-level tables of a TOML file as text: where each starts, and replacing one, the rest kept byte for byte.

tomllib reads TOML but keeps no positions and cannot write.  The registry needs both: a malformed entry of a
user's `weights.toml` is reported with its file and line, and `srkit weights add/remove` edit one entry of a
file that people also edit by hand (comments and the other entries must survive).  Only what the registry's
schema uses is written: strings, integers, booleans, lists, and lists of inline tables one per line.  Callers
parse the edited text again to check that only the intended table changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

_HEADER = re.compile(r"\s*\[(?P<array>\[)?\s*(?P<key>[^\[\]]*?)\s*\]\]?\s*(#.*)?\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _header_key(line: str) -> str | None:
    """The table name of a `[name]` or `[[name]]` header line (quotes removed), else None."""
    match = _HEADER.fullmatch(line)
    if match is None:
        return None
    key = match["key"]
    if len(key) >= 2 and key[0] == key[-1] == '"':
        try:
            return json.loads(key)
        except ValueError:
            return key[1:-1]
    if len(key) >= 2 and key[0] == key[-1] == "'":
        return key[1:-1]
    return key


def table_span(text: str, name: str) -> tuple[int, int] | None:
    """0-based line span [start, end) of table `name`: its header up to the next header that is not one of its
    own sub-tables, less the blank and comment lines just before that header (they introduce the next table)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _header_key(line) == name), None)
    if start is None:
        return None
    end = len(lines)
    for index in range(start + 1, len(lines)):
        key = _header_key(lines[index])
        if key is not None and key != name and not key.startswith(name + "."):
            end = index
            break
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return start, end


def line_of(text: str, name: str, key: str | None = None, contains: str | None = None) -> int | None:
    """1-based line of table `name`'s header, or of the first line inside it that assigns `key` and/or contains
    `contains`; None when the table is not written as a `[name]` header."""
    span = table_span(text, name)
    if span is None:
        return None
    if key is None and contains is None:
        return span[0] + 1
    lines = text.splitlines()
    assigns = re.compile(rf"\s*{re.escape(key)}\s*=") if key else None
    for index in range(span[0] + 1, span[1]):
        if (assigns is None or assigns.match(lines[index])) and (
            contains is None or contains in lines[index]
        ):
            return index + 1
    return span[0] + 1


def replace_table(text: str, name: str, block: str | None) -> str:
    """`text` with table `name` replaced by `block` (appended when absent; removed, with the comment lines right
    above its header, when `block` is None)."""
    lines = text.splitlines(keepends=True)
    span = table_span(text, name)
    new = [] if block is None else block.splitlines(keepends=True)
    if span is None:
        if block is None:
            return text
        head = "".join(lines)
        if head and not head.endswith("\n"):
            head += "\n"
        return head + ("\n" if head.strip() else "") + "".join(new)
    start, end = span
    if block is None:  # its comment lines go too, and the blank line that set it apart from the table before
        while start > 0 and lines[start - 1].lstrip().startswith("#"):
            start -= 1
        if start > 0 and not lines[start - 1].strip():
            start -= 1
    return "".join(lines[:start] + new + lines[end:])


def dump_table(name: str, fields: Mapping[str, Any]) -> str:
    """`[name]` and its fields as TOML; a list of tables is written one inline table per line."""
    lines = [f"[{_key(name)}]"]
    for key, value in fields.items():
        if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            lines += [f"{_key(key)} = [", *(f"  {_value(item)}," for item in value), "]"]
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(value: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} values to the registry")


__all__ = ["dump_table", "line_of", "replace_table", "table_span"]
