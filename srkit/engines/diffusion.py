"""Options every diffusion engine shares (one-step and multi-step): colour fix, 8-bit behaviour, latent tiling,
tiled VAE, attention kernels and compilation.  Checked when the options are built, before any weights load."""

from __future__ import annotations

from dataclasses import dataclass

from srkit.colorfix import COLOR_FIXES
from srkit.diffusion.runtime import check_attention
from srkit.engines.base import EngineOptions


@dataclass
class DiffusionOptions(EngineOptions):
    color_fix: str = "adain"
    """adain (upstream default), wavelet or none; against the upsampled input."""
    official_8bit: bool = True
    """Truncate to 8 bits around the colour fix as upstream does through PIL; false keeps float until writing."""
    latent_tile: int = 96
    """Latent tile side; tiling starts when the latent area exceeds latent_tile² (0 = never tile)."""
    latent_overlap: int = 32
    tile_batch: int = 1
    """Latent tiles per network call (more fills a GPU better; same result)."""
    vae_encoder_tile: int = 1024
    """Tiled VAE encoder above this many image pixels (+ padding); 0 = never."""
    vae_decoder_tile: int = 224
    """Tiled VAE decoder above this many latent pixels (+ padding); 0 = never."""
    attention: str = "sdpa"
    """sdpa or xformers (CUDA)."""
    compile: bool = False
    """torch.compile the denoising network (pays off on many same-sized tiles)."""

    def validate(self) -> None:
        super().validate()
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(
                f"color_fix must be one of {', '.join(COLOR_FIXES)} (--color-fix), got '{self.color_fix}'"
            )
        if self.latent_tile and not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError("latent_overlap must be at least 0 and smaller than latent_tile")
        if self.tile_batch < 1:
            raise ValueError("tile_batch must be at least 1")
        check_attention(self.attention)


__all__ = ["DiffusionOptions"]
