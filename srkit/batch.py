"""Batch planning: every option checked and every input mapped to its output before any model loads.

A batch that fails after minutes of inference because of a typo, or that reports two files "ok" while one
overwrote the other, loses the user's time or data.  So `upscale_paths` (srkit.api) first builds a `BatchPlan`:

- `UpscaleSettings` validates every per-run option (format, scale, tile, alpha, filter, quality, samples, the
  pixel limit) in its constructor, with one-line errors;
- inputs are expanded (files, folders, globs; a glob keeps the sub-folders below its fixed prefix under `-o`);
- srkit's own earlier outputs are left out of the inputs: a file found in a folder or by a glob is one when its
  name is what this run would name another input's output (`{stem}{suffix}`, any sample suffix `_s{N}` and any
  image extension, in the same folder) *and* it carries srkit's marker (EXIF Software `srkit ...`, see
  srkit.imageio).  Both must hold: a user's own `a_x4.png` stays an input, and upscaling srkit outputs on
  purpose (`srkit upscale big/`) still works.  A file named directly on the command line is always an input;
- two inputs that would write one path are told apart deterministically: the source extension joins the stem
  when the extensions differ (`a_jpg.png`, `a_png.png`), the folders below their common parent are kept when
  the folders differ; anything still colliding is refused with one line naming the inputs;
- an existing output is replaced when srkit wrote it, skipped with `--skip-existing`, and otherwise that file
  fails ("not written by srkit"); an output that would overwrite an input always fails;
- `check_output_folders` creates each output folder and writes a probe file in it, so an unwritable `-o`
  fails in the first second, not after the first image.
"""

from __future__ import annotations

import glob
import math
import os
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from srkit.alpha import ALPHA_MODES
from srkit.common import check_choice, one_line
from srkit.imageio import WRITE_FORMATS, is_image_path, is_srkit_output, max_pixels, output_format

Log = Callable[[str], None]
RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
EXTENSIONS = tuple(sorted(ext.lstrip(".") for ext in WRITE_FORMATS))
"""What `--ext` accepts besides `auto`."""
FALLBACK_EXT = ".png"
"""`--ext auto` for inputs srkit cannot write back (BMP, GIF)."""
SAMPLE_SUFFIX = re.compile(r"_s\d+$")
OTHER_IMAGE_SUFFIXES = {".bmp", ".gif", ".exr", ".hdr", ".avif", ".heic", ".jxl", ".jp2", ".tga", ".ppm", ".pgm"}
"""Suffixes that make `-o NAME.ext` an image file srkit cannot write (rather than a folder name)."""


# ---------------------------------------------------------------------------------------------------------------
# Options


def parse_tile(tile: int | str | None, overlap: int) -> int | str | None:
    """`--tile`: "auto", None/0/"none" (no tiling) or a pixel size larger than the overlap."""
    if overlap < 0:
        raise ValueError(f"--tile-overlap must be 0 or more, got {overlap}")
    if tile is None or str(tile).strip().lower() in ("0", "none"):
        return None
    if str(tile).strip().lower() == "auto":
        return "auto"
    try:
        size = int(str(tile).strip())
    except ValueError:
        raise ValueError(f"--tile must be auto, 0 (no tiling) or a pixel size, got '{tile}'") from None
    if size < 0:
        raise ValueError(f"--tile must be auto, 0 (no tiling) or a positive pixel size, got {size}")
    if size <= overlap:
        raise ValueError(f"--tile {size} must be larger than --tile-overlap {overlap}")
    return size


def check_scale(scale: float | None) -> None:
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"--scale must be a positive finite number, got {scale}")


@dataclass(frozen=True)
class UpscaleSettings:
    """The per-run options of `srkit upscale` that are not the model's; checked when built."""

    output: Path | None = None
    scale: float | None = None
    """None = the model's native scale."""
    suffix: str | None = None
    ext: str = "auto"
    recursive: bool = False
    skip_existing: bool = False
    alpha: str = "model"
    resize_filter: str = "lanczos"
    samples: int = 1
    seed: int = 0
    quality: int = 95

    def __post_init__(self) -> None:
        if self.ext.lower().lstrip(".") not in ("auto", *EXTENSIONS):
            raise ValueError(f"--ext {self.ext} cannot be written; use auto or one of {', '.join(EXTENSIONS)}")
        check_scale(self.scale)
        check_choice(self.alpha, ALPHA_MODES, "--alpha")
        check_choice(self.resize_filter, RESIZE_FILTERS, "--resize-filter")
        if self.samples < 1:
            raise ValueError(f"--samples must be at least 1, got {self.samples}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.suffix is not None and ("/" in self.suffix or os.sep in self.suffix):
            raise ValueError(f"--suffix must not contain a path separator, got '{self.suffix}'")
        if self.output is not None and self.output.suffix.lower() in OTHER_IMAGE_SUFFIXES and not self.output.is_dir():
            output_format(self.output)  # raises: "cannot write '.bmp' files; use one of ..."
        max_pixels()  # a malformed SRKIT_MAX_PIXELS fails now, not on the first file

    @property
    def names_a_file(self) -> bool:
        """`-o out.png` names one output file rather than a folder."""
        return self.output is not None and self.output.suffix.lower() in WRITE_FORMATS

    def sample_seeds(self) -> list[int | None]:
        return [self.seed + k for k in range(self.samples)] if self.samples > 1 else [None]


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class InputFile:
    path: Path
    root: Path
    """Folder the path was found under (its relative path is kept below the output folder)."""
    found: bool = False
    """Found by expanding a folder or a glob (so it may be an earlier srkit output), not named directly."""


def _glob_root(pattern: str) -> Path:
    """The fixed folder in front of a glob's first wildcard: `g/d*/x.png` -> `g`."""
    fixed = []
    for part in Path(pattern).expanduser().parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def collect_inputs(inputs: Iterable[str | Path], recursive: bool, warn: Log) -> tuple[list[InputFile], list[str]]:
    """Expand files, folders and globs (each file once); non-images are skipped with a warning, missing paths
    returned."""
    found: list[InputFile] = []
    missing: list[str] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                missing.append(text)
            root = _glob_root(text)
            found += [InputFile(m, root, True) for m in matches if m.is_file() and _check_image(m, warn)]
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
            skipped = [p for p in files if not is_image_path(p)]
            if skipped:
                warn(f"skipping {len(skipped)} non-image file(s) in {path} (e.g. {skipped[0].name})")
            found += [InputFile(p, path, True) for p in files if is_image_path(p)]
        elif path.is_file():
            if _check_image(path, warn):
                found.append(InputFile(path, path.parent))
        else:
            missing.append(text)
    unique: dict[Path, InputFile] = {}
    for entry in found:
        unique.setdefault(entry.path.resolve(), entry)
    return list(unique.values()), missing


def _check_image(path: Path, warn: Log) -> bool:
    if is_image_path(path):
        return True
    warn(f"skipping {path}: not an image file extension")
    return False


# ---------------------------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class _Name:
    """Where one input's output goes, before the suffix and the sample tag: folder / stem + ... + ext."""

    folder: Path
    stem: str
    ext: str

    def path(self, suffix: str, sample_seed: int | None = None) -> Path:
        sample = f"_s{sample_seed}" if sample_seed is not None else ""
        return self.folder / f"{self.stem}{suffix}{sample}{self.ext}"


def _output_ext(settings: UpscaleSettings, source: Path) -> str:
    if settings.ext.lower() == "auto":
        ext = source.suffix.lower()
        return ext if ext in WRITE_FORMATS else FALLBACK_EXT
    return "." + settings.ext.lower().lstrip(".")


def _suffix(settings: UpscaleSettings, scale: float) -> str:
    """`--suffix`, default `_x{scale}` beside the inputs and nothing under `-o DIR`."""
    if settings.suffix is not None:
        return settings.suffix
    return f"_x{scale:g}" if settings.output is None else ""


def _name(settings: UpscaleSettings, item: InputFile) -> _Name:
    ext = _output_ext(settings, item.path)
    if settings.output is None:
        return _Name(item.path.parent, item.path.stem, ext)
    return _Name(settings.output / item.path.parent.relative_to(item.root), item.path.stem, ext)


def _is_earlier_output(item: InputFile, targets: set[tuple[Path, str]]) -> bool:
    """A found file named like another input's output (any sample tag and extension) that srkit wrote."""
    if not item.found:
        return False
    folder = item.path.parent.resolve()
    stems = {item.path.stem, SAMPLE_SUFFIX.sub("", item.path.stem)}
    return any((folder, stem) in targets for stem in stems) and is_srkit_output(item.path)


def _collisions(names: list[_Name], suffix: str) -> list[list[int]]:
    groups: dict[Path, list[int]] = defaultdict(list)
    for index, name in enumerate(names):
        groups[name.path(suffix).resolve()].append(index)
    return [members for members in groups.values() if len(members) > 1]


def _disambiguate(names: list[_Name], items: list[InputFile], settings: UpscaleSettings, suffix: str) -> list[_Name]:
    """Tell apart inputs that would write one path: first their folders below the common parent are kept (under
    `-o DIR`), then differing source extensions join the stems; whatever still collides is refused."""
    result = list(names)
    if settings.output is not None and not settings.names_a_file:
        for members in _collisions(result, suffix):
            parents = [items[i].path.parent.resolve() for i in members]
            if len(set(parents)) > 1:
                common = Path(os.path.commonpath([str(p) for p in parents]))
                for i, parent in zip(members, parents, strict=True):
                    result[i] = _Name(settings.output / parent.relative_to(common), result[i].stem, result[i].ext)
    for members in _collisions(result, suffix):
        extensions = [items[i].path.suffix.lower().lstrip(".") for i in members]
        if len(set(extensions)) == len(members):
            for i, ext in zip(members, extensions, strict=True):
                result[i] = _Name(result[i].folder, f"{result[i].stem}_{ext}", result[i].ext)
    for members in _collisions(result, suffix):
        listed = ", ".join(str(items[i].path) for i in members)
        target = result[members[0]].path(suffix)
        raise ValueError(f"{listed} would all be written to {target}; rename one, or upscale them in separate runs")
    return result


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedFile:
    input: Path
    targets: list[tuple[Path, int | None]]
    """(output path, sample seed or None) for each output of this input."""
    action: str
    """run | skip | fail"""
    error: str | None = None


@dataclass
class BatchPlan:
    files: list[PlannedFile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    left_out: list[Path] = field(default_factory=list)
    """Earlier srkit outputs found among the inputs (not upscaled again)."""

    def to_run(self) -> list[PlannedFile]:
        return [f for f in self.files if f.action == "run"]


def plan_batch(inputs: Iterable[str | Path], settings: UpscaleSettings, native_scale: float, warn: Log) -> BatchPlan:
    """Every input's output path(s) and what happens to it; raises ValueError (one line) for an impossible plan."""
    found, missing = collect_inputs(inputs, settings.recursive, warn)
    suffix = _suffix(settings, settings.scale or native_scale)
    if settings.names_a_file and len(found) > 1:
        raise ValueError(f"-o {settings.output} names one file, but {len(found)} inputs were given; pass a folder")
    names = [_name(settings, item) for item in found]
    keys = [(name.folder.resolve(), f"{name.stem}{suffix}") for name in names]
    counts = Counter(keys)
    kept: list[tuple[InputFile, _Name]] = []
    left_out: list[tuple[InputFile, _Name]] = []
    for item, name, key in zip(found, names, keys, strict=True):
        others = {k for k, count in counts.items() if count > (k == key)}  # outputs of the *other* inputs
        (left_out if _is_earlier_output(item, others) else kept).append((item, name))
    items = [item for item, _ in kept]
    names = _disambiguate([name for _, name in kept], items, settings, suffix)
    inputs_set = {item.path.resolve() for item in items}
    plan = BatchPlan(missing=missing, left_out=[item.path for item, _ in left_out])
    for item, name in zip(items, names, strict=True):
        if settings.names_a_file:
            assert settings.output is not None
            output = settings.output
            paths = [(output if s is None else output.with_name(f"{output.stem}_s{s}{output.suffix}"), s)
                     for s in settings.sample_seeds()]  # fmt: skip
        else:
            paths = [(name.path(suffix, s), s) for s in settings.sample_seeds()]
        plan.files.append(_decide(item.path, paths, inputs_set, settings.skip_existing))
    return plan


def _decide(source: Path, targets: list[tuple[Path, int | None]], inputs: set[Path], skip_existing: bool) -> PlannedFile:
    for target, _ in targets:
        if target.resolve() in inputs:
            return PlannedFile(source, targets, "fail", f"{target} would overwrite an input; use -o or --suffix")
    existing = [t for t, _ in targets if t.exists()]
    if skip_existing and len(existing) == len(targets):
        return PlannedFile(source, targets, "skip")
    foreign = [t for t in existing if not is_srkit_output(t)]
    if foreign:  # never replaced, with or without --skip-existing (which skips only when every output exists)
        hint = "move it, or use --suffix" + ("" if skip_existing else " or --skip-existing")
        return PlannedFile(source, targets, "fail", f"{foreign[0]} exists and was not written by srkit; {hint}")
    return PlannedFile(source, targets, "run")


def check_output_folders(plan: BatchPlan) -> None:
    """Create every output folder and write a probe file in it: an unwritable output fails before any model."""
    folders = sorted({target.parent for f in plan.to_run() for target, _ in f.targets})
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".srkit-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"cannot write to the output folder {folder}: {exc.strerror or one_line(exc)}") from None


__all__ = [
    "RESIZE_FILTERS",
    "BatchPlan",
    "InputFile",
    "PlannedFile",
    "UpscaleSettings",
    "check_output_folders",
    "collect_inputs",
    "parse_tile",
    "plan_batch",
]
