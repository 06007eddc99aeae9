"""The Python face of srkit, shared by the CLI and tests: `load_engine()` and `upscale_paths()`.

Everything a user feels that is not a network lives here once, for every engine: device and dtype choice,
pixel-space tiling, alpha, gray, bit depth, the final resize to any scale, seeded sampling, and batch semantics
(every option and every output path is settled before a model loads, see srkit.batch; one bad file never stops
the others; inputs are never overwritten; outputs are written atomically; under `torchrun`/`accelerate launch`
each process takes its share of the planned files and every process returns the merged report).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from srkit import distributed, registry
from srkit.alpha import ALPHA_MODES, bleed_colour
from srkit.batch import (
    RESIZE_FILTERS,
    BatchPlan,
    PlannedFile,
    UpscaleSettings,
    check_scale,
)
from srkit.common import check_choice, one_line, resolve_device
from srkit.cpu_features import Kernels, check_cpu_dtype, cpu_auto_dtype, cpu_engine_dtype, kernels_for
from srkit.cpu_memory import keep_freed_memory
from srkit.engines.base import (
    Engine,
    EngineOptions,
    EngineSpec,
    Progress,
    WeightsSet,
    get_engine,
    model_names,
)
from srkit.engines.catalogue import DEFAULT_MODEL
from srkit.imageio import (
    ImageData,
    ImageReadError,
    from_array,
    keeps_alpha,
    output_format,
    read_image,
    to_array,
    to_integer,
    write_image,
)
from srkit.report import BatchInterrupted, BatchReport, FileResult
from srkit.request import (
    DEFAULT_OVERLAP,
    ModelRequest,
    UpscaleRequest,
    check_model_request,
    dtype_name,
    prepare_upscale,
)
from srkit.tiling import run_tiled

CPU_AUTO_TILE = 384
"""Pixel tile for `--tile auto` on the CPU: bounded memory (~2 GB for RRDBNet) at ~15% overlap cost."""
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Device, dtype and tile choice


def resolve_dtype(dtype: str, device: torch.device, spec: EngineSpec) -> torch.dtype:
    """`auto`: bf16, else fp16, on CUDA; on the CPU bf16 where this kind of CPU was measured faster in bf16
    (srkit/cpu_features.py: AMX) and some part of the engine runs in bf16 there, else fp32.  The engine's parts
    then take their own dtype from that choice (`kernels_for`): on the CPU the numerically sensitive or
    unmeasured parts stay fp32.  `fp32` is fp32 in every part; `bf16` on the CPU needs native bf16."""
    if dtype == "auto":
        if device.type == "cpu":
            return cpu_engine_dtype(spec.parts, cpu_auto_dtype())
        if device.type != "cuda":
            return torch.float32
        if "bfloat16" in spec.cuda_dtypes and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if "float16" in spec.cuda_dtypes else torch.float32
    chosen = getattr(torch, dtype_name(dtype))
    if device.type == "cpu":
        check_cpu_dtype(chosen)
        return cpu_engine_dtype(spec.parts, chosen)
    elif device.type != "cuda" and chosen != torch.float32:
        raise ValueError(f"--dtype {dtype} is for CUDA or the CPU; on {device.type} srkit runs in fp32")
    return chosen


def precision_plan(model: str, device: str | torch.device = "cpu", dtype: str = "auto") -> dict[str, Kernels]:
    """Network part of `model` -> the dtype and kernels it runs with on `device` under `--dtype dtype`: what
    `srkit info` prints and benchmark reports record (the engines prepare their parts by the same rule)."""
    _, spec = get_engine(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device, spec)
    return {part: kernels_for(part, torch_device, torch_dtype) for part in spec.parts}


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
    checkpoint, and `main_entry` names the registry entry that supplies it (a user model's own entry).  Every
    file still missing is named in one error (registry.resolve_many), not one per run.  Keys an engine asks for
    later (named by its checkpoint: GenDR's VAE) are resolved one by one on demand."""
    paths: dict[str, Path] = {}
    entries = {key: main_entry if index == 0 and main_entry else key for index, key in enumerate(keys)}
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise registry.WeightsError(f"--weights {path} does not exist")
        paths[keys[0]] = path
        del entries[keys[0]]
    if entries:
        found = registry.resolve_many(list(dict.fromkeys(entries.values())), offline=offline, log=log)
        paths.update({key: found[entry] for key, entry in entries.items()})
    return WeightsSet(
        {key: paths[key] for key in keys}, resolve=lambda key: registry.resolve(key, offline=offline, log=log)
    )


@dataclass(frozen=True)
class EngineChoice:
    """A model with its device, precision, tiling and typed options, all checked without reading any weights
    (`choose_engine`); `load` then resolves the weights and builds the networks."""

    engine_class: type[Engine]
    spec: EngineSpec
    device: torch.device
    dtype: torch.dtype
    options: EngineOptions
    tile: int | str | None
    tile_overlap: int

    def load(self, weights: str | Path | None = None, offline: bool | None = None, log: Log = _stderr) -> Upscaler:
        if self.device.type == "cpu":
            keep_freed_memory()  # srkit/cpu_memory.py: no page-fault storm for large activations
        keys = self.engine_class.weights_for(self.options)
        weight_set = resolve_weights(keys, weights, offline, log, self.spec.weights[0])
        engine = self.engine_class.from_weights(weight_set, self.device, self.dtype, self.options)
        for notice in engine.notices:
            log(f"{self.spec.name}: {notice}")
        tile = auto_tile(self.device, self.spec.scale) if self.tile == "auto" else self.tile
        return Upscaler(engine, self.spec, tile, self.tile_overlap, log)  # type: ignore[arg-type]


def choose_engine(
    model: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    tile: int | str | None = "auto",
    tile_overlap: int = DEFAULT_OVERLAP,
    **options: Any,
) -> EngineChoice:
    """Check a model request (name, device, dtype, tile, the model's own options) in well under a second."""
    request = check_model_request(model, dtype=dtype, tile=tile, tile_overlap=tile_overlap, **options)
    return engine_choice(request, device)


def engine_choice(request: ModelRequest, device: str | torch.device) -> EngineChoice:
    """A checked model request on a device: what that device and precision allow is checked here (PyTorch)."""
    engine_class, spec = get_engine(request.model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(request.dtype, torch_device, spec)
    return EngineChoice(engine_class, spec, torch_device, torch_dtype, request.options, request.tile,
                        request.tile_overlap)  # fmt: skip


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
    choice = choose_engine(model, device=device, dtype=dtype, tile=tile, tile_overlap=tile_overlap, **options)
    return choice.load(weights, offline, log)


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
        check_choice(alpha, ALPHA_MODES, "--alpha")
        check_choice(resize_filter, RESIZE_FILTERS, "--resize-filter")
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
        """PIL image -> PIL image (8-bit), or array -> array of the same dtype and layout: uint8 (0..255),
        uint16 (0..65535) or float (0..1), H×W or H×W×C with C = 1..4 (2 and 4 carry alpha).  Other dtypes and
        out-of-range floats are refused with a one-line error.  kwargs as `process`."""
        if isinstance(image, np.ndarray):
            out = self.process(from_array(image), **kwargs)
            return to_array(out, image.dtype, two_dimensional=image.ndim == 2)
        has_alpha = "A" in image.getbands()
        array = np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
        data = ImageData(array[:, :, :3], array[:, :, 3] if has_alpha else None)
        out = self.process(data, **kwargs)
        planes = [out.pixels] + ([out.alpha[:, :, None]] if out.alpha is not None else [])
        array = to_integer(np.concatenate(planes, axis=2), 8)
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    check_scale(scale)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_array(array: np.ndarray, width: int, height: int, resize_filter: str) -> np.ndarray:
    """Float resize per channel (Pillow's 'F' mode keeps full precision for 16-bit data)."""
    check_choice(resize_filter, RESIZE_FILTERS, "--resize-filter")
    method = RESIZE_FILTERS[resize_filter]
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(array[:, :, c]), "F").resize((width, height), method))
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)


# ---------------------------------------------------------------------------------------------------------------
# Batches of files


FileCallback = Callable[[FileResult, int, int], None]
StartCallback = Callable[[str, int, int], None]


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
    on_plan: Callable[[BatchPlan], None] | None = None,
    on_start: StartCallback | None = None,
    on_file: FileCallback | None = None,
    progress: Progress | None = None,
    warn: Log = _stderr,
    weights: str | Path | None = None,
    offline: bool | None = None,
    device: str | torch.device = "auto",
    **engine_kwargs: Any,
) -> BatchReport:
    """Upscale files/folders/globs into `output`; each file succeeds or fails on its own.

    Before any model loads, every option is checked and every output path planned (srkit.request); a bad option
    or an impossible plan raises ValueError/KeyError.  `on_plan(plan)` then sees the plan, `on_start(input,
    done, total)` each file before it runs and `on_file(result, done, total)` each result (`total`: this
    process's files to run).  In a process group (torchrun) each rank runs its share and all get the merged
    report.  Ctrl-C raises BatchInterrupted with the report so far.
    """
    settings = UpscaleSettings(
        output=Path(output).expanduser() if output else None, scale=scale, suffix=suffix, ext=ext,
        recursive=recursive, skip_existing=skip_existing, alpha=alpha, resize_filter=resize_filter,
        samples=samples, seed=seed, quality=quality,
    )  # fmt: skip
    is_main = distributed.current().is_main
    request = prepare_upscale(inputs, settings, model=model, spec=upscaler.spec if upscaler is not None else None,
                              warn=warn if is_main else lambda message: None, **engine_kwargs)  # fmt: skip
    hooks = BatchHooks(on_plan=on_plan, on_start=on_start, on_file=on_file, progress=progress, warn=warn)
    return run_upscale(request, hooks, upscaler=upscaler, weights=weights, offline=offline, device=device)


@dataclass(frozen=True)
class BatchHooks:
    """What a batch tells its caller: `on_plan(plan)` once, `on_start(input, done, total)` before and
    `on_file(result, done, total)` after each file (`total`: this process's files to run), `progress(what, done,
    total)` per tile and step, `warn(message)` for notes."""

    on_plan: Callable[[BatchPlan], None] | None = None
    on_start: StartCallback | None = None
    on_file: FileCallback | None = None
    progress: Progress | None = None
    warn: Log = _stderr


def run_upscale(
    request: UpscaleRequest,
    hooks: BatchHooks = BatchHooks(),
    *,
    upscaler: Upscaler | None = None,
    weights: str | Path | None = None,
    offline: bool | None = None,
    device: str | torch.device = "auto",
) -> BatchReport:
    """Run a checked, planned batch (`srkit.request.prepare_upscale`); see `upscale_paths`."""
    on_plan, on_start, on_file, progress, warn = hooks.on_plan, hooks.on_start, hooks.on_file, hooks.progress, hooks.warn
    ranks = distributed.current()
    plan, settings, spec = request.plan, request.settings, request.spec
    choice = None
    if upscaler is None:
        assert request.model is not None
        choice = engine_choice(request.model, distributed.rank_device(device, ranks))  # device and dtype checked
    report = BatchReport(spec.name, processes=ranks.world, warnings=list(request.warnings))

    def note(message: str) -> None:
        report.warnings.append(message)
        warn(message)

    report.left_out = [str(path) for path in plan.left_out]
    if on_plan:
        on_plan(plan)
    distributed.barrier(ranks)  # every process has planned before any of them writes
    runnable = [index for index, planned in enumerate(plan.files) if planned.action == "run"]
    mine = ranks.share(runnable)
    if on_file and ranks.is_main:  # refused at planning: said before the model loads
        for result in _in_order(plan, {}):
            if result.status == "failed":
                on_file(result, 0, len(mine))
    results: dict[int, FileResult] = {}
    if mine and choice is not None:
        upscaler = choice.load(weights, offline, warn)
    if upscaler is not None and progress is not None:
        upscaler.progress = progress
    job = _FileJob(upscaler, settings, spec.scale, note)
    for done, index in enumerate(mine):
        planned = plan.files[index]
        if on_start:
            on_start(str(planned.input), done, len(mine))
        try:
            results[index] = job.run(planned)
        except KeyboardInterrupt:
            results.update({i: _not_run(plan.files[i]) for i in mine if i not in results})
            report.results = _in_order(plan, results)
            report.error = "interrupted"
            raise BatchInterrupted(report) from None
        if on_file:
            on_file(results[index], done + 1, len(mine))
    merged: dict[int, FileResult] = {}
    notes: list[str] = []
    for rank_results, rank_warnings in distributed.all_gather((results, report.warnings), ranks):
        merged.update(rank_results)
        notes += [w for w in rank_warnings if w not in notes]
    report.warnings = notes
    report.results = _in_order(plan, merged)
    return report


def _not_run(planned: PlannedFile) -> FileResult:
    return FileResult(str(planned.input), "not run", [str(t) for t, _ in planned.targets])


def _in_order(plan: BatchPlan, ran: dict[int, FileResult]) -> list[FileResult]:
    """Missing inputs, then every planned file in plan order: files that did not run say why."""
    results = [FileResult(item, "failed", error="no such file or folder") for item in plan.missing]
    for index, planned in enumerate(plan.files):
        if index in ran:
            results.append(ran[index])
        elif planned.action == "skip":
            results.append(FileResult(str(planned.input), "skipped", [str(t) for t, _ in planned.targets]))
        elif planned.action == "fail":
            results.append(FileResult(str(planned.input), "failed", error=planned.error))
        else:
            results.append(_not_run(planned))  # another rank's file, only when interrupted
    return results


@dataclass(frozen=True)
class _FileJob:
    """What every file of a batch shares; `run` turns one planned input into its output(s) or one error line."""

    upscaler: Upscaler | None
    settings: UpscaleSettings
    native_scale: float
    warn: Log

    def run(self, planned: PlannedFile) -> FileResult:
        assert self.upscaler is not None
        started = time.perf_counter()
        try:
            image = read_image(planned.input)
            written = []
            for target, sample_seed in planned.targets:
                out = self.upscaler.process(
                    image,
                    scale=self.settings.scale or self.native_scale,
                    alpha=self.settings.alpha,
                    resize_filter=self.settings.resize_filter,
                    seed=self.settings.seed if sample_seed is None else sample_seed,
                )
                fmt = output_format(target)
                if out.alpha is not None and not keeps_alpha(fmt) and float(out.alpha.min()) < 1.0:
                    self.warn(f"{planned.input}: transparency dropped in {target.name} ({fmt} has no alpha "
                              "channel); use --ext png, webp or tif to keep it")  # fmt: skip
                written.append(str(write_image(target, out, self.settings.quality)))
            result = FileResult(str(planned.input), "ok", written)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
            message = one_line(exc)
            if not isinstance(exc, (ImageReadError, ValueError, OSError, MemoryError)):
                message = f"{type(exc).__name__}: {message}"
            result = FileResult(str(planned.input), "failed", error=message)
        result.seconds = round(time.perf_counter() - started, 4)
        return result


__all__ = [
    "ALPHA_MODES",
    "RESIZE_FILTERS",
    "BatchHooks",
    "BatchInterrupted",
    "BatchReport",
    "EngineChoice",
    "FileResult",
    "Upscaler",
    "choose_engine",
    "engine_choice",
    "load_engine",
    "run_upscale",
    "upscale_paths",
]
