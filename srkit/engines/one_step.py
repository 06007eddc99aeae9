"""The one-step diffusion SR base: prepare → condition → encode → one update → decode → colour fix → exactly scale×.

OSEDiff, NAOSD/GDPO-SR, GenDR and S3Diff are thin subclasses: each states its input preparation (`prepare`), its
per-image conditioning if any (`condition`: S3Diff's degradation-guided LoRA), and its one update (`denoise`, one of
`srkit.diffusion.samplers.one_step`).  Guidance, latent tiling, the tiled VAE, precision and colour fixes are the
shared parts below and in `srkit.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from srkit.colorfix import COLOR_FIXES, color_fix
from srkit.diffusion.denoiser import Conditioning, Denoiser, UNetDenoiser, guided, tiled
from srkit.diffusion.latents import LATENT_MODES, VAETiling, crop_to, pad_to_multiple, vae_decode, vae_encode
from srkit.diffusion.runtime import (
    check_attention,
    inference,
    maybe_compile,
    module_dtype,
    prepare_module,
    set_attention,
    vae_dtype,
)
from srkit.diffusion.schedule import NoiseSchedule
from srkit.engines.base import Engine, EngineOptions, EngineSpec, Progress

Generator = torch.Generator | None
Noise = torch.Tensor | None
"""Noise an engine would otherwise draw (tests replay upstream's recorded noise)."""


@dataclass
class OneStepOptions(EngineOptions):
    """What every one-step SD engine accepts (CLI: `--color-fix`, `--name value`, `-O key=value`)."""

    color_fix: str = "adain"
    """adain (upstream default), wavelet or none; against the upsampled input."""
    official_8bit: bool = True
    """Truncate to 8 bits before and after the colour fix, as upstream does through PIL; false keeps float."""
    latent: str = "sample"
    """sample: the seeded VAE posterior sample (upstream); mode: its mean (deterministic, not upstream)."""
    latent_tile: int = 96
    """Latent tile side; tiling starts when the latent area exceeds latent_tile² (0 = never tile)."""
    latent_overlap: int = 32
    tile_batch: int = 1
    """Latent tiles per UNet call (more fills a GPU better; same result)."""
    vae_encoder_tile: int = 1024
    """Tiled VAE encoder above this many image pixels (+ padding); 0 = never."""
    vae_decoder_tile: int = 224
    """Tiled VAE decoder above this many latent pixels (+ padding); 0 = never."""
    attention: str = "sdpa"
    """sdpa or xformers (CUDA)."""
    compile: bool = False
    """torch.compile the UNet (pays off on many same-sized tiles)."""

    def validate(self) -> None:
        super().validate()
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(
                f"color_fix must be one of {', '.join(COLOR_FIXES)} (--color-fix), got '{self.color_fix}'"
            )
        if self.latent not in LATENT_MODES:
            raise ValueError(f"latent must be 'sample' or 'mode', got '{self.latent}'")
        if self.latent_tile and not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError("latent_overlap must be at least 0 and smaller than latent_tile")
        if self.tile_batch < 1:
            raise ValueError("tile_batch must be at least 1")
        check_attention(self.attention)


@dataclass
class PromptedOptions(OneStepOptions):
    """Options of the text-conditioned engines of the OSEDiff family (OSEDiff, NAOSD, GDPO-SR)."""

    prompt: str = ""
    """User text; the model sees "{tags}, {prompt}," as upstream composes it."""
    tagger: str = "none"
    """Image tagger for the tags part of the prompt; only `none` exists so far."""
    prompt_embeds: str | None = None
    """A .safetensors file with a precomputed `prompt` embedding (1, 77, D): used instead of the text encoder."""

    def validate(self) -> None:
        super().validate()
        if self.tagger not in TAGGERS:
            raise ValueError(f"tagger '{self.tagger}' is not available; choose one of: {', '.join(TAGGERS)}")


TAGGERS = ("none",)


def one_step_spec(
    name: str, weights: tuple[str, ...], licence: str, description: str, parts: tuple[str, ...] = ("unet", "vae")
) -> EngineSpec:
    """What every one-step diffusion SR engine is: ×4, one step, latent tiling, seeded draws, a UNet and a VAE."""
    return EngineSpec(name, 4, 1, weights, licence, description, tiling="latent", stochastic=True, parts=parts)


class OneStepEngine(Engine):
    """The shared procedure; subclasses provide `from_weights`, `prepare` and `denoise` (and maybe `condition`)."""

    options_class: ClassVar[type[EngineOptions]] = OneStepOptions
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
        # Each part gets the dtype and kernels chosen for it (on the CPU a part may stay fp32 in a bf16 engine).
        prepare_module(self.unet, self.device, dtype, part="unet")
        prepare_module(self.vae, self.device, vae_dtype(self.vae, dtype), part="vae")
        self.dtype = dtype

    # -----------------------------------------------------------------------------------------------------------
    # The procedure

    def upscale(
        self, batch: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        height, width = batch.shape[-2:]
        # 1. Per-image conditioning from the raw LR (S3Diff's degradation-guided LoRA; nothing for the others).
        self.condition(batch)
        # 2. The engine's input preparation: the model input in [0, 1], about scale× the LR.
        prepared = self.prepare(batch)
        # 3-6. Encode, one update, decode, colour fix against the prepared input.
        enhanced = self.enhance(prepared, generator=generator, progress=progress)
        # 7. Exactly scale× the input (a no-op where the preparation already made it so).
        return resize_to(enhanced, (height * self.spec.scale, width * self.spec.scale))

    def condition(self, batch: torch.Tensor) -> None:
        """Per-image conditioning computed from the raw LR before anything else (default: none)."""

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


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device (the api seeds it per image)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased, like PIL's) resize, only when the size differs: the resize upstream meant to do."""
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


__all__ = [
    "TAGGERS",
    "OneStepEngine",
    "OneStepOptions",
    "PromptedOptions",
    "draw_noise",
    "one_step_spec",
    "resize_to",
]
