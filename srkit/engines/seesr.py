"""SeeSR (Wu et al., CVPR 2024; cswry/SeeSR): semantics-aware multi-step SR on SD2-base — the model RFSR fine-tunes.

The official inference (`test_seesr.py`, `pipelines/pipeline_seesr.py`), step by step:
1. pre-processing (PIL): a side below 512/4 enlarges the LR first, then bicubic ×4 and bicubic to a multiple of 8:
   the control image in [0, 1] (the ControlNet's pixel condition and the VAE input);
2. RAM with DAPE's LoRA on the raw LR gives the tags and the image embeddings (145 tokens of 512) that the UNet's
   and ControlNet's image cross-attention read; the prompt is "{tags}, {prompt}," + "clean, high-resolution, 8k",
   the negative prompt "dotted, noise, blur, lowres, smooth";
3. the start: the LR latent (VAE posterior sample of the control image) noised to t = 999;
4. 50 DDPM steps (diffusers `DDPMScheduler`, leading spacing: 981, 961, …, 1) with classifier-free guidance 5.5,
   both passes with the same image embeddings and control image; large latents run on 96×96 tiles blended with
   Gaussian weights inside every step;
5. decode, 8-bit output, AdaIN colour fix against the control image, 8-bit truncation, bicubic to 4× the LR.
srkit does the same with one seeded generator for every draw, embeds the negative prompt once, embeds each tile's
control crop once for all steps, and batches both guidance passes into one call.  `-O turbo=true` runs SeeSR's
turbo script: the SD-Turbo base, 2 steps, guidance 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from srkit.colorfix import color_fix, truncate_8bit
from srkit.diffusion.control.diffusers import ControlFeatures
from srkit.diffusion.denoiser import Conditioning
from srkit.diffusion.latents import VAETiling, resize_to, vae_encode
from srkit.diffusion.loading import load_noise_schedule, load_vae, require_part
from srkit.diffusion.runtime import inference, maybe_compile, prepare_networks, set_attention
from srkit.diffusion.samplers.ancestral import AncestralSampler, NoiseDraw, generator_draw
from srkit.diffusion.text import NEGATIVE_KEY, PROMPT_KEY, prompt_embeddings
from srkit.engines.base import Progress, WeightsSet, register
from srkit.engines.multi_step import MultiStepEngine
from srkit.engines.options import SEESR_DEFAULTS, SeeSROptions
from srkit.engines.preprocess import enlarge_then_upscale, pil_resize, through_8bit
from srkit.engines.prompting import TagPrompter
from srkit.taggers import TAGGER_WEIGHTS, Tagger, build_tagger
from srkit.tiling import Box

SCALE = 4
PROCESS_SIZE = 512
START_TIMESTEP = 999
"""The LR latent is noised to t = 999, whatever the first sampler timestep (981 for 50 steps), as upstream."""


def prepare_batch(batch: torch.Tensor, process_size: int = PROCESS_SIZE) -> torch.Tensor:
    """Tensor[B,3,h,w] in [0,1] -> the control images in [0,1]: enlarge small inputs, ×4, bicubic to a multiple
    of 8 (test_seesr.py, via 8-bit)."""
    return through_8bit(batch, lambda px: enlarge_then_upscale(px, SCALE, process_size, Image.Resampling.BICUBIC))


class SeeSRDenoiser:
    """ε of the ControlNet + UNet: text and RAM tokens, the control image's embedding as a map."""

    def __init__(self, nets, conditioning_scale: float) -> None:
        self.nets = nets
        self.conditioning_scale = conditioning_scale

    def __call__(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        features = ControlFeatures(cond.maps["control"])
        eps = self.nets.eps(x, t, cond.tokens["text"], cond.tokens["ram"], features, self.conditioning_scale)
        return eps.float()


@register("seesr")
class SeeSREngine(MultiStepEngine):
    def __init__(self, nets, vae, base: Path, prompter: TagPrompter, tagger: Tagger,
                 negative: torch.Tensor, device: torch.device, dtype: torch.dtype, options: SeeSROptions) -> None:  # fmt: skip
        super().__init__(device, dtype, options)
        self.nets, self.vae, self.prompter, self.tagger = nets, vae, prompter, tagger
        self.text_negative = negative
        steps, guidance = SEESR_DEFAULTS[options.turbo]
        self.guidance_scale = guidance if options.guidance is None else options.guidance
        self.sampler = ddpm_sampler(base, options.steps or steps)
        self.vae_tiling = VAETiling(encoder_tile=options.vae_encoder_tile, decoder_tile=options.vae_decoder_tile)
        for module in (nets.unet, nets.controlnet):
            set_attention(module, options.attention, device)
        set_attention(vae, "sdpa", device)
        self.to_dtype(dtype)
        self.network = maybe_compile(SeeSRDenoiser(nets, options.conditioning_scale), options.compile)

    @classmethod
    def weights_for(cls, options: SeeSROptions) -> tuple[str, ...]:
        base = ("seesr", "sd-turbo") if options.turbo else cls.spec.weights
        return base + TAGGER_WEIGHTS[options.tag_model]

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: SeeSROptions) -> SeeSREngine:
        from srkit.convert.seesr import load_seesr

        device = torch.device(device)
        base = Path(weights["sd-turbo" if options.turbo else "sd2-base"])
        nets = load_seesr(weights["seesr"])
        tagger = build_tagger(options.tag_model, weights, device)
        texts = {NEGATIVE_KEY: options.negative_prompt}
        negative = prompt_embeddings(texts, folder=base, precomputed=options.prompt_embeds)[NEGATIVE_KEY]
        tags_from = tagger if options.tagger != "none" and options.prompt_embeds is None else None
        prompter = TagPrompter.build(tags_from, base, options.prompt, added=options.added_prompt,
                                     precomputed=options.prompt_embeds, precomputed_key=PROMPT_KEY)  # fmt: skip
        return cls(nets, load_vae(base), base, prompter, tagger, negative, device, dtype, options)

    def to_dtype(self, dtype: torch.dtype) -> None:
        """UNet and ControlNet (part "unet") and VAE (part "vae") in `dtype` (fp32 on the CPU: see its catalogue entry) with the
        CPU kernels `srkit.cpu_features` chose; the RAM tagger keeps the dtype it was built in."""
        prepare_networks(self.device, dtype, [self.nets.unet, self.nets.controlnet], self.vae)
        self.dtype = dtype

    # -----------------------------------------------------------------------------------------------------------
    # The procedure

    def upscale(
        self, batch: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        height, width = batch.shape[-2:]
        lr = batch.to(self.device).float()
        # 1. The control image (upstream pre-processing).
        control = prepare_batch(lr)
        # 2. Tags and RAM image embeddings of the raw LR (one tagger pass); each image's prompt embedded.
        with torch.inference_mode():
            tags, ram, _ = self.tagger.tags_embeds_logits(lr)
            text = self.prompter.fixed if self.prompter.tagger is None else self.prompter.from_tags(tags)
        # 3-4. LR latent noised to t=999, then the DDPM steps; one generator draws everything, in upstream's order.
        latent = self.generate(control, text, ram, draw=generator_draw(generator), progress=progress)
        # 5. Decode, colour fix against the control image, exactly 4× the input.
        return self.finish(latent, control, (height * SCALE, width * SCALE))

    def generate(
        self,
        control: torch.Tensor,
        text: torch.Tensor,
        ram: torch.Tensor,
        *,
        draw: NoiseDraw,
        start_noise: torch.Tensor | None = None,
        posterior_noise: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """The final latent for control images in [0,1], prompt embeddings and RAM tokens.  `draw(i, like)` gives
        step i's noise and, unless given, the start noise (index -1) and the VAE posterior draw (index -2)."""
        with inference(self.device, self.dtype):
            control = control.to(self.device)
            shape = (control.shape[0], 4, control.shape[-2] // 8, control.shape[-1] // 8)
            like = torch.empty(shape, device=self.device)
            noise = start_noise if start_noise is not None else draw(-1, like)
            if self.options.start == "lr":
                posterior = posterior_noise if posterior_noise is not None else draw(-2, like)
                z = vae_encode(self.vae, control * 2 - 1, generator=None, tiling=self.vae_tiling, noise=posterior)
                x = self.sampler.add_noise(z, noise, START_TIMESTEP)
            else:
                x = noise.to(self.device).float()
            cond = Conditioning({"text": text.to(self.device), "ram": ram.to(self.device)}, {"control": control})
            return self.run_sampler(x, cond, self.options.latent_tile, draw, progress)

    def tile_condition(self, cond: Conditioning, box: Box) -> Conditioning:
        """A tile's ControlNet embedding of its crop of the control image (upstream crops the image, so the
        embedding's zero padding sits at each tile's border)."""
        y, x, side = box
        crop = cond.maps["control"][:, :, 8 * y : 8 * (y + side), 8 * x : 8 * (x + side)]
        return Conditioning(dict(cond.tokens), {"control": self.nets.embed_control(crop).features})

    def finish(self, latent: torch.Tensor, control: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Decode; upstream rounds the pipeline's output to 8 bits, colour-fixes against the control image and
        truncates; then resizes to 4× the LR."""
        from srkit.diffusion.latents import vae_decode

        with inference(self.device, self.dtype):
            decoded = vae_decode(self.vae, latent, tiling=self.vae_tiling).float()
        image = ((decoded + 1) / 2).clamp(0, 1)
        if self.options.official_8bit:
            image = (image * 255).round() / 255
        fixed = color_fix(image, control.float(), self.options.color_fix).clamp(0, 1)
        if self.options.official_8bit:  # ToPILImage truncates; PIL's bicubic resizes the 8-bit image
            return pil_resize(truncate_8bit(fixed), out_size, Image.Resampling.BICUBIC)
        return resize_to(fixed, out_size)


def ddpm_sampler(base: Path, steps: int) -> AncestralSampler:
    """The base model's DDPM schedule with diffusers' timesteps for `steps` (SeeSR: leading spacing, offset 1)."""
    import json

    from diffusers import DDPMScheduler

    config = require_part(base, "scheduler", "scheduler_config.json") / "scheduler_config.json"
    scheduler = DDPMScheduler.from_config(json.loads(config.read_text()))
    scheduler.set_timesteps(steps)
    return AncestralSampler.build(scheduler.timesteps.tolist(), load_noise_schedule(base).alphas_cumprod)


__all__ = ["SeeSREngine", "prepare_batch"]
