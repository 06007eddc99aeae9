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
Prompts: upstream builds them from DAPE (RAM) tags of each ×4 input; so does srkit (`--tagger auto|dape|ram|none`,
srkit/engines/prompting.py), then each image's prompt is embedded by the SD2.1 text encoder.

The input preparation (`prepare_official`) is the family's own step; the NAOSD/GDPO recipes train on it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srkit.diffusion.loading import load_noise_schedule, load_unet, load_vae
from srkit.diffusion.samplers.one_step import draw_noise, noise_injected_x0, x0_at
from srkit.diffusion.text import PROMPT_KEY
from srkit.engines.base import WeightsSet, register
from srkit.engines.one_step import OneStepEngine
from srkit.engines.options import NoiseInjectionOptions, OSEDiffOptions, PromptedOptions
from srkit.engines.preprocess import enlarge_then_upscale, through_8bit
from srkit.engines.prompting import TagPrompter, chosen_tagger, tag_notice
from srkit.nn.lora_merge import merge_peft_state
from srkit.nn.lora_sites import PEFT_DEFAULT_ALPHA
from srkit.registry import WeightsError
from srkit.taggers import TAGGER_WEIGHTS, build_tagger

PROCESS_SIZE = 512
"""Upstream's `--process_size`: inputs whose side is below process_size/scale are enlarged first."""


# ---------------------------------------------------------------------------------------------------------------
# Input preparation, exactly as test_osediff.py (and GDPO's test.py) do it with PIL


def prepare_official(image: np.ndarray, scale: int = 4, process_size: int = PROCESS_SIZE) -> np.ndarray:
    """uint8 H×W×3 LR -> uint8 model input: min side to process_size/scale, ×scale, Lanczos to a multiple of 8
    (upstream fits by resizing, not cropping)."""
    return enlarge_then_upscale(image, scale, process_size, Image.Resampling.LANCZOS)


def prepare_batch(batch: torch.Tensor, scale: int = 4, process_size: int = PROCESS_SIZE) -> torch.Tensor:
    """Tensor[B,3,h,w] in [0,1] -> the prepared model input Tensor[B,3,H,W] in [0,1] (via 8-bit, as upstream)."""
    return through_8bit(batch, lambda pixels: prepare_official(pixels, scale, process_size))


def training_input(lr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """LR crops in [0, 1] -> the generator's input in [-1, 1] for the recipes: the engines' preparation without its
    enlargement of small images (training crops have a fixed size), so training sees what inference runs on."""
    return prepare_batch(lr, scale, process_size=0) * 2 - 1


class OSEDiffFamily(OneStepEngine):
    """What OSEDiff and NAOSD/GDPO-SR share: the PIL preparation and the tag prompt of the ×4 input."""

    prompter: TagPrompter | None = None
    """Set by `from_weights`; an engine built directly from networks and a prompt embedding has none."""

    @classmethod
    def weights_for(cls, options: PromptedOptions) -> tuple[str, ...]:
        return cls.spec.weights + TAGGER_WEIGHTS[chosen_tagger(options.tagger, options.prompt_embeds)]

    @classmethod
    def with_prompter(cls, weights: WeightsSet, options: PromptedOptions, device, build) -> OSEDiffFamily:
        """`build(prompt_embeds)` makes the engine; the prompter decides that embedding (fixed, or per image)."""
        tagger = chosen_tagger(options.tagger, options.prompt_embeds)
        prompter = TagPrompter.build(build_tagger(tagger, weights, torch.device(device)), Path(weights["sd21-text"]),
                                     options.prompt, precomputed=options.prompt_embeds, precomputed_key=PROMPT_KEY)  # fmt: skip
        engine = build(prompter.fixed)
        engine.prompter = prompter
        engine.notices += tag_notice(options.tagger, tagger, options.prompt_embeds)
        return engine

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        return prepare_batch(batch, self.spec.scale)

    def condition(self, batch: torch.Tensor, prepared: torch.Tensor) -> None:
        # Upstream tags the ×4 input it restores (DAPE on the prepared image) and prompts "{tags}, {prompt},".
        if self.prompter is not None and self.prompter.tagger is not None:
            with torch.inference_mode():
                self.prompt_embeds = self.prompter(prepared.to(self.device))


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


@register("osediff")
class OSEDiffEngine(OSEDiffFamily):
    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: OSEDiffOptions) -> OSEDiffEngine:
        base = weights["sd21-base"]
        schedule = load_noise_schedule(base)
        schedule.alpha_bar(options.timestep)  # range check before the heavy loads
        checkpoint = OSEDiffCheckpoint.load(weights["osediff"])
        unet, vae = load_unet(base), load_vae(base)
        checkpoint.apply(unet, vae)
        return cls.with_prompter(weights, options, device,
                                 lambda prompt: cls(unet, vae, prompt, device, dtype, options, schedule))  # fmt: skip

    def denoise(self, latents, *, generator=None, noise=None, progress=None):
        # x0 at t=999 from the LR latent itself: ẑ = (z − √(1−ᾱ)·ε)/√ᾱ.
        return x0_at(self.denoiser(progress), self.schedule, latents, self.options.timestep, self.prompts)


# ---------------------------------------------------------------------------------------------------------------
# NAOSD and GDPO-SR


class NoiseInjectionEngine(OSEDiffFamily):
    """Merged diffusers UNet/VAE; latent noised to t_add, denoised in one step as if at t_diff."""

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: NoiseInjectionOptions) -> NoiseInjectionEngine:
        merged, text = weights[cls.spec.weights[0]], weights["sd21-text"]
        if not Path(merged).is_dir():
            raise WeightsError(f"{cls.spec.name} needs a merged diffusers folder (unet/, vae/), not the file {merged}")
        schedule = load_noise_schedule(text)
        for t in (options.t_add, options.t_diff):
            schedule.alpha_bar(t)  # range check before the heavy loads
        unet, vae = load_unet(merged), load_vae(merged)
        return cls.with_prompter(weights, options, device,
                                 lambda prompt: cls(unet, vae, prompt, device, dtype, options, schedule))  # fmt: skip

    def denoise(self, latents, *, generator=None, noise=None, progress=None):
        # Noise to t_add with seeded noise (or replayed noise), then x0 as if the UNet saw t_diff.
        noise = draw_noise(latents, generator) if noise is None else noise
        o = self.options
        return noise_injected_x0(self.denoiser(progress), self.schedule, latents, noise, o.t_add, o.t_diff, self.prompts)


@register("gdpo")
class GDPOEngine(NoiseInjectionEngine):
    pass


@register("naosd")
class NAOSDEngine(NoiseInjectionEngine):
    pass


__all__ = [
    "GDPOEngine",
    "NAOSDEngine",
    "NoiseInjectionEngine",
    "OSEDiffCheckpoint",
    "OSEDiffEngine",
    "prepare_batch",
    "prepare_official",
    "training_input",
]
