"""The Python face of srkit, shared by the CLI and tests: `load_engine()` and `upscale_paths()`.

Everything a user feels that is not a network lives here once, for every engine: device and dtype choice,
pixel-space tiling, alpha, gray, bit depth, the final resize to any scale, seeded sampling, and batch semantics
(one bad file never stops the others; inputs are never overwritten; outputs are written atomically).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import srkit.engines  # noqa: F401  (declares the model names)
from srkit import registry
from srkit.alpha import bleed_colour
from srkit.common import build_options, one_line, resolve_device
from srkit.cpu_memory import keep_freed_memory
from srkit.engines.base import Engine, EngineSpec, Progress, WeightsSet, get_engine, model_names
from srkit.imageio import (
    WRITE_FORMATS,
    ImageData,
    ImageReadError,
    is_image_path,
    read_image,
    to_integer,
    write_image,
)
from srkit.tiling import run_tiled

DEFAULT_MODEL = "realesrgan-x4plus"
ALPHA_MODES = ("model", "resize", "drop")
RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}
CPU_AUTO_TILE = 384
"""Pixel tile for `--tile auto` on the CPU: bounded memory (~2 GB for RRDBNet) at ~15% overlap cost."""
DEFAULT_OVERLAP = 32
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Device, dtype and tile choice


def resolve_dtype(dtype: str, device: torch.device, spec: EngineSpec) -> torch.dtype:
    """`auto`: fp32 on the CPU (half is slow or unsupported there); bf16, else fp16, on CUDA."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        if "bfloat16" in spec.cuda_dtypes and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if "float16" in spec.cuda_dtypes else torch.float32
    names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    name = names.get(dtype, dtype)
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown dtype '{dtype}'; use auto, fp32, fp16 or bf16")
    if device.type != "cuda" and name != "float32":
        raise ValueError(f"--dtype {dtype} is for CUDA; on the CPU srkit runs in fp32")
    return getattr(torch, name)


def auto_tile(device: torch.device, scale: int) -> int:
    """Largest power-of-two pixel tile the device's *total* memory allows (free memory hides PyTorch's cache)."""
    if device.type != "cuda":
        return CPU_AUTO_TILE
    total = torch.cuda.get_device_properties(device).total_memory
    bytes_per_output_pixel = 64 * 2 * 4  # 64 fp16 feature maps, ~4 alive at the full-resolution convolutions
    side = math.sqrt(0.5 * total / (bytes_per_output_pixel * scale * scale))
    return int(min(2048, max(128, 2 ** math.floor(math.log2(side)))))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def resolve_weights(
    keys: tuple[str, ...],
    weights: str | Path | None,
    offline: bool | None,
    log: Log,
    main_entry: str | None = None,
) -> WeightsSet:
    """Local paths for every registry key the engine reads (main checkpoint first); `weights` replaces the main
    checkpoint, and `main_entry` names the registry entry that supplies it (a user model's own entry)."""
    paths: dict[str, Path] = {}
    for index, key in enumerate(keys):
        if index == 0 and weights is not None:
            path = Path(weights).expanduser()
            if not path.exists():
                raise registry.WeightsError(f"--weights {path} does not exist")
            paths[key] = path
        else:
            entry = main_entry if index == 0 and main_entry else key
            paths[key] = registry.resolve(entry, offline=offline, log=log)
    return WeightsSet(paths)


def add_model(
    name: str,
    path: str | Path,
    *,
    engine: str | None = None,
    sha256: str | None = None,
    licence: str | None = None,
    registry_file: str | Path | None = None,
    replace: bool = False,
) -> registry.WeightsEntry | None:
    """Name weights on this machine (a training export or a checkpoint) in a user registry so that `--model
    NAME` runs them on their engine (from the export's config unless given).  With `replace`, a built-in entry
    such as `sd21-text` can be pointed at local files too (its engine stays the default).

    Checked first: the engine is a model, a built-in model's own name keeps its own engine, and the path has
    the shape (folder or file) of what it stands for.  Returns the entry as srkit now reads it, or None when
    `registry_file` is not a file srkit reads (name it in SRKIT_REGISTRY).
    """
    reg = registry.load_registry()
    entries = reg.entries
    existing = entries.get(name)
    replaces_builtin = replace and name in reg.builtin_names
    default_engine = existing.engine if replaces_builtin else None
    fields = registry.local_entry(Path(path), engine=engine or default_engine, sha256=sha256, licence=licence)
    engine = fields["engine"]
    if name in model_names() and name != engine:
        raise ValueError(f"'{name}' is a built-in model with its own engine; choose another name")
    if replaces_builtin:
        reference, what = existing, f"'{name}'"
    elif engine not in model_names():
        raise ValueError(f"engine '{engine}' is not a model; use one of: {', '.join(model_names())}")
    else:
        reference = entries.get(get_engine(engine)[1].weights[0])
        what = f"the {engine} engine's main checkpoint"
    if reference is not None and reference.is_folder != (fields["format"] == "diffusers-folder"):
        shape = "a model folder" if reference.is_folder else "a single checkpoint file"
        raise ValueError(f"{what} is {shape}, and {path} is not one")
    target = registry.add_entry(name, fields, Path(registry_file) if registry_file else None, replace)
    entry = registry.load_registry().entries.get(name)
    return entry if entry is not None and entry.origin == target else None


def load_engine(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    weights: str | Path | None = None,
    tile: int | str | None = "auto",
    tile_overlap: int = DEFAULT_OVERLAP,
    offline: bool | None = None,
    log: Log = _stderr,
    **options: Any,
) -> Upscaler:
    """Build a ready-to-use upscaler for `model` (see `srkit models`); options are the engine's typed options."""
    engine_class, spec = get_engine(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, spec)
    engine_options = build_options(engine_class.options_class, options)
    if torch_device.type == "cpu":
        keep_freed_memory()  # srkit/cpu_memory.py: no page-fault storm for large activations
    keys = engine_class.weights_for(engine_options)
    weight_set = resolve_weights(keys, weights, offline, log, spec.weights[0])
    engine = engine_class.from_weights(weight_set, torch_device, torch_dtype, engine_options)
    for notice in engine.notices:
        log(f"{spec.name}: {notice}")
    if tile == "auto":
        tile_size = auto_tile(torch_device, spec.scale)
    elif tile in (None, 0, "0", "none"):
        tile_size = None
    else:
        tile_size = int(tile)
        if tile_size <= tile_overlap:
            raise ValueError(f"--tile {tile_size} must be larger than --tile-overlap {tile_overlap}")
    return Upscaler(engine, spec, tile_size, tile_overlap, log)


# ---------------------------------------------------------------------------------------------------------------
# The upscaler


@dataclass
class Upscaler:
    engine: Engine
    spec: EngineSpec
    tile: int | None
    tile_overlap: int
    log: Log = _stderr
    progress: Progress | None = None
    """(what, done, total) for pixel tiles, latent tiles and sampler steps of the image being processed."""

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    @torch.inference_mode()
    def upscale_tensor(self, batch: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """CPU Tensor[B,3,h,w] in [0,1] -> CPU Tensor[B,3,h·s,w·s]; tiles go to the device one at a time."""
        seed = self.engine.options.seed if seed is None else seed
        output = self._run(batch, seed)
        if self.engine.dtype != torch.float32 and not torch.isfinite(output).all():
            self.log(f"{self.spec.name}: non-finite output in {self.engine.dtype}; retrying in fp32")
            self.engine.to_dtype(torch.float32)
            output = self._run(batch, seed)
        return output.clamp_(0, 1)  # in place: the output is the largest buffer of a run

    def _run(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        generator = self.generator(seed) if self.spec.stochastic else None

        def on_device(piece: torch.Tensor) -> torch.Tensor:
            return self.engine.upscale(piece.to(self.device), generator=generator, progress=self.progress).float().cpu()

        if self.spec.tiling != "pixel":
            return on_device(batch)
        progress = self.progress
        on_tile = (lambda done, total: progress("tiles", done, total)) if progress else None
        return run_tiled(on_device, batch, self.spec.scale, self.tile, self.tile_overlap, on_tile=on_tile)

    def process(
        self,
        image: ImageData,
        *,
        scale: float | None = None,
        alpha: str = "model",
        resize_filter: str = "lanczos",
        seed: int | None = None,
    ) -> ImageData:
        """Upscale one decoded image: alpha (see srkit.alpha), gray kept gray, final resize to `scale`."""
        if alpha not in ALPHA_MODES:
            raise ValueError(f"--alpha must be one of {', '.join(ALPHA_MODES)}")
        rgb = image.rgb()
        planes = [bleed_colour(rgb, image.alpha) if image.alpha is not None and alpha != "drop" else rgb]
        if image.alpha is not None and alpha == "model":
            planes.append(np.repeat(image.alpha[:, :, None], 3, axis=2))
        batch = torch.from_numpy(np.stack(planes)).permute(0, 3, 1, 2).contiguous()
        result = self.upscale_tensor(batch, seed).permute(0, 2, 3, 1).numpy()
        out_rgb = result[0]
        out_alpha = None
        if image.alpha is not None and alpha != "drop":
            if alpha == "model":
                out_alpha = result[1].mean(axis=2)
            else:
                out_alpha = resize_array(image.alpha[:, :, None], out_rgb.shape[1], out_rgb.shape[0], resize_filter)[
                    :, :, 0
                ]
        target_w, target_h = target_size(image.width, image.height, scale or self.spec.scale)
        if (target_w, target_h) != (out_rgb.shape[1], out_rgb.shape[0]):
            out_rgb = np.clip(resize_array(out_rgb, target_w, target_h, resize_filter), 0, 1)
            if out_alpha is not None:
                out_alpha = np.clip(resize_array(out_alpha[:, :, None], target_w, target_h, resize_filter)[:, :, 0], 0, 1)
        if image.is_gray:
            out_rgb = out_rgb.mean(axis=2, keepdims=True)
        return image.with_pixels(out_rgb, out_alpha)

    def upscale(self, image: Image.Image | np.ndarray, **kwargs: Any) -> Image.Image | np.ndarray:
        """PIL image -> PIL image (8-bit), or float32 H×W×3 array in [0,1] -> array. kwargs as `process`."""
        if isinstance(image, np.ndarray):
            pixels = image.astype(np.float32)
            data = ImageData(pixels[:, :, None] if pixels.ndim == 2 else pixels)
            out = self.process(data, **kwargs).pixels
            return out[:, :, 0] if pixels.ndim == 2 else out
        has_alpha = "A" in image.getbands()
        array = np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
        data = ImageData(array[:, :, :3], array[:, :, 3] if has_alpha else None)
        out = self.process(data, **kwargs)
        planes = [out.pixels] + ([out.alpha[:, :, None]] if out.alpha is not None else [])
        array = to_integer(np.concatenate(planes, axis=2), 8)
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_array(array: np.ndarray, width: int, height: int, resize_filter: str) -> np.ndarray:
    """Float resize per channel (Pillow's 'F' mode keeps full precision for 16-bit data)."""
    try:
        method = RESIZE_FILTERS[resize_filter]
    except KeyError:
        raise ValueError(f"unknown resize filter '{resize_filter}'; use one of {', '.join(RESIZE_FILTERS)}") from None
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, c]), "F").resize((width, height), method))
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)


# ---------------------------------------------------------------------------------------------------------------
# Batches of files


@dataclass
class FileResult:
    input: str
    status: str
    """ok | skipped | failed"""
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BatchReport:
    model: str
    results: list[FileResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("ok", "skipped", "failed")}

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "counts": self.counts(),
            "files": [r.__dict__ for r in self.results],
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class InputFile:
    path: Path
    root: Path
    """Folder the path was found under (its relative path is kept below the output folder)."""


def collect_inputs(inputs: Iterable[str | Path], recursive: bool, warn: Log) -> tuple[list[InputFile], list[str]]:
    """Expand files, folders and globs; non-images are skipped with a warning, missing paths reported."""
    found: list[InputFile] = []
    missing: list[str] = []
    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in _glob(text))
            if not matches:
                missing.append(text)
            found += [InputFile(m, m.parent) for m in matches if m.is_file() and _check_image(m, warn)]
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("."))
            skipped = [p for p in files if not is_image_path(p)]
            if skipped:
                warn(f"skipping {len(skipped)} non-image file(s) in {path} (e.g. {skipped[0].name})")
            found += [InputFile(p, path) for p in files if is_image_path(p)]
        elif path.is_file():
            if _check_image(path, warn):
                found.append(InputFile(path, path.parent))
        else:
            missing.append(text)
    return found, missing


def _glob(pattern: str) -> list[str]:
    import glob

    return glob.glob(pattern, recursive=True)


def _check_image(path: Path, warn: Log) -> bool:
    if is_image_path(path):
        return True
    warn(f"skipping {path}: not an image file extension")
    return False


@dataclass(frozen=True)
class OutputPlan:
    """Where each input's output goes: `{stem}{suffix}[_s{seed}].{ext}`, next to the input or under `output`."""

    output: Path | None
    suffix: str | None
    ext: str
    scale: float

    @property
    def names_a_file(self) -> bool:
        return self.output is not None and self.output.suffix.lower() in WRITE_FORMATS

    def path_for(self, item: InputFile, sample_seed: int | None = None) -> Path:
        ext = item.path.suffix.lower() if self.ext == "auto" else "." + self.ext.lower().lstrip(".")
        if ext not in WRITE_FORMATS:
            ext = ".png"  # bmp/gif inputs, or an unknown --ext: write PNG
        if self.names_a_file:
            assert self.output is not None
            target = self.output
            if sample_seed is not None:
                target = target.with_name(f"{target.stem}_s{sample_seed}{target.suffix}")
            return target
        if self.output is None:
            folder, suffix = item.path.parent, f"_x{self.scale:g}" if self.suffix is None else self.suffix
        else:
            folder = self.output / item.path.parent.relative_to(item.root)
            suffix = self.suffix or ""
        sample = f"_s{sample_seed}" if sample_seed is not None else ""
        return folder / f"{item.path.stem}{suffix}{sample}{ext}"


def upscale_paths(
    inputs: Iterable[str | Path],
    output: str | Path | None = None,
    *,
    model: str = DEFAULT_MODEL,
    scale: float | None = None,
    suffix: str | None = None,
    ext: str = "auto",
    recursive: bool = False,
    skip_existing: bool = False,
    alpha: str = "model",
    resize_filter: str = "lanczos",
    samples: int = 1,
    seed: int = 0,
    quality: int = 95,
    upscaler: Upscaler | None = None,
    on_file: Callable[[FileResult, int, int], None] | None = None,
    progress: Progress | None = None,
    warn: Log = _stderr,
    **engine_kwargs: Any,
) -> BatchReport:
    """Upscale files/folders/globs into `output`; each file succeeds or fails on its own."""
    report = BatchReport(model)
    found, missing = collect_inputs(inputs, recursive, lambda m: (report.warnings.append(m), warn(m)))
    for item in missing:
        report.results.append(FileResult(item, "failed", error="no such file or folder"))
        if on_file:
            on_file(report.results[-1], 0, len(found))
    if samples < 1:
        raise ValueError("--samples must be at least 1")
    if upscaler is None and found:
        upscaler = load_engine(model, log=warn, seed=seed, **engine_kwargs)
    if upscaler is not None and progress is not None:
        upscaler.progress = progress
    if samples > 1 and upscaler is not None and not upscaler.spec.stochastic:
        raise ValueError(f"--samples needs a stochastic model; '{model}' always gives the same output")
    native = upscaler.spec.scale if upscaler else 4
    plan = OutputPlan(Path(output).expanduser() if output else None, suffix, ext, scale or native)
    if plan.names_a_file and len(found) > 1:
        raise ValueError(f"-o {output} names one file, but {len(found)} inputs were given; pass a folder")
    job = _FileJob(upscaler, plan, {item.path.resolve() for item in found}, skip_existing, alpha, resize_filter,
                   quality, seed, [seed + k for k in range(samples)] if samples > 1 else [None])
    for index, item in enumerate(found):
        started = time.perf_counter()
        result = job.run(item)
        result.seconds = round(time.perf_counter() - started, 4)
        report.results.append(result)
        if on_file:
            on_file(result, index + 1, len(found))
    return report


@dataclass(frozen=True)
class _FileJob:
    """What every file of a batch shares; `run` turns one input into its output(s) or one error line."""

    upscaler: Upscaler | None
    plan: OutputPlan
    inputs: set[Path]
    skip_existing: bool
    alpha: str
    resize_filter: str
    quality: int
    seed: int
    sample_seeds: list[int | None]

    def run(self, item: InputFile) -> FileResult:
        targets = [(self.plan.path_for(item, s), s) for s in self.sample_seeds]
        for target, _ in targets:
            if target.resolve() in self.inputs:
                return FileResult(str(item.path), "failed", error=f"{target} would overwrite an input; use -o or --suffix")
        if self.skip_existing and all(t.exists() for t, _ in targets):
            return FileResult(str(item.path), "skipped", [str(t) for t, _ in targets])
        assert self.upscaler is not None
        try:
            image = read_image(item.path)
            written = []
            for target, sample_seed in targets:
                out = self.upscaler.process(
                    image,
                    scale=self.plan.scale,
                    alpha=self.alpha,
                    resize_filter=self.resize_filter,
                    seed=self.seed if sample_seed is None else sample_seed,
                )
                written.append(str(write_image(target, out, self.quality)))
            return FileResult(str(item.path), "ok", written)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
            message = one_line(exc)
            if not isinstance(exc, (ImageReadError, ValueError, OSError, MemoryError)):
                message = f"{type(exc).__name__}: {message}"
            return FileResult(str(item.path), "failed", error=message)
