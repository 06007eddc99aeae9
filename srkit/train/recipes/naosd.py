"""NAOSD pre-training (GDPO-SR paper, stage 1): OSEDiff's one-step generator with noise injection.

Per batch (notes §3.1-3.3):
- generator: LR bicubic-upsampled to HR size, VAE encode (LoRA on the encoder, posterior sample) → noise to
  t_add = 250 → UNet (LoRA, full conv_in) told t_diff = 100 → x0 → frozen decoder;
  loss = 1·MSE(x̂, HR) + 2·LPIPS-VGG(x̂, HR) + 1·VSD(ẑ), VSD at t ~ U{20..499} between a LoRA "fake" score (the
  regulariser) and the frozen base UNet with CFG 7.5 ("real" score);
- regulariser: the fake score's ε-MSE on the generator's detached ẑ at t ~ U{0..999}, weight 1.
Prompts: upstream prompts every image with RAM tags of its HR; srkit has no tagger yet, so every image gets the
fixed positive prompt (documented deviation; pass a `prompt`/`neg` embeddings file or a text-encoder folder).
The generator's input is the NAOSD engine's own preparation (PIL bicubic ×4 of the 8-bit LR) and its one step is
the engine's sampler (`noise_injected_x0`), so the model is trained on exactly what it runs at inference.

Export: merged diffusers folders `unet/` and `vae/` (what `srkit upscale --model naosd --weights DIR` loads, and
what `--recipe gdpo --base DIR` starts from).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from srkit.diffusion.denoiser import UNetDenoiser, guided
from srkit.diffusion.latents import vae_decode, vae_encode
from srkit.diffusion.loading import load_unet, load_vae
from srkit.diffusion.samplers.one_step import noise_injected_x0
from srkit.diffusion.text import NEGATIVE_KEY, PROMPT_KEY, QUALITY_PROMPT, compose_prompt
from srkit.engines.osediff import training_input
from srkit.nn.lora_sites import UNET_LORA_TARGETS, VAE_ENCODER_LORA_TARGETS
from srkit.train.lora import add_lora, merged_copy, target_modules
from srkit.train.losses import vsd_loss
from srkit.train.recipes import RecipeInputs, TextSide, local_or_registry
from srkit.train.recipes.sd_recipe import PERCEPTUAL_NETWORK, SDRecipe, require_network

DEFAULT_NEGATIVE = "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth"


@dataclass
class NAOSDSettings:
    """Hyper-parameters with the paper's / official script's defaults (notes §3)."""

    rank_unet: int = 4
    """LoRA rank of the generator's UNet [script: --lora_rank_unet=4; the parser's default is 8]."""
    rank_vae: int = 4
    """LoRA rank of the VAE encoder [script: --lora_rank_vae=4]."""
    rank_fake: int = 4
    """LoRA rank of the fake score (VSD regulariser) [script: 4]."""
    t_add: int = 250
    """Noise-injection timestep of the LR latent [paper and script: 250]."""
    t_diff: int = 100
    """Timestep the UNet is told [paper and script: 100]."""
    vsd_t_min: int = 20
    """VSD timesteps from [vsd_t_min, vsd_t_max) [script: min_dm_step_ratio 0.02]."""
    vsd_t_max: int = 500
    """VSD timesteps below this [script: max_dm_step_ratio 0.50; OSEDiff: 980]."""
    cfg_vsd: float = 7.5
    """Guidance of the frozen real score [script: --cfg_vsd 7.5]."""
    lambda_l2: float = 1.0
    """Weight of the MSE to the HR [script: --lambda_l2 1]."""
    lambda_lpips: float = 2.0
    """Weight of LPIPS-VGG [script: --lambda_lpips 2]."""
    lambda_vsd: float = 1.0
    """Weight of the VSD term in the generator loss [script: --lambda_vsd 1]."""
    lambda_vsd_lora: float = 1.0
    """Weight of the fake score's ε-MSE [script: --lambda_vsd_lora 1]."""
    prompt: str = QUALITY_PROMPT
    """Fixed positive prompt of every image [srkit: upstream uses RAM tags of the HR]."""
    negative_prompt: str = DEFAULT_NEGATIVE
    """Negative prompt of the real score's guidance [script: its long negative string]."""


SETTINGS = NAOSDSettings


def build(settings: NAOSDSettings, inputs: RecipeInputs) -> NAOSDRecipe:
    """SD2.1-base (`sd21-base`) and its text side (`sd21-text`) from the registry unless given."""
    from srkit.train.perceptual import lpips_vgg

    base = local_or_registry(inputs.base, "sd21-base", inputs.offline)
    perceptual = lpips_vgg() if settings.lambda_lpips > 0 else None
    return NAOSDRecipe(base, settings, text=inputs.text_side("sd21-text"), perceptual=perceptual)


class NAOSDRecipe(SDRecipe):
    name = "naosd"
    engine = "naosd"
    licence = "CreativeML-OpenRAIL++-M (trained from SD2.1-base, whose terms apply)"

    def __init__(
        self,
        base: str | Path,
        settings: NAOSDSettings | None = None,
        *,
        text: TextSide = TextSide(),
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        s = self.settings = settings or NAOSDSettings()
        require_network(s.lambda_lpips, perceptual, "NAOSD's LPIPS term", PERCEPTUAL_NETWORK, "lambda_lpips")
        super().__init__(
            base, text=text,
            prompts={PROMPT_KEY: compose_prompt("", s.prompt), NEGATIVE_KEY: s.negative_prompt},
            timesteps=(s.t_add, s.t_diff, s.vsd_t_min, s.vsd_t_max - 1),
        )  # fmt: skip
        self.perceptual = perceptual
        self.real = load_unet(self.base)  # frozen base score; the other UNets start as copies of it
        self.unet, self.fake = _trainable(copy.deepcopy(self.real)), _trainable(copy.deepcopy(self.real))
        self.vae = _trainable(load_vae(self.base))
        self.unet.conv_in.requires_grad_(True)
        unet_sites = target_modules(self.unet, UNET_LORA_TARGETS, exclude={"conv_in"})
        vae_sites = target_modules(self.vae, VAE_ENCODER_LORA_TARGETS, "encoder.")
        generator = {f"unet.{k}": v for k, v in self.unet.conv_in.named_parameters(prefix="conv_in")}
        generator |= {f"unet.{k}": v for k, v in add_lora(self.unet, unet_sites, s.rank_unet).items()}
        generator |= {f"vae.{k}": v for k, v in add_lora(self.vae, vae_sites, s.rank_vae).items()}
        fake_sites = target_modules(self.fake, UNET_LORA_TARGETS)
        regulariser = {f"fake.{k}": v for k, v in add_lora(self.fake, fake_sites, s.rank_fake).items()}
        self.groups = {"generator": generator, "regulariser": regulariser}

    @property
    def prompt(self) -> torch.Tensor:
        return self.embeddings[PROMPT_KEY]

    def generate(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂ in [-1, 1], ẑ): the one-step generator on LR in [0, 1], with gradients."""
        s = self.settings
        z = vae_encode(self.vae, training_input(lr), latent="sample")
        text = self.condition(PROMPT_KEY)
        z_hat = noise_injected_x0(UNetDenoiser(self.unet), self.schedule, z, torch.randn_like(z), s.t_add, s.t_diff, text)
        return vae_decode(self.vae, z_hat), z_hat

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        hr = batch["hr"] * 2 - 1
        x_hat, z_hat = self.generate(batch["lr"])
        mse = F.mse_loss(x_hat.float(), hr.float())
        lpips = self.perceptual(x_hat.float(), hr.float()) if s.lambda_lpips > 0 else mse.new_zeros(())
        vsd = self.vsd(z_hat) if s.lambda_vsd > 0 else mse.new_zeros(())
        total = s.lambda_l2 * mse + s.lambda_lpips * lpips + s.lambda_vsd * vsd
        yield "generator", total, {"l2": mse.item(), "lpips": lpips.item(), "vsd": vsd.item()}
        diffusion = self.regulariser_loss(z_hat.detach())
        yield "regulariser", s.lambda_vsd_lora * diffusion, {"diff": diffusion.item()}

    def vsd(self, z_hat: torch.Tensor) -> torch.Tensor:
        s = self.settings
        batch = z_hat.shape[0]
        t = torch.randint(s.vsd_t_min, s.vsd_t_max, (batch,), device=z_hat.device)
        with torch.no_grad():
            noisy = self.schedule.add_noise(z_hat.detach(), torch.randn_like(z_hat), t)
            pos, neg = self.condition(PROMPT_KEY), self.condition(NEGATIVE_KEY)
            x0_fake = self.schedule.predict_x0(noisy, UNetDenoiser(self.fake)(noisy, t, pos), t)
            real = guided(UNetDenoiser(self.real), neg, s.cfg_vsd)
            x0_real = self.schedule.predict_x0(noisy, real(noisy, t, pos), t)
        return vsd_loss(z_hat, x0_fake, x0_real)

    def regulariser_loss(self, z: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_train_timesteps, (z.shape[0],), device=z.device)
        noise = torch.randn_like(z)
        noisy = self.schedule.add_noise(z, noise, t)
        prediction = UNetDenoiser(self.fake)(noisy, t, self.condition(PROMPT_KEY))
        return F.mse_loss(prediction.float(), noise.float())

    def export(self, folder: Path) -> Path:
        """Merged diffusers `unet/` and `vae/` folders and the scheduler config in `folder`."""
        with self.export_folder(folder) as partial:
            s = self.settings
            merged_copy(copy.deepcopy(self.real), self.unet, s.rank_unet).save_pretrained(partial / "unet")
            merged_copy(load_vae(self.base), self.vae, s.rank_vae).save_pretrained(partial / "vae")
        return folder


def _trainable(module: torch.nn.Module) -> torch.nn.Module:
    """Train mode with everything frozen; the recipe unfreezes what it trains."""
    return module.train().requires_grad_(False)
