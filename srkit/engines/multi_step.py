"""The multi-step diffusion SR base: prepare -> condition -> x_T -> sampler loop -> decode -> colour fix.

ConsisSR and SeeSR are thin subclasses: each states its pre-processing, its per-image (and per-tile) conditioning,
its start latent and its final 8-bit handling.  What is shared lives here once: the options every multi-step model
takes, the guided + latent-tiled denoiser the sampler calls (the unconditional pass keeps each tile's conditioning
and swaps only the text for the negative prompt's), and the loop with its progress reports.
"""

from __future__ import annotations

import torch

from srkit.diffusion.denoiser import Conditioning, Denoiser, guided, tiled
from srkit.diffusion.latents import VAETiling
from srkit.diffusion.samplers.ancestral import AncestralSampler, NoiseDraw, sample
from srkit.engines.base import Engine, Progress
from srkit.tiling import Box


class MultiStepEngine(Engine):
    """Subclasses set `network` (the denoiser of one latent batch), `text_negative`, `sampler`, `vae_tiling`,
    `guidance_scale` and implement `tile_condition` and `upscale`."""

    network: Denoiser
    text_negative: torch.Tensor
    sampler: AncestralSampler
    vae_tiling: VAETiling
    guidance_scale: float

    def tile_condition(self, cond: Conditioning, box: Box) -> Conditioning:
        """A latent tile's conditioning from the image's (computed once per tile, reused at every step)."""
        raise NotImplementedError

    def denoiser(self, tile: int, progress: Progress | None = None) -> Denoiser:
        """The guided network over latent tiles of side `tile` for one image."""
        options = self.options
        on_tile = (lambda done, total: progress("tiles", done, total)) if progress else None
        return tiled(
            guided(self.network, lambda c: c.with_tokens(text=self.text_negative), self.guidance_scale),
            tile,
            options.latent_overlap,
            tile_batch=options.tile_batch,
            on_tile=on_tile,
            tile_condition=self.tile_condition,
        )

    def run_sampler(
        self, x: torch.Tensor, cond: Conditioning, tile: int, draw: NoiseDraw, progress: Progress | None = None
    ) -> torch.Tensor:
        """Every sampler step from the start latent `x` to the clean latent."""
        return sample(self.denoiser(tile, progress), self.sampler, x, cond, draw, progress)


__all__ = ["MultiStepEngine"]
