"""The Real-ESRGAN second-order degradation: HR batch in, LR batch out, each sample seeded on its own.

Steps for one sample (Real-ESRGAN paper §3, official `feed_data`):

0. unsharp-mask the HR (optional, on by default as in the reference);
1. first stage: blur with kernel 1 → resize up/down/keep → Gaussian or Poisson noise → JPEG;
2. second stage: blur with kernel 2 (probability 0.8) → resize to (HR / scale) · s2 → noise → either
   [resize to HR / scale + sinc filter] → JPEG, or JPEG → [resize to HR / scale + sinc filter];
3. round to 8 bits (unless the config says `round_8bit = false`).

Batching: the HR batch is sharpened in one call, but after the first resize every sample has its own size
(a per-sample seed draws a per-sample scale), so the stages run per sample.  The per-sample path is also
what makes a batch give bit-identical LRs to running its samples one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from srkit.degrade.config import DegradationConfig
from srkit.degrade.filters import filter2d, resize, usm_sharpen
from srkit.degrade.jpeg import jpeg_compress
from srkit.degrade.noise import add_noise
from srkit.degrade.sampling import (
    NOISE_STREAM,
    DegradationParams,
    StageParams,
    sample_generator,
    sample_params,
)


class DegradationPipeline:
    """Callable: `pipeline(hr, seed)` maps B×3×H×W in [0, 1] to B×3×(H // scale)×(W // scale)."""

    def __init__(self, config: DegradationConfig | None = None, scale: int = 4) -> None:
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.config = config or DegradationConfig()
        self.scale = scale

    def sample(self, seed: int, index: int) -> DegradationParams:
        """The random parameters of sample `index` under `seed` (no pixel work)."""
        return sample_params(self.config, sample_generator(seed, index))

    @torch.no_grad()
    def __call__(self, hr: torch.Tensor, seed: int, indices: Sequence[int] | None = None) -> torch.Tensor:
        """Degrade a batch; sample i uses the streams of `indices[i]` (default: its position in the batch)."""
        if hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"expected an RGB batch B×3×H×W, got shape {tuple(hr.shape)}")
        if min(hr.shape[-2:]) < self.scale:
            raise ValueError(f"HR {hr.shape[-1]}x{hr.shape[-2]} is smaller than the scale {self.scale}")
        indices = list(range(hr.shape[0])) if indices is None else list(indices)
        if len(indices) != hr.shape[0]:
            raise ValueError(f"{len(indices)} sample indices for a batch of {hr.shape[0]}")
        source = hr.float()
        if self.config.usm_sharpen:
            source = usm_sharpen(source)
        return torch.stack([
            self.degrade_one(image, self.sample(seed, index), sample_generator(seed, index, NOISE_STREAM))
            for image, index in zip(source, indices, strict=True)
        ])

    def degrade_one(self, image: torch.Tensor, params: DegradationParams,
                    noise_generator: torch.Generator) -> torch.Tensor:
        """Stages 1-3 for one 3×H×W image (already sharpened) with given parameters."""
        height, width = image.shape[-2:]
        lr_size = (height // self.scale, width // self.scale)
        x = image[None]

        first = params.stage1
        x = self._blur_resize_noise(x, first, (int(height * first.resize_scale), int(width * first.resize_scale)),
                                    noise_generator)
        x = jpeg_compress(x[0], first.jpeg_quality)[None]

        second = params.stage2
        stage2_size = (int(height / self.scale * second.resize_scale), int(width / self.scale * second.resize_scale))
        x = self._blur_resize_noise(x, second, stage2_size, noise_generator)
        if params.sinc_before_jpeg:
            x = self._final_filter(x, params, lr_size)
            x = jpeg_compress(x[0].clamp(0, 1), second.jpeg_quality)[None]
        else:
            x = jpeg_compress(x[0], second.jpeg_quality)[None]
            x = self._final_filter(x, params, lr_size)
        lr = x[0].clamp(0, 1)
        return (lr * 255).round() / 255 if self.config.round_8bit else lr

    @staticmethod
    def _blur_resize_noise(x: torch.Tensor, stage: StageParams, size: tuple[int, int],
                           noise_generator: torch.Generator) -> torch.Tensor:
        if stage.kernel is not None:
            x = filter2d(x, stage.kernel.build())
        x = resize(x, size, stage.resize_mode)
        return add_noise(x[0], stage.noise, noise_generator)[None]

    @staticmethod
    def _final_filter(x: torch.Tensor, params: DegradationParams, lr_size: tuple[int, int]) -> torch.Tensor:
        """Resize to the LR size, then the sinc filter (ringing/overshoot) when one was drawn."""
        x = resize(x, lr_size, params.final_resize_mode)
        return x if params.final_sinc is None else filter2d(x, params.final_sinc.build())
