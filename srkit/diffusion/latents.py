"""Images ↔ latents: padding to the VAE's multiple (and back), seeded posterior sampling, scaling, the tiled VAE
hookup, and the final resize to exactly the requested size.

The encoder and decoder run tiled (GroupNorm statistics shared across tiles, `srkit/nn/tiled_vae.py`) when a
`VAETiling` says the image is large, so any size fits in memory.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from srkit.common import check_choice
from srkit.nn.tiled_vae import VAETiling, tiled_decode, tiled_encode
from srkit.option_values import LATENT_MODES

LatentMode = Literal["sample", "mode"]


def pad_to_multiple(image: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad right/bottom so both sides are multiples of `multiple`; returns the padded image and the original size.

    Reflect padding wider than the image (tiny inputs) is done in several passes instead of failing.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, image.shape[-2] - 1) if mode == "reflect" else pad_h
        step_w = min(pad_w, image.shape[-1] - 1) if mode == "reflect" else pad_w
        image = F.pad(image, (0, step_w, 0, step_h), mode=mode)
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return image, (height, width)


def crop_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return image[..., : size[0], : size[1]]


def latent_scale(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE config; shift is 0 for SD 1.x/2.x."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def encode_moments(encoder, quant_conv, image: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
    """The posterior moments (mean and log-variance channels) of a VAE encoder (+ quant_conv), on tiles when
    `tiling` says the image is large.  Shared by the SD VAE and encoder copies such as ConsisSR's hint encoder."""
    if tiling is not None and tiling.use_encoder_tiles(image):
        hidden = tiled_encode(encoder, image, tiling)
    else:
        hidden = encoder(image)
    return quant_conv(hidden) if quant_conv is not None else hidden


def vae_encode(
    vae,
    image: torch.Tensor,
    *,
    latent: LatentMode = "sample",
    generator: torch.Generator | None = None,
    tiling: VAETiling | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image in [-1, 1] -> scaled latent: a seeded posterior sample (the official behaviour) or its mode.

    `noise` replaces the sample's standard normal draw (tests replay upstream's recorded draws)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    check_choice(latent, LATENT_MODES, "latent")
    image = image.to(next(vae.parameters()).dtype)
    posterior = DiagonalGaussianDistribution(encode_moments(vae.encoder, vae.quant_conv, image, tiling))
    if latent == "mode":
        z = posterior.mode()
    elif noise is not None:
        z = posterior.mean + posterior.std * noise.to(posterior.mean)
    else:
        z = posterior.sample(generator=generator)
    scale, shift = latent_scale(vae)
    return (z - shift) * scale


def vae_decode(vae, latents: torch.Tensor, *, tiling: VAETiling | None = None) -> torch.Tensor:
    """Scaled latent -> image (not clamped), through a tiled decoder when `tiling` says the latent is large."""
    scale, shift = latent_scale(vae)
    z = (latents / scale + shift).to(next(vae.parameters()).dtype)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    if tiling is not None and tiling.use_decoder_tiles(z):
        return tiled_decode(vae.decoder, z, tiling)
    return vae.decoder(z)


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased, like PIL's) resize to `size`, clamped to [0, 1]; the image itself when it has it."""
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


__all__ = [
    "LATENT_MODES",
    "LatentMode",
    "VAETiling",
    "crop_to",
    "encode_moments",
    "latent_scale",
    "pad_to_multiple",
    "resize_to",
    "vae_decode",
    "vae_encode",
]
