"""NAOSD pre-training (GDPO-SR paper, stage 1): OSEDiff's one-step generator with noise injection.

Per batch (notes §3.1-3.3):
- generator: LR bicubic-upsampled to HR size, VAE encode (LoRA on the encoder, posterior sample) → noise to
  t_add = 250 → UNet (LoRA, full conv_in) told t_diff = 100 → x0 → frozen decoder;
  loss = 1·MSE(x̂, HR) + 2·LPIPS-VGG(x̂, HR) + 1·VSD(ẑ), VSD at t ~ U{20..499} between a LoRA "fake" score (the
  regulariser) and the frozen base UNet with CFG 7.5 ("real" score);
- regulariser: the fake score's ε-MSE on the generator's detached ẑ at t ~ U{0..999}, weight 1.
Prompts: upstream prompts every image with RAM tags of its HR; srkit has no tagger yet, so every image gets the
fixed positive prompt (documented deviation; pass a `prompt`/`neg` embeddings file or a text-encoder folder).

Export: merged diffusers folders `unet/` and `vae/` (what `srkit upscale --model naosd --weights DIR` loads, and
what `--recipe gdpo --base DIR` starts from).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from srkit.engines import sd
from srkit.engines.osediff import PROMPT_KEY, compose_prompt
from srkit.train.lora import UNET_PATTERNS, VAE_ENCODER_PATTERNS, add_lora, merged_copy, target_modules
from srkit.train.losses import vsd_loss
from srkit.train.trainer import atomic_folder

NEGATIVE_KEY = "neg"
DEFAULT_PROMPT = "clean, high-resolution, 8k"
DEFAULT_NEGATIVE = "painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, over-smooth"


@dataclass
class NAOSDSettings:
    """Hyper-parameters with the paper's / official script's defaults."""

    rank_unet: int = 4
    rank_vae: int = 4
    rank_fake: int = 4
    t_add: int = 250
    t_diff: int = 100
    vsd_t_min: int = 20
    vsd_t_max: int = 500
    """VSD timesteps are drawn from [vsd_t_min, vsd_t_max) (NAOSD: 20..499; OSEDiff: 20..979)."""
    cfg_vsd: float = 7.5
    lambda_l2: float = 1.0
    lambda_lpips: float = 2.0
    lambda_vsd: float = 1.0
    lambda_vsd_lora: float = 1.0
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE


class NAOSDRecipe:
    name = "naosd"

    def __init__(
        self,
        base: str | Path,
        settings: NAOSDSettings | None = None,
        *,
        text_folder: str | Path | None = None,
        prompt_embeds: str | Path | None = None,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.base, self.settings = Path(base), settings or NAOSDSettings()
        s = self.settings
        if s.lambda_lpips > 0 and perceptual is None:
            raise ValueError("NAOSD's LPIPS term needs a perceptual loss (LPIPS-VGG); pass one or set lambda_lpips 0")
        self.perceptual = perceptual
        self.scheduler_folder = Path(text_folder or self.base) / "scheduler"
        self.schedule = sd.load_noise_schedule(text_folder or self.base)
        for t in (s.t_add, s.t_diff, s.vsd_t_min, s.vsd_t_max - 1):
            self.schedule.alpha_bar(t)
        table = sd.prompt_embeddings(
            {PROMPT_KEY: compose_prompt("", s.prompt), NEGATIVE_KEY: s.negative_prompt},
            folder=text_folder or self.base,
            precomputed=prompt_embeds,
        )
        # clone: the text encoder runs under inference_mode, whose tensors cannot enter a training graph
        self.prompt, self.negative = table[PROMPT_KEY].clone(), table[NEGATIVE_KEY].clone()
        self.real = sd.load_unet(self.base)  # frozen base score; the other UNets start as copies of it
        self.unet, self.fake = _trainable(copy.deepcopy(self.real)), _trainable(copy.deepcopy(self.real))
        self.vae = _trainable(sd.load_vae(self.base))
        self.unet.conv_in.requires_grad_(True)
        generator = {f"unet.{k}": v for k, v in self.unet.conv_in.named_parameters(prefix="conv_in")}
        generator |= {f"unet.{k}": v for k, v in add_lora(self.unet, target_modules(self.unet, UNET_PATTERNS, exclude={"conv_in"}), s.rank_unet).items()}
        generator |= {f"vae.{k}": v for k, v in add_lora(self.vae, target_modules(self.vae, VAE_ENCODER_PATTERNS, "encoder."), s.rank_vae).items()}
        regulariser = {f"fake.{k}": v for k, v in add_lora(self.fake, target_modules(self.fake, UNET_PATTERNS), s.rank_fake).items()}  # fmt: skip
        self.groups = {"generator": generator, "regulariser": regulariser}

    def parameter_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return self.groups

    def to(self, device: torch.device) -> NAOSDRecipe:
        for module in (self.unet, self.vae, self.real, self.fake, self.perceptual):
            if isinstance(module, torch.nn.Module):
                module.to(device)
        self.prompt, self.negative = self.prompt.to(device), self.negative.to(device)
        return self

    def generate(self, lr: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂ in [-1, 1], ẑ): the one-step generator on LR in [0, 1], with gradients."""
        s = self.settings
        z = sd.vae_encode(self.vae, upsampled_input(lr, size), latent="sample")
        z_hat = noise_injected_x0(self.unet, self.schedule, z, self.prompt, s.t_add, s.t_diff)
        return sd.vae_decode(self.vae, z_hat), z_hat

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        hr = batch["hr"] * 2 - 1
        x_hat, z_hat = self.generate(batch["lr"], tuple(hr.shape[-2:]))
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
            pos, neg = self.prompt.expand(batch, -1, -1), self.negative.expand(batch, -1, -1)
            x0_fake = self.schedule.predict_x0(noisy, self.fake(noisy, t, encoder_hidden_states=pos).sample, t)
            both = self.real(torch.cat([noisy, noisy]), torch.cat([t, t]), encoder_hidden_states=torch.cat([pos, neg]))
            eps_pos, eps_neg = both.sample.chunk(2)
            eps_real = eps_neg + s.cfg_vsd * (eps_pos - eps_neg)
            x0_real = self.schedule.predict_x0(noisy, eps_real, t)
        return vsd_loss(z_hat, x0_fake, x0_real)

    def regulariser_loss(self, z: torch.Tensor) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_train_timesteps, (z.shape[0],), device=z.device)
        noise = torch.randn_like(z)
        noisy = self.schedule.add_noise(z, noise, t)
        prediction = self.fake(noisy, t, encoder_hidden_states=self.prompt.expand(z.shape[0], -1, -1)).sample
        return F.mse_loss(prediction.float(), noise.float())

    def export(self, folder: Path) -> Path:
        """Merged diffusers `unet/` and `vae/` folders and the scheduler config in `folder`."""
        with atomic_folder(folder) as partial:
            s = self.settings
            merged_copy(copy.deepcopy(self.real), self.unet, s.rank_unet).save_pretrained(partial / "unet")
            merged_copy(sd.load_vae(self.base), self.vae, s.rank_vae).save_pretrained(partial / "vae")
            shutil.copytree(self.scheduler_folder, partial / "scheduler")  # self-contained: gdpo can start from it
        return folder


def _trainable(module: torch.nn.Module) -> torch.nn.Module:
    """Train mode with everything frozen; the recipe unfreezes what it trains."""
    return module.train().requires_grad_(False)


def upsampled_input(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """LR in [0, 1] -> the generator's input: bicubic to the HR size, in [-1, 1]."""
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1


def noise_injected_x0(
    unet: torch.nn.Module, schedule: sd.NoiseSchedule, z: torch.Tensor, prompt: torch.Tensor, t_add: int, t_diff: int
) -> torch.Tensor:
    """NAOSD's one step: noise the latent to t_add, let the UNet see it as t_diff, return its x0 (float32)."""
    noisy = schedule.add_noise(z, torch.randn_like(z), t_add)
    eps = unet(noisy, t_diff, encoder_hidden_states=prompt.expand(z.shape[0], -1, -1)).sample
    return schedule.predict_x0(noisy, eps, t_diff)
