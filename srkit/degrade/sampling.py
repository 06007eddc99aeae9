"""Per-sample random parameters of the pipeline, drawn apart from the pixel work.

Every sample owns its generators, seeded from (seed, sample index, stream): a sample's LR therefore does not
depend on the batch it is in, on its position in that batch, or on the device, and the parameter stream
can be drawn (and its statistics checked) without touching any image.  The reference draws one resize
scale per batch and shares one gray-noise field across the batch; per-sample draws replace both, which is
what "seeded per sample" requires.

All generators live on the CPU, noise fields included (they are moved to the image's device afterwards), so
the same seed gives the same LR on CPU and CUDA up to float rounding in the convolutions and resizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from srkit.degrade.config import RESIZE_MODES, DegradationConfig, StageConfig
from srkit.degrade.kernels import KernelParams

PARAMS_STREAM, NOISE_STREAM, CROP_STREAM = 0, 1, 2
"""Independent random streams of one sample: parameters, noise fields, crop position."""
SINC_LOW_CUTOFF_SIZE = 13
"""Sinc kernels smaller than this draw ω from [π/3, π], larger ones from [π/5, π] (published rule)."""


def sample_seed(seed: int, index: int, stream: int = PARAMS_STREAM) -> int:
    """A well-mixed 63-bit seed for one stream of one sample (neighbouring indices give unrelated streams)."""
    state = np.random.SeedSequence(seed, spawn_key=(index, stream)).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def sample_generator(seed: int, index: int, stream: int = PARAMS_STREAM) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index, stream))


@dataclass(frozen=True)
class NoiseParams:
    kind: str
    """gaussian | poisson."""
    strength: float
    """Gaussian σ on the 0..255 scale, or the Poisson noise scale."""
    gray: bool


@dataclass(frozen=True)
class StageParams:
    kernel: KernelParams | None
    """None: this stage does not blur."""
    resize: str
    """up | down | keep."""
    resize_scale: float
    resize_mode: str
    noise: NoiseParams
    jpeg_quality: int


@dataclass(frozen=True)
class DegradationParams:
    """Every random choice for one sample."""

    stage1: StageParams
    stage2: StageParams
    final_sinc: KernelParams | None
    """None: the final filter is the identity (the reference's delta pulse)."""
    final_resize_mode: str
    sinc_before_jpeg: bool


class _Draw:
    """Scalar draws from one generator; a fixed order of calls makes a sample's parameters reproducible."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator, dtype=torch.float64).item()

    def chance(self, probability: float) -> bool:
        return torch.rand((), generator=self.generator, dtype=torch.float64).item() < probability

    def integer(self, low: int, high: int) -> int:
        """Uniform over the closed range [low, high]."""
        return int(torch.randint(low, high + 1, (), generator=self.generator).item())

    def choice(self, options: tuple, probs: tuple[float, ...] | None = None):
        if probs is None:
            return options[self.integer(0, len(options) - 1)]
        u, total = self.uniform(0.0, 1.0), 0.0
        for option, p in zip(options, probs, strict=True):
            total += p
            if u < total:
                return option
        return options[max(i for i, p in enumerate(probs) if p > 0)]  # u beyond a sum rounded below 1

    def odd_size(self, size_range: tuple[int, int]) -> int:
        low, high = size_range
        return low + 2 * self.integer(0, (high - low) // 2)

    def beta(self, beta_range: tuple[float, float]) -> float:
        """Shape β: a fair coin picks the part of the range below or above 1, so that both heavier-tailed
        (β < 1) and flatter (β > 1) kernels are common whatever the range's width (published rule; a range
        that starts at 1, like the plateau's [1, 2], gives β = 1 on the lower side)."""
        low, high = beta_range
        if self.chance(0.5):
            return self.uniform(low, max(low, min(1.0, high)))
        return self.uniform(min(high, max(1.0, low)), high)


def _sinc(draw: _Draw, size: int, low_cutoff: float) -> KernelParams:
    return KernelParams("sinc", size, cutoff=draw.uniform(low_cutoff, math.pi))


def _blur_kernel(draw: _Draw, config: StageConfig) -> KernelParams:
    size = draw.odd_size(config.kernel_size_range)
    if draw.chance(config.sinc_prob):
        return _sinc(draw, size, math.pi / 3 if size < SINC_LOW_CUTOFF_SIZE else math.pi / 5)
    kind = draw.choice(config.kernel_list, config.kernel_prob)
    sigma_x = draw.uniform(*config.blur_sigma)
    if not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = draw.uniform(*config.blur_sigma), draw.uniform(-math.pi, math.pi)
    beta = 1.0
    if kind.startswith("generalized"):
        beta = draw.beta(config.betag_range)
    elif kind.startswith("plateau"):
        beta = draw.beta(config.betap_range)
    return KernelParams(kind, size, sigma_x, sigma_y, theta, beta)


def _stage(draw: _Draw, config: StageConfig) -> StageParams:
    kernel = _blur_kernel(draw, config) if draw.chance(config.blur_prob) else None
    resize = draw.choice(("up", "down", "keep"), config.resize_prob)
    scale = 1.0
    if resize == "up":
        scale = draw.uniform(1.0, config.resize_range[1])
    elif resize == "down":
        scale = draw.uniform(config.resize_range[0], 1.0)
    mode = draw.choice(RESIZE_MODES)
    if draw.chance(config.gaussian_noise_prob):
        noise = NoiseParams("gaussian", draw.uniform(*config.noise_range), draw.chance(config.gray_noise_prob))
    else:
        noise = NoiseParams("poisson", draw.uniform(*config.poisson_scale_range), draw.chance(config.gray_noise_prob))
    return StageParams(kernel, resize, scale, mode, noise, draw.integer(*config.jpeg_range))


def sample_params(config: DegradationConfig, generator: torch.Generator) -> DegradationParams:
    """Draw one sample's parameters, in a fixed order, from its own generator."""
    draw = _Draw(generator)
    stage1, stage2 = _stage(draw, config.stage1), _stage(draw, config.stage2)
    final_sinc = None
    if draw.chance(config.final_sinc_prob):
        final_sinc = _sinc(draw, draw.odd_size(config.stage2.kernel_size_range), math.pi / 3)
    return DegradationParams(stage1, stage2, final_sinc, draw.choice(RESIZE_MODES),
                             draw.chance(config.final_sinc_first_prob))
