"""Additive Gaussian and Poisson (shot) noise, colour or gray, for one image at a time.

Noise fields are drawn from a CPU generator and moved to the image's device, so a seed means the same noise
on every device.  "Gray" noise is one field shared by the three channels: luminance noise without colour
speckles, as sensors and denoised phone pictures show.
"""

from __future__ import annotations

import math

import torch

from srkit.degrade.sampling import NoiseParams

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights, for gray Poisson noise computed on the luminance."""


def gaussian_noise(image: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Noise field N(0, (σ/255)²) for a C×H×W image; gray: one H×W field repeated over channels."""
    channels, height, width = image.shape
    field = torch.randn((1 if gray else channels, height, width), generator=generator)
    return (field * (sigma / 255)).to(image.device).expand(channels, height, width)


def poisson_noise(image: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Shot-noise field for a C×H×W image in [0, 1], multiplied by `scale`.

    The image is quantised to 8 bits and treated as photon counts: with n distinct levels, the counts are
    the image times 2^ceil(log2 n), so an image with few levels (a graphic) gets coarse, strong noise and a
    photograph gets fine noise, as in the reference.  Counting levels with a 256-bin histogram replaces the
    reference's per-sample `unique` (a sort) at the same result.
    """
    source = image.detach().float().cpu()
    if gray:
        source = torch.tensordot(torch.tensor(LUMA), source, dims=([0], [0]))[None]
    levels = (source.clamp(0, 1) * 255).round()
    distinct = int(torch.count_nonzero(torch.bincount(levels.flatten().long(), minlength=256)))
    counts = 2.0 ** math.ceil(math.log2(max(distinct, 1)))
    quantised = levels / 255
    noise = torch.poisson(quantised * counts, generator=generator) / counts - quantised
    return (noise * scale).to(image.device).expand(image.shape)


def add_noise(image: torch.Tensor, params: NoiseParams, generator: torch.Generator) -> torch.Tensor:
    """The image plus its drawn noise, clamped to [0, 1]."""
    if params.kind == "gaussian":
        noise = gaussian_noise(image, params.strength, params.gray, generator)
    elif params.kind == "poisson":
        noise = poisson_noise(image, params.strength, params.gray, generator)
    else:
        raise ValueError(f"unknown noise kind '{params.kind}'; use gaussian or poisson")
    return (image + noise.to(image.dtype)).clamp(0, 1)
