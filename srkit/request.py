"""An upscale run checked and planned before PyTorch loads: the model, its options, precision name, tiles, every
per-run option, and every input mapped to its output.

Importing PyTorch takes seconds; a typo in an option should not cost them, let alone the minutes of a model load.
`prepare_upscale` does all that needs no PyTorch (srkit.engines.catalogue knows each model's spec and options
class); the command line calls it first, and `srkit.api` runs what it returns.  The api's own entry points call it
too, so a Python caller gets the same checks in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srkit.batch import BatchPlan, UpscaleSettings, check_output_folders, parse_tile, plan_batch
from srkit.common import build_options
from srkit.engines.catalogue import EngineSpec, describe
from srkit.engines.options import EngineOptions

DEFAULT_OVERLAP = 32
"""Pixel tile overlap in input pixels (`--tile-overlap`)."""
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float32": "float32",
               "float16": "float16", "bfloat16": "bfloat16"}  # fmt: skip
"""`--dtype` (besides auto) -> the PyTorch dtype's name."""
Log = Callable[[str], None]


def dtype_name(dtype: str) -> str:
    """The PyTorch dtype name `--dtype` asks for ("auto" stays "auto"); an unknown name is a one-line error."""
    if dtype == "auto":
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype '{dtype}'; use auto, fp32, fp16 or bf16")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class ModelRequest:
    """A model with its typed options, precision name and pixel tiles, all checked without PyTorch or weights."""

    model: str
    spec: EngineSpec
    options: EngineOptions
    dtype: str
    """"auto" or a PyTorch dtype name; what the device supports is checked when PyTorch is there (srkit.api)."""
    tile: int | str | None
    tile_overlap: int


def check_model_request(
    model: str,
    *,
    dtype: str = "auto",
    tile: int | str | None = "auto",
    tile_overlap: int = DEFAULT_OVERLAP,
    **options: Any,
) -> ModelRequest:
    """The model name (or your model), its options (an option it does not take is refused, naming the ones it
    does), the precision name and the pixel tile: ValueError/KeyError with one line on the first bad one."""
    _, described = describe(model)
    spec = described.spec
    tile_value = parse_tile(tile, tile_overlap)
    if isinstance(tile_value, int) and spec.tiling != "pixel":
        raise ValueError(f"--tile sets pixel tiles, but '{model}' tiles in latent space; use --latent-tile N")
    name = dtype_name(dtype)
    engine_options = build_options(described.options, options, owner=f"this model ({model})")
    return ModelRequest(model, spec, engine_options, name, tile_value, tile_overlap)


@dataclass
class UpscaleRequest:
    """A checked batch: the model request (None when the caller brings a loaded upscaler), the per-run settings
    and the plan; `warnings` are the planning notes to report (earlier srkit outputs left out, ...)."""

    model: ModelRequest | None
    spec: EngineSpec
    settings: UpscaleSettings
    plan: BatchPlan
    warnings: list[str] = field(default_factory=list)


def prepare_upscale(
    inputs: Iterable[str | Path],
    settings: UpscaleSettings,
    *,
    model: str,
    spec: EngineSpec | None = None,
    warn: Log,
    **model_kwargs: Any,
) -> UpscaleRequest:
    """Check the model request and plan every output (creating and probing the output folders), without PyTorch.

    `settings` were checked when built.  `spec` is that of an already loaded upscaler (then `model_kwargs` are
    not used); otherwise `model` and `model_kwargs` (dtype, tile, tile_overlap and the model's own options) are
    checked as `check_model_request`, with the settings' seed.
    """
    samples = settings.samples
    request = None if spec is not None else check_model_request(model, seed=settings.seed, **model_kwargs)
    spec = spec if request is None else request.spec
    if samples > 1 and not spec.stochastic:
        raise ValueError(f"--samples needs a stochastic model; '{spec.name}' always gives the same output")
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        warn(message)

    plan = plan_batch(inputs, settings, spec.scale, note)
    check_output_folders(plan)
    if plan.left_out:
        note(f"left out {len(plan.left_out)} earlier srkit output(s) found among the inputs "
             f"(e.g. {plan.left_out[0]}); their outputs are replaced, or kept with --skip-existing")  # fmt: skip
    return UpscaleRequest(request, spec, settings, plan, notes)


__all__ = [
    "DEFAULT_OVERLAP",
    "ModelRequest",
    "UpscaleRequest",
    "check_model_request",
    "dtype_name",
    "prepare_upscale",
]
