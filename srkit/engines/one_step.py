"""The one-step diffusion SR base: prepare → condition → encode → one update → decode → colour fix → exactly scale×.

OSEDiff, NAOSD/GDPO-SR, GenDR and S3Diff are thin subclasses: each states its input preparation (`prepare`), its
per-image conditioning if any (`condition`: S3Diff's degradation-guided LoRA), and its one update (`denoise`, one of
`srkit.diffusion.samplers.one_step`).  Guidance, latent tiling, the tiled VAE, precision and colour fixes are the
shared parts below and in `srkit.diffusion`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from srkit.colorfix import color_fix
from srkit.diffusion.denoiser import Conditioning, Denoiser, UNetDenoiser, guided, tiled
from srkit.diffusion.latents import (
    VAETiling,
    crop_to,
    pad_to_multiple,
    resize_to,
    vae_decode,
    vae_encode,
)
from srkit.diffusion.runtime import (
    inference,
    maybe_compile,
    module_dtype,
    prepare_networks,
    set_attention,
)
from srkit.diffusion.schedule import NoiseSchedule
from srkit.engines.base import Engine, Progress
from srkit.engines.options import OneStepOptions

Generator = torch.Generator | None
Noise = torch.Tensor | None
"""Noise an engine would otherwise draw (tests replay upstream's recorded noise)."""


class OneStepEngine(Engine):
    """The shared procedure; subclasses provide `from_weights`, `prepare` and `denoise` (and maybe `condition`)."""

    options_class: ClassVar[type[OneStepOptions]]
    pad_multiple: ClassVar[int] = 8
    """The encoder input is reflect-padded to this multiple (and the output cropped back)."""

    def __init__(
        self,
        unet,
        vae,
        prompt_embeds: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        options: OneStepOptions,
        schedule: NoiseSchedule | None = None,
        *,
        negative_embeds: torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> None:
        super().__init__(device, dtype, options)
        self.unet = unet
        self.vae = vae
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.guidance = guidance
        self.schedule = schedule
        """ᾱ table of the base model, for engines whose one step is defined by it (not GenDR)."""
        self.vae_tiling = VAETiling(encoder_tile=options.vae_encoder_tile, decoder_tile=options.vae_decoder_tile)
        set_attention(self.unet, options.attention, device)
        set_attention(self.vae, "sdpa", device)  # upstream uses memory-efficient attention for the UNet only
        self.to_dtype(dtype)
        self._unet_call = maybe_compile(self.unet, options.compile)

    def to_dtype(self, dtype: torch.dtype) -> None:
        prepare_networks(self.device, dtype, [self.unet], self.vae)
        self.dtype = dtype

    # -----------------------------------------------------------------------------------------------------------
    # The procedure

    def upscale(
        self, batch: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        height, width = batch.shape[-2:]
        # 1. The engine's input preparation: the model input in [0, 1], about scale× the LR.
        prepared = self.prepare(batch)
        # 2. Per-image conditioning (S3Diff: degradation-guided LoRA from the raw LR; the tag-prompted engines:
        #    the prompt of each image's tags).
        self.condition(batch, prepared)
        # 3-6. Encode, one update, decode, colour fix against the prepared input.
        enhanced = self.enhance(prepared, generator=generator, progress=progress)
        # 7. Exactly scale× the input (a no-op where the preparation already made it so).
        return resize_to(enhanced, (height * self.spec.scale, width * self.spec.scale))

    def condition(self, batch: torch.Tensor, prepared: torch.Tensor) -> None:
        """Per-image conditioning from the raw LR or the prepared input, before encoding (default: none)."""

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """Tensor[B,3,h,w] in [0,1] -> the model input Tensor[B,3,H,W] in [0,1] (the colour-fix reference)."""
        raise NotImplementedError

    def enhance(
        self, prepared: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        """Prepared input in [0,1] -> colour-fixed output in [0,1] at the prepared size (upstream's output)."""
        restored = self.restore(prepared * 2 - 1, generator=generator, progress=progress)
        options = self.options
        return color_fix(restored * 0.5 + 0.5, prepared, options.color_fix, official_8bit=options.official_8bit)

    def restore(self, image: torch.Tensor, *, generator: Generator = None, noise: Noise = None,
                progress: Progress | None = None) -> torch.Tensor:  # fmt: skip
        """Prepared image in [-1,1] -> restored image in [-1,1] at the same size.

        `noise` replaces the noise an engine would draw (tests replay upstream's recorded noise).
        """
        with inference(self.device, self.dtype):
            # 3. Encode: seeded posterior sample (upstream) or its mode, tiled VAE for large images.
            pixels, size = pad_to_multiple(image.to(self.device), self.pad_multiple)
            latents = vae_encode(
                self.vae, pixels, latent=self.options.latent, generator=generator, tiling=self.vae_tiling
            )
            # 4. The engine's one update: one (guided, latent-tiled) UNet evaluation -> clean latent.
            clean = self.denoise(latents, generator=generator, noise=noise, progress=progress)
            # 5. Decode, crop the padding, clamp.
            decoded = crop_to(vae_decode(self.vae, clean, tiling=self.vae_tiling), size)
        return decoded.float().clamp(-1, 1)

    def denoise(self, latents: torch.Tensor, *, generator: Generator = None, noise: Noise = None,
                progress: Progress | None = None) -> torch.Tensor:  # fmt: skip
        """Scaled LR latent -> predicted clean latent (float32), with one UNet evaluation."""
        raise NotImplementedError

    # -----------------------------------------------------------------------------------------------------------
    # Shared parts

    @property
    def prompts(self) -> Conditioning:
        return Conditioning({"text": self.prompt_embeds})

    def denoiser(self, progress: Progress | None = None) -> Denoiser:
        """The UNet's ε with the fixed prompt — guided by the negative prompt where the engine has one — over
        latent tiles when the latent is large."""
        options = self.options
        uncond = None if self.negative_embeds is None else Conditioning({"text": self.negative_embeds})
        on_tile = (lambda done, total: progress("tiles", done, total)) if progress else None
        return tiled(
            guided(UNetDenoiser(self._unet_call, module_dtype(self.unet)), uncond, self.guidance),
            options.latent_tile,
            options.latent_overlap,
            tile_batch=options.tile_batch,
            on_tile=on_tile,
        )


__all__ = [
    "OneStepEngine",
]
