"""S3Diff training (Zhang et al., 2024; ArcticHare105/S3Diff `src/train_s3diff.py`, notes §5) on srkit's trainer.

One iteration, stepped in the official order (`step_each_loss`: each loss is stepped before the next is computed):
1. input: the LR bicubic-upsampled ×4 (the released training; inference upsamples bilinearly since upstream
   PR #12), ×2 − 1, clamped; target: the HR in [-1, 1].  With probability `no_degradation_prob` per sample the
   input is the clean HR itself.  Degradation scores: the frozen DE-Net on the LR the input was made from —
   **fix of upstream issue #31**, where the estimator saw the degraded LR even when the input was the clean HR
   (here it sees the HR area-downscaled to the LR size);
2. online negative prompting: per sample with probability `neg_prob` the negative prompt, and the degraded input
   itself as the target (upstream `mixed_tag_prompt` / `mixed_tgt`);
3. generator: the scores modulate every DG-LoRA layer → VAE encoder (LoRA) posterior sample → UNet at t = 999
   (LoRA, full conv_in) → x0 → frozen decoder, clamped; loss 2·MSE + 5·LPIPS-VGG against the mixed target → step;
4. a second generator pass, positive prompt for every sample, with the updated weights; loss 0.5·GAN (the
   discriminator's BCE against the real label 0.8) → step.  The discriminator's heads are out of autograd during
   this loss — **fix of upstream issue #25**, where the generator's loss left gradients in the discriminator that
   were added to its next update;
5. discriminator: 0.5·BCE(HR, 0.8) → step; 0.5·BCE(second pass, detached, 0) → step.
Degradations are drawn per sample — **fix of upstream issue #27**, where a batch shared its resize, noise and
JPEG choices — with S3Diff's parameters (`configs/sr.yaml`: `S3DIFF_DEGRADATION`, no USM, no 8-bit rounding,
horizontal flips).
Accumulation (the released `--gradient_accumulation_steps 4`): upstream's `accelerator.accumulate` skips the
optimiser steps of three micro-batches out of four, so its four steps per iteration mix the micro-batches' losses
unevenly; srkit accumulates each of the four losses over the micro-batches and then takes its step.

Trainable, as upstream's optimiser list: the UNet's and the VAE encoder's DG-LoRA factors, the UNet's conv_in,
the degradation MLPs, block MLPs, fuse layers and block embeddings of both modulation heads (the generator group),
and the discriminator's heads (the discriminator group, same learning rate).  Frozen: SD-Turbo's weights, the
text encoder, the DE-Net, the Fourier frequencies w and the discriminator's DINO ViT-B/16.
Export: the official `s3diff.pkl` layout (`srkit upscale --model s3diff --weights OUT/export/s3diff.pkl`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srkit import registry
from srkit.common import atomic_folder, check_choice, one_line
from srkit.degrade.config import DegradationConfig, StageConfig
from srkit.diffusion.denoiser import Conditioning, UNetDenoiser
from srkit.diffusion.latents import vae_decode, vae_encode
from srkit.diffusion.loading import load_unet, load_vae
from srkit.diffusion.text import NEGATIVE_KEY
from srkit.engines.s3diff import (
    NEGATIVE_PROMPT,
    POSITIVE_KEY,
    POSITIVE_PROMPT,
    TIMESTEP,
    UNET_TARGETS,
    VAE_TARGETS,
    S3DiffNetworks,
    attach_dg_lora,
    load_checkpoint_into,
    read_checkpoint,
    save_checkpoint,
)
from srkit.nn.de_net import load_degradation_estimator
from srkit.nn.dg_lora import DegradationGuidance
from srkit.nn.vit import VisionTransformer, load_dino_vit
from srkit.train.diffaugment import POLICY
from srkit.train.discriminator import REAL_LABEL, VisionAidedDiscriminator, multilevel_bce
from srkit.train.recipes import RecipeInputs, TextSide, TrainingSetup, local_or_registry
from srkit.train.recipes.sd_recipe import PERCEPTUAL_NETWORK, SDRecipe, require_network

S3DIFF_DEGRADATION = DegradationConfig(
    usm_sharpen=False,
    stage1=StageConfig(blur_sigma=(0.2, 1.5), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5),
                       resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0),
                       jpeg_range=(60, 95)),
    stage2=StageConfig(blur_prob=0.5, blur_sigma=(0.2, 1.0), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5),
                       resize_prob=(0.3, 0.4, 0.3), resize_range=(0.6, 1.2), noise_range=(1.0, 12.0),
                       poisson_scale_range=(0.05, 1.0), jpeg_range=(60, 100)),
    final_sinc_prob=0.8,
    round_8bit=False,
)  # fmt: skip
"""S3Diff's `configs/sr.yaml` degradation (milder than Real-ESRGAN's) and `training_utils.degradation_proc`."""

TRAINING = TrainingSetup(
    train={"lr": 2e-5, "batch_size": 4, "grad_accum": 4, "steps": 50_000, "max_grad_norm": 1.0,
           "weight_decay": 1e-2, "checkpoint_every": 500},
    crop=512,
    degradation=S3DIFF_DEGRADATION,
    hflip=True,
    source="src/my_utils/training_utils.py defaults (AdamW, constant rate; run_training.sh: 4 GPUs x batch 4), "
    "configs/sr.yaml (512 crops, hflip, degradation)",
)  # fmt: skip
DINO_FILE = "dino_vitbase16_pretrain.pth"
UPSAMPLING = ("bicubic", "bilinear")
GUIDANCE_INIT_SCALE = 1e-5


@dataclass
class S3DiffSettings:
    """Hyper-parameters with the released values (training_utils.py `parse_args_paired_training`)."""

    rank_unet: int = 32
    """LoRA rank of the UNet (training_utils.py --lora_rank_unet)."""
    rank_vae: int = 16
    """LoRA rank of the VAE encoder (--lora_rank_vae)."""
    lambda_l2: float = 2.0
    """Weight of the MSE (--lambda_l2)."""
    lambda_lpips: float = 5.0
    """Weight of LPIPS-VGG (--lambda_lpips)."""
    lambda_gan: float = 0.5
    """Weight of the GAN losses, generator and discriminator (--lambda_gan)."""
    neg_prob: float = 0.05
    """Online negative prompting: per sample, the negative prompt and the degraded input as the target (--neg_prob)."""
    no_degradation_prob: float = 0.01
    """Per sample, the clean HR as the input (configs/sr.yaml no_degradation_prob)."""
    real_label: float = REAL_LABEL
    """Discriminator target of real images and of the generator's loss (vision_aided_loss multilevel_sigmoid_s)."""
    diffaugment: str = POLICY
    """Augmentations of every image the discriminator sees (vision_aided_loss Discriminator, diffaug=True)."""
    disc_channels: int = 128
    """Width of the discriminator heads (vision_aided_loss MultiLevelDViT out_ch for dino)."""
    upsample: str = "bicubic"
    """LR to input size: bicubic as the released training (training_utils.degradation_proc), or bilinear as the
    inference since upstream PR #12."""
    prompt: str = POSITIVE_PROMPT
    """Positive prompt (--pos_prompt)."""
    negative_prompt: str = NEGATIVE_PROMPT
    """Negative prompt (--neg_prompt)."""
    pretrained: str = ""
    """Weights to start from, an s3diff.pkl or a registry name such as s3diff (--pretrained_path; empty: fresh
    DG-LoRA, as upstream by default)."""
    de_net: str = ""
    """Degradation estimator de_net.pth (--de_net_path; empty: registry s3diff-de-net)."""
    discriminator: str = ""
    """DINO ViT-B/16 weights dino_vitbase16_pretrain.pth (empty: registry dino-vitb16)."""

    def __post_init__(self) -> None:
        for name in ("neg_prob", "no_degradation_prob", "real_label"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        check_choice(self.upsample, UPSAMPLING, "upsample")


SETTINGS = S3DiffSettings


def build(settings: S3DiffSettings, inputs: RecipeInputs) -> S3DiffRecipe:
    """SD-Turbo (`sd-turbo`, also the text side), the DE-Net (`s3diff-de-net`) and the discriminator's DINO
    ViT-B/16 (`dino-vitb16`) from the registry unless given; Python callers may pass `extras`
    `discriminator_backbone` (a VisionTransformer) and `perceptual` (a loss module)."""
    from srkit.train.perceptual import lpips_vgg

    base = local_or_registry(inputs.base, "sd-turbo", inputs.offline)
    de_net = local_or_registry(Path(settings.de_net) if settings.de_net else None, "s3diff-de-net", inputs.offline)
    pretrained = None
    if settings.pretrained:
        named = Path(settings.pretrained)
        pretrained = named if named.is_file() else local_or_registry(None, settings.pretrained, inputs.offline)
    backbone = inputs.extras.get("discriminator_backbone") or _dino_backbone(settings, inputs.offline)
    perceptual = inputs.extras.get("perceptual") or (lpips_vgg() if settings.lambda_lpips > 0 else None)
    return S3DiffRecipe(base, settings, text=inputs.text_side(None), de_net=de_net,
                        backbone=backbone, perceptual=perceptual, pretrained=pretrained)  # fmt: skip


def _dino_backbone(settings: S3DiffSettings, offline: bool) -> VisionTransformer:
    try:
        path = local_or_registry(Path(settings.discriminator) if settings.discriminator else None, "dino-vitb16", offline)
    except registry.WeightsError as exc:
        raise ValueError(f"the S3Diff discriminator needs DINO ViT-B/16 weights ({DINO_FILE}): {one_line(exc)}") from None
    return load_dino_vit(path)


# ---------------------------------------------------------------------------------------------------------------
# The pieces of one iteration (pure functions, pinned by unit tests)


def training_pair(
    hr: torch.Tensor, lr: torch.Tensor, clean: torch.Tensor, upsample: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input, target, estimator input) from HR and LR in [0, 1] and a (B,) mask of samples left undegraded.

    input: the LR upsampled to the HR size (the HR itself where `clean`), in [-1, 1], clamped; target: the HR in
    [-1, 1]; estimator input: the LR-size image the input was made from (the HR area-downscaled where `clean`,
    so the degradation score always describes the input: upstream issue #31).
    """
    upsampled = F.interpolate(lr, size=hr.shape[-2:], mode=upsample, align_corners=False)
    where = clean.view(-1, 1, 1, 1)
    source = (torch.where(where, hr, upsampled) * 2 - 1).clamp(-1, 1)
    estimator_input = torch.where(where, F.interpolate(hr, size=lr.shape[-2:], mode="area"), lr)
    return source, hr * 2 - 1, estimator_input


def online_negative_prompting(
    negative: torch.Tensor,
    positive_text: torch.Tensor,
    negative_text: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text (B, L, D), target) per sample: the negative prompt with the degraded input as the target where
    `negative`, else the positive prompt with the HR."""
    text = torch.where(negative.view(-1, 1, 1), negative_text, positive_text)
    return text, torch.where(negative.view(-1, 1, 1, 1), source, target)


def initialise_guidance(guidance: DegradationGuidance) -> None:
    """Upstream's fresh init of the modulation MLPs: Kaiming-normal weights × 1e-5 and zero biases (BasicSR
    `default_init_weights`), so every modulation matrix starts near 0; block embeddings N(0, 1), w ~ N(0, 1)."""
    for head in (guidance.vae, guidance.unet):
        for module in (*head.de_mlp, *head.block_mlp, head.fuse_mlp):
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight)
                with torch.no_grad():
                    module.weight.mul_(GUIDANCE_INIT_SCALE)
                nn.init.zeros_(module.bias)


def generator_parameters(networks: S3DiffNetworks) -> dict[str, nn.Parameter]:
    """Upstream's optimiser list: every LoRA factor of the UNet and the VAE, the UNet's conv_in, and the
    modulation heads (MLPs and block embeddings; not the fixed Fourier frequencies w)."""
    params = {f"unet.{n}": p for n, p in networks.unet.named_parameters() if "lora" in n or n.startswith("conv_in.")}
    params |= {f"vae.{n}": p for n, p in networks.vae.named_parameters() if "lora" in n}
    params |= {f"guidance.{n}": p for n, p in networks.guidance.named_parameters() if n != "w"}
    return params


# ---------------------------------------------------------------------------------------------------------------
# The recipe


class S3DiffRecipe(SDRecipe):
    name = "s3diff"
    engine = "s3diff"
    licence = "Apache-2.0 (S3Diff) on SD-Turbo: Stability AI non-commercial research community licence"
    step_each_loss = True

    def __init__(
        self,
        base: str | Path,
        settings: S3DiffSettings | None = None,
        *,
        text: TextSide = TextSide(),
        de_net: str | Path,
        backbone: VisionTransformer,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        pretrained: str | Path | None = None,
    ) -> None:
        """`pretrained`: an official-layout s3diff.pkl to start from (its ranks win over the settings')."""
        s = self.settings = settings or S3DiffSettings()
        require_network(s.lambda_lpips, perceptual, "S3Diff's LPIPS term", PERCEPTUAL_NETWORK, "lambda_lpips")
        super().__init__(
            base, text=text,
            prompts={POSITIVE_KEY: s.prompt, NEGATIVE_KEY: s.negative_prompt}, timesteps=(TIMESTEP,),
        )  # fmt: skip
        self.unet = load_unet(self.base).train().requires_grad_(False)
        self.vae = load_vae(self.base).train().requires_grad_(False)
        if pretrained is not None:
            checkpoint = read_checkpoint(pretrained)
            self.guidance, unet_mod, vae_mod = load_checkpoint_into(self.unet, self.vae, checkpoint)
            targets = list(checkpoint["unet_lora_target_modules"]), str(checkpoint["vae_lora_target_modules"])
        else:
            self.guidance, unet_mod, vae_mod = attach_dg_lora(self.unet, self.vae, rank_unet=s.rank_unet,
                                                              rank_vae=s.rank_vae)  # fmt: skip
            initialise_guidance(self.guidance)
            targets = list(UNET_TARGETS), VAE_TARGETS
        self.estimator = load_degradation_estimator(de_net)
        self.networks = S3DiffNetworks(self.unet, self.vae, self.guidance.train(), self.estimator, self.schedule,
                                       unet_mod, vae_mod, *targets)  # fmt: skip
        self.networks.set_merge(False)  # training runs the unmerged DG-LoRA branch under autograd
        self.discriminator = VisionAidedDiscriminator(backbone, s.disc_channels, s.diffaugment).train()
        self.perceptual = perceptual
        generator = generator_parameters(self.networks)
        for p in generator.values():
            p.requires_grad_(True)
        discriminator = {f"disc.{n}": p for n, p in self.discriminator.heads.named_parameters()}
        self.groups = {"generator": generator, "discriminator": discriminator}
        self.export_config["format"] = "official-pickle"  # `weights add` registers the s3diff.pkl itself

    def generate(self, source: torch.Tensor, scores: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One-step SR in [-1, 1] of inputs in [-1, 1], with gradients: modulation → encode → ε at 999 → x0 → decode."""
        self.networks.set_degradation(scores)
        z = vae_encode(self.vae, source, latent="sample")
        eps = UNetDenoiser(self.unet)(z, TIMESTEP, Conditioning({"text": text}))
        return vae_decode(self.vae, self.schedule.predict_x0(z, eps, TIMESTEP)).clamp(-1, 1)

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        hr, lr = batch["hr"].float(), batch["lr"].float()
        size = hr.shape[0]
        clean = torch.rand(size, device=hr.device) < s.no_degradation_prob
        source, target, estimator_input = training_pair(hr, lr, clean, s.upsample)
        with torch.no_grad():
            scores = self.estimator(estimator_input)
        positive, negative_text = self.embeddings[POSITIVE_KEY], self.embeddings[NEGATIVE_KEY]
        negative = torch.rand(size, device=hr.device) < s.neg_prob
        text, mixed_target = online_negative_prompting(negative, positive, negative_text, source, target)

        prediction = self.generate(source, scores, text)
        l2 = F.mse_loss(prediction.float(), mixed_target.float())
        lpips = self.perceptual(prediction.float(), mixed_target.float()) if s.lambda_lpips > 0 else l2.new_zeros(())
        logs = {"l2": l2.item(), "lpips": lpips.item(), "negative_prompt": negative.float().mean().item()}
        yield "generator", s.lambda_l2 * l2 + s.lambda_lpips * lpips, logs

        prediction = self.generate(source, scores, positive)
        with self.discriminator.frozen():
            fooling = multilevel_bce(self.discriminator(prediction), real=True, real_label=s.real_label).mean()
        yield "generator", s.lambda_gan * fooling, {"gan_g": fooling.item()}

        real = multilevel_bce(self.discriminator(target), real=True, real_label=s.real_label).mean()
        yield "discriminator", s.lambda_gan * real, {"d_real": real.item()}
        fake = multilevel_bce(self.discriminator(prediction.detach()), real=False).mean()
        yield "discriminator", s.lambda_gan * fake, {"d_fake": fake.item()}

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The discriminator's spectral-norm vectors (updated by every forward): part of an exact resume."""
        return {f"disc.{name}": buffer for name, buffer in self.discriminator.power_vectors().items()}

    def export(self, folder: Path) -> Path:
        """`folder/s3diff.pkl` in the official layout and the export config (`srkit weights add NAME --path
        folder`); returns the checkpoint's path (what `--weights` takes)."""
        with atomic_folder(folder) as partial:
            save_checkpoint(self.networks, partial / "s3diff.pkl")
            registry.write_export_config(partial, self.export_config)
        return Path(folder) / "s3diff.pkl"


__all__ = [
    "S3DIFF_DEGRADATION",
    "SETTINGS",
    "TRAINING",
    "S3DiffRecipe",
    "S3DiffSettings",
    "build",
    "generator_parameters",
    "initialise_guidance",
    "online_negative_prompting",
    "training_pair",
]
