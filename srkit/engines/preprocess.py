"""The PIL pre-processing of the SD-based SR codebases, on 8-bit images as their scripts do it.

Each codebase enlarges small inputs to its processing size, upsamples ×4 with PIL's bicubic and fits the result to
what its networks accept; the details differ (rounding of the enlargement, the filter of the fit), so each engine
names its variant here instead of rewriting the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

UINT8 = Callable[[np.ndarray], np.ndarray]


def through_8bit(batch: torch.Tensor, prepare: UINT8) -> torch.Tensor:
    """Apply an H×W×3 uint8 -> uint8 preparation to every image of a [0, 1] batch; the result in [0, 1]."""
    prepared = []
    for image in batch:
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        prepared.append(torch.from_numpy(prepare(pixels)).permute(2, 0, 1))
    return torch.stack(prepared).float().div(255).to(batch.device)


def pil_resize(batch: torch.Tensor, size: tuple[int, int], resample: Image.Resampling) -> torch.Tensor:
    """An 8-bit [0, 1] batch resized to (height, width) with PIL, as the scripts resize their outputs."""
    return through_8bit(batch, lambda pixels: np.array(Image.fromarray(pixels).resize(size[::-1], resample)))


def enlarge_then_upscale(
    image: np.ndarray, scale: int, process_size: int, fit_filter: Image.Resampling
) -> np.ndarray:
    """OSEDiff / GDPO-SR / SeeSR: a side below process_size/scale is enlarged first (int() of the scaled sides,
    bicubic), then ×scale (bicubic), then resized down to a multiple of 8 with `fit_filter` (OSEDiff: Lanczos,
    SeeSR: bicubic).  `process_size` 0 skips the enlargement (training crops have a fixed size)."""
    pil = Image.fromarray(image)
    width, height = pil.size
    min_side = process_size // scale
    if width < min_side or height < min_side:
        factor = min_side / min(width, height)
        pil = pil.resize((int(factor * width), int(factor * height)), Image.Resampling.BICUBIC)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.BICUBIC)
    pil = pil.resize((pil.width - pil.width % 8, pil.height - pil.height % 8), fit_filter)
    return np.array(pil)


def upscale_then_auto_resize(image: np.ndarray, scale: int, process_size: int) -> np.ndarray:
    """ConsisSR / DiffBIR v1: ×scale first (ceil of the scaled sides, bicubic), then, when the short side is below
    `process_size`, bicubic up by process_size/short (ceil again), as `auto_resize`."""
    pil = Image.fromarray(image)
    pil = pil.resize((math.ceil(pil.width * scale), math.ceil(pil.height * scale)), Image.Resampling.BICUBIC)
    short = min(pil.size)
    if short < process_size:
        ratio = process_size / short
        pil = pil.resize((math.ceil(pil.width * ratio), math.ceil(pil.height * ratio)), Image.Resampling.BICUBIC)
    return np.array(pil)


__all__ = ["enlarge_then_upscale", "pil_resize", "through_8bit", "upscale_then_auto_resize"]
