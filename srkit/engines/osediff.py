"""OSEDiff, NAOSD and GDPO-SR: one VAE encode, one UNet call at a fixed timestep, x0, one VAE decode (SD2.1).

The three differ only in their weights and in what happens to the latent before the UNet:
- `osediff`: SD2.1-base + the official `osediff.pkl` (LoRA on the UNet and the VAE encoder, a retrained UNet
  conv_in), UNet at t=999 on the latent itself.
- `naosd` / `gdpo`: merged diffusers UNet/VAE; the latent is first noised to t_add=250 with seeded noise, then
  the UNet denoises it as if it were at t_diff=100 (the "unequal timesteps" of NAOSD).  The noise is what makes
  one LR give many plausible outputs, so `--samples N` is the point of these models.

Deliberate differences from the official scripts (notes/osediff-naosd-gdpo.md), each chosen for users:
- every random draw (posterior sample, injected noise) is seeded; upstream is unseeded;
- the output is exactly 4× the input: upstream's own resize back after enlarging small inputs is a no-op bug
  (issue #52), so small or odd-sized inputs come out larger there;
- GDPO/NAOSD tile the latent like OSEDiff for large inputs (upstream GDPO never tiles and runs out of memory).
Upstream's 8-bit truncation before and after the colour fix is kept by default (`official_8bit`, as in the
S3Diff engine); `official_8bit=false` keeps the output float until it is written.
Prompts: upstream builds them from DAPE (RAM) tags of each image.  Only `--tagger none` exists so far, which
gives upstream's text for an image with no tags; see the README for what that costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from srkit.colorfix import COLOR_FIXES, color_fix
from srkit.engines import sd
from srkit.engines.base import Engine, EngineOptions, EngineSpec, WeightsSet, register
from srkit.nn.lora_merge import PEFT_DEFAULT_ALPHA, merge_peft_state
from srkit.nn.tiled_vae import VAETiling
from srkit.registry import WeightsError
from srkit.tiling import run_latent_tiled

SD21_LICENCE = "SD2.1 CreativeML-OpenRAIL++-M"
GDPO_LICENCE = "Apache-2.0 (README only, no LICENSE file) + " + SD21_LICENCE
TAGGERS = ("none",)
PROMPT_KEY = "prompt"
"""Key of the positive prompt in a precomputed `prompt_embeds` file."""


# ---------------------------------------------------------------------------------------------------------------
# Options


@dataclass
class OneStepOptions(EngineOptions):
    """What every one-step SD engine accepts (CLI: `--color-fix`, `-O key=value`)."""

    color_fix: str = "adain"
    """adain (upstream default), wavelet or none; against the bicubic-upsampled input."""
    official_8bit: bool = True
    """Truncate to 8 bits before and after the colour fix, as upstream does through PIL; false keeps float."""
    latent: str = "sample"
    """sample: the seeded VAE posterior sample (upstream); mode: its mean (deterministic, not upstream)."""
    latent_tile: int = 96
    """Latent tile side; tiling starts when the latent area exceeds latent_tile² (0 = never tile)."""
    latent_overlap: int = 32
    vae_encoder_tile: int = 1024
    """Tiled VAE encoder above this many image pixels (+ padding); 0 = never."""
    vae_decoder_tile: int = 224
    """Tiled VAE decoder above this many latent pixels (+ padding); 0 = never."""
    attention: str = "sdpa"
    """sdpa or xformers (CUDA)."""
    compile: bool = False
    """torch.compile the UNet (pays off on many same-sized tiles)."""


@dataclass
class PromptedOptions(OneStepOptions):
    """Options of the text-conditioned engines (OSEDiff, NAOSD, GDPO-SR)."""

    prompt: str = ""
    """User text; the model sees "{tags}, {prompt}," as upstream composes it."""
    tagger: str = "none"
    """Where the tags come from; only `none` (no tags) for now."""
    prompt_embeds: str | None = None
    """A .safetensors file with a precomputed `prompt` embedding (1, 77, D): used instead of the text encoder."""


@dataclass
class OSEDiffOptions(PromptedOptions):
    timestep: int = 999


@dataclass
class NoiseInjectionOptions(PromptedOptions):
    prompt: str = "clean, high-resolution, 8k"
    t_add: int = 250
    """Timestep the latent is noised to (seeded noise)."""
    t_diff: int = 100
    """Timestep the UNet is told, and whose ᾱ turns its ε into x0."""


def compose_prompt(tags: str, prompt: str) -> str:
    """Upstream's prompt text, `"{tags}, {prompt},"` (OSEDiff with no prompt: "tag, tag, ,")."""
    return f"{tags}, {prompt},"


def check_options(options: OneStepOptions) -> None:
    """Reject bad option values when the engine is built, not on the first image."""
    if options.color_fix not in COLOR_FIXES:
        raise ValueError(f"color_fix must be one of {', '.join(COLOR_FIXES)}, got '{options.color_fix}'")
    if options.latent not in ("sample", "mode"):
        raise ValueError(f"latent must be 'sample' or 'mode', got '{options.latent}'")
    if options.latent_tile and options.latent_overlap >= options.latent_tile:
        raise ValueError("latent_overlap must be smaller than latent_tile")
    if isinstance(options, PromptedOptions) and options.tagger not in TAGGERS:
        raise ValueError(f"tagger '{options.tagger}' is not available; choose one of: {', '.join(TAGGERS)}")


# ---------------------------------------------------------------------------------------------------------------
# Input preparation, exactly as test_osediff.py (and GDPO's test.py) do it with PIL


def prepare_official(image: np.ndarray, scale: int = 4, process_size: int = 512) -> np.ndarray:
    """uint8 H×W×3 LR -> uint8 model input: min side to process_size/scale, ×scale, multiple of 8.

    PIL's default filter (bicubic) for the enlargement and the ×scale; Lanczos for the multiple-of-8 fix, which
    upstream does by resizing, not cropping.  The enlargement uses int() of the scaled sides, as upstream.
    """
    pil = Image.fromarray(image)
    width, height = pil.size
    min_side = process_size // scale
    if width < min_side or height < min_side:
        factor = min_side / min(width, height)
        pil = pil.resize((int(factor * width), int(factor * height)), Image.Resampling.BICUBIC)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.BICUBIC)
    pil = pil.resize((pil.width - pil.width % 8, pil.height - pil.height % 8), Image.Resampling.LANCZOS)
    return np.array(pil)


def prepare_batch(batch: torch.Tensor, scale: int) -> torch.Tensor:
    """Tensor[B,3,h,w] in [0,1] -> the prepared model input Tensor[B,3,H,W] in [0,1] (via 8-bit, as upstream)."""
    prepared = []
    for image in batch:
        pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        prepared.append(torch.from_numpy(prepare_official(pixels, scale)).permute(2, 0, 1))
    return torch.stack(prepared).float().div(255).to(batch.device)


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased, like PIL's) resize, only when the size differs: the resize upstream meant to do."""
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# The shared one-step engine


class OneStepEngine(Engine):
    """prepare → encode → denoise (engine-specific, one UNet call) → decode → colour fix → exactly scale×.

    Subclasses provide `from_weights` (which calls `check_options` before reading any file) and `denoise`;
    everything else is the same for every one-step model.
    """

    options_class: ClassVar[type[EngineOptions]] = OneStepOptions

    def __init__(
        self,
        unet,
        vae,
        prompt_embeds: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        options: OneStepOptions,
        schedule: sd.NoiseSchedule | None = None,
    ) -> None:
        super().__init__(device, dtype, options)
        self.unet = unet
        self.vae = vae
        self.prompt_embeds = prompt_embeds
        self.schedule = schedule
        """ᾱ table of the base model, for engines whose one step is defined by it (not GenDR)."""
        self.vae_tiling = VAETiling(encoder_tile=options.vae_encoder_tile, decoder_tile=options.vae_decoder_tile)
        sd.set_attention(self.unet, options.attention, device)
        sd.set_attention(self.vae, options.attention, device)
        self.to_dtype(dtype)
        self._unet_call = sd.maybe_compile(self.unet, options.compile)

    def to_dtype(self, dtype: torch.dtype) -> None:
        sd.prepare_module(self.unet, self.device, dtype)
        sd.prepare_module(self.vae, self.device, sd.vae_dtype(self.vae, dtype))
        self.dtype = dtype

    @torch.inference_mode()
    def upscale(self, batch: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        height, width = batch.shape[-2:]
        scale = self.spec.scale
        # 1. Official input preparation: min side 128, bicubic ×4, multiple of 8.
        prepared = prepare_batch(batch, scale)
        # 2-5. Encode, one step, decode (`restore`), colour fix.
        enhanced = self.enhance(prepared, generator=generator)
        # 6. Exactly scale× the input (upstream meant to resize back, but its resize is a no-op).
        return resize_to(enhanced, (height * scale, width * scale))

    def enhance(self, prepared: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prepared input in [0,1] -> colour-fixed output in [0,1] at the prepared size (upstream's output)."""
        restored = self.restore(prepared * 2 - 1, generator=generator)
        options = self.options
        return color_fix(restored * 0.5 + 0.5, prepared, options.color_fix, official_8bit=options.official_8bit)

    def restore(
        self, image: torch.Tensor, *, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prepared image in [-1,1] -> restored image in [-1,1] at the same size.

        `noise` replaces the noise an engine would draw (tests replay upstream's recorded noise).
        """
        with sd.inference(self.device, self.dtype):
            # 2. Encode: seeded posterior sample (upstream) or its mode, tiled VAE for large images.
            pixels = image.to(self.device)
            latents = sd.vae_encode(self.vae, pixels, latent=self.options.latent, generator=generator, tiling=self.vae_tiling)
            # 3. The engine's one step: one UNet evaluation (latent-tiled when large) -> clean latent.
            clean = self.denoise(latents, generator=generator, noise=noise)
            # 4. Decode and clamp.
            decoded = sd.vae_decode(self.vae, clean, tiling=self.vae_tiling)
        return decoded.float().clamp(-1, 1)

    def denoise(
        self, latents: torch.Tensor, *, generator: torch.Generator | None, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """Scaled LR latent -> predicted clean latent (float32), with one UNet evaluation."""
        raise NotImplementedError

    def eps(self, latents: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet's ε at timestep t with the fixed prompt, over latent tiles when the latent is large."""

        def one_tile(piece: torch.Tensor) -> torch.Tensor:
            return sd.unet_eps(self._unet_call, piece, t, self.prompt_embeds)

        tile = self.options.latent_tile or max(latents.shape[-2:])
        return run_latent_tiled(one_tile, latents, tile, self.options.latent_overlap)


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device (the api seeds it per image)."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


# ---------------------------------------------------------------------------------------------------------------
# OSEDiff


@dataclass(frozen=True)
class OSEDiffCheckpoint:
    """The official `osediff.pkl`: peft-format LoRA state for the UNet and the VAE encoder."""

    unet_state: dict[str, torch.Tensor]
    vae_state: dict[str, torch.Tensor]
    unet_modules: frozenset[str]
    vae_modules: frozenset[str]
    unet_scaling: float
    vae_scaling: float

    @classmethod
    def load(cls, path: Path) -> OSEDiffCheckpoint:
        """Read with `weights_only=True` (only str/int/list/tensor inside); module lists de-duplicated."""
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means "not an osediff.pkl"
            raise WeightsError(f"{path} is not a readable OSEDiff checkpoint ({type(exc).__name__}: {exc})") from exc
        required = ("state_dict_unet", "state_dict_vae", "rank_unet", "rank_vae", "vae_lora_encoder_modules")
        missing = [key for key in required if not isinstance(raw, dict) or key not in raw]
        if missing:
            raise WeightsError(f"{path} is not an OSEDiff checkpoint (missing {', '.join(missing)})")
        unet_lists = ("unet_lora_encoder_modules", "unet_lora_decoder_modules", "unet_lora_others_modules")
        return cls(
            unet_state=raw["state_dict_unet"],
            vae_state=raw["state_dict_vae"],
            unet_modules=frozenset(name for key in unet_lists for name in raw.get(key, [])),
            vae_modules=frozenset(raw["vae_lora_encoder_modules"]),
            unet_scaling=PEFT_DEFAULT_ALPHA / int(raw["rank_unet"]),
            vae_scaling=PEFT_DEFAULT_ALPHA / int(raw["rank_vae"]),
        )

    def apply(self, unet, vae) -> None:
        """Merge into SD2.1's UNet (all three adapters, as upstream activates them) and VAE encoder."""
        merged_unet = merge_peft_state(unet, self.unet_state, self.unet_scaling)
        merged_vae = merge_peft_state(vae, self.vae_state, self.vae_scaling, adapters={"default_encoder"})
        for part, listed, merged in (("UNet", self.unet_modules, merged_unet), ("VAE", self.vae_modules, merged_vae)):
            if not listed <= merged:
                absent = ", ".join(sorted(listed - merged)[:3])
                raise WeightsError(f"the OSEDiff checkpoint lists {part} LoRA modules without weights: {absent}")


def fixed_prompt(options: PromptedOptions, text_folder: Path) -> torch.Tensor:
    """The prompt embedding (1, 77, D), computed once: tags from the tagger (`none`: no tags) + the user text."""
    text = compose_prompt("", options.prompt)
    table = sd.prompt_embeddings({PROMPT_KEY: text}, folder=text_folder, precomputed=options.prompt_embeds)
    return table[PROMPT_KEY]


OSEDIFF_SPEC = EngineSpec(
    name="osediff",
    scale=4,
    steps=1,
    weights=("osediff", "sd21-base", "sd21-text"),
    licence="Apache-2.0 + " + SD21_LICENCE,
    description="OSEDiff: one-step SD2.1 with LoRA (t=999), faithful real-world SR; --prompt, AdaIN colour fix",
    tiling="latent",
    stochastic=True,
)


@register(OSEDIFF_SPEC)
class OSEDiffEngine(OneStepEngine):
    spec = OSEDIFF_SPEC
    options_class = OSEDiffOptions

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: OSEDiffOptions) -> OSEDiffEngine:
        check_options(options)
        base = weights["sd21-base"]
        schedule = sd.load_noise_schedule(base)
        schedule.alpha_bar(options.timestep)  # range check before the heavy loads
        checkpoint = OSEDiffCheckpoint.load(weights["osediff"])
        unet, vae = sd.load_unet(base), sd.load_vae(base)
        checkpoint.apply(unet, vae)
        prompt = fixed_prompt(options, weights["sd21-text"])
        return cls(unet, vae, prompt, device, dtype, options, schedule)

    def denoise(self, latents, *, generator, noise):
        # x0 at t=999 from the LR latent itself: ẑ = (z − √(1−ᾱ)·ε)/√ᾱ.
        t = self.options.timestep
        return self.schedule.predict_x0(latents, self.eps(latents, t), t)


# ---------------------------------------------------------------------------------------------------------------
# NAOSD and GDPO-SR


class NoiseInjectionEngine(OneStepEngine):
    """Merged diffusers UNet/VAE; latent noised to t_add, denoised in one step as if at t_diff."""

    options_class = NoiseInjectionOptions

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: NoiseInjectionOptions) -> NoiseInjectionEngine:
        check_options(options)
        merged, text = weights[cls.spec.weights[0]], weights["sd21-text"]
        if not Path(merged).is_dir():
            raise WeightsError(f"{cls.spec.name} needs a merged diffusers folder (unet/, vae/), not the file {merged}")
        schedule = sd.load_noise_schedule(text)
        for t in (options.t_add, options.t_diff):
            schedule.alpha_bar(t)  # range check before the heavy loads
        unet, vae = sd.load_unet(merged), sd.load_vae(merged)
        return cls(unet, vae, fixed_prompt(options, text), device, dtype, options, schedule)

    def denoise(self, latents, *, generator, noise):
        options = self.options
        # Noise to t_add with seeded noise (or replayed noise), then x0 as if the UNet saw t_diff.
        if noise is None:
            noise = draw_noise(latents, generator)
        noisy = self.schedule.add_noise(latents, noise.to(latents.device), options.t_add)
        return self.schedule.predict_x0(noisy, self.eps(noisy, options.t_diff), options.t_diff)


def _noise_injection_spec(name: str, weights_key: str, description: str) -> EngineSpec:
    return EngineSpec(
        name=name,
        scale=4,
        steps=1,
        weights=(weights_key, "sd21-text"),
        licence=GDPO_LICENCE,
        description=description,
        tiling="latent",
        stochastic=True,
    )


GDPO_SPEC = _noise_injection_spec(
    "gdpo", "gdpo", "GDPO-SR: NAOSD tuned by group preference optimisation; seeded diverse outputs (--samples N)"
)
NAOSD_SPEC = _noise_injection_spec(
    "naosd", "naosd", "NAOSD: noise-aware one-step SD2.1 (t_add 250, t_diff 100); weights unreleased, --weights DIR"
)


@register(GDPO_SPEC)
class GDPOEngine(NoiseInjectionEngine):
    spec = GDPO_SPEC


@register(NAOSD_SPEC)
class NAOSDEngine(NoiseInjectionEngine):
    spec = NAOSD_SPEC


__all__ = [
    "GDPOEngine",
    "NAOSDEngine",
    "NoiseInjectionEngine",
    "NoiseInjectionOptions",
    "OSEDiffCheckpoint",
    "OSEDiffEngine",
    "OSEDiffOptions",
    "OneStepEngine",
    "OneStepOptions",
    "PromptedOptions",
    "compose_prompt",
    "prepare_batch",
    "prepare_official",
]
