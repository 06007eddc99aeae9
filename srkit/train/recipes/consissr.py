"""ConsisSR stage 2 (Gu et al., arXiv:2410.13807; Gujojo/ConsisSR `configs/train_cldm.yaml`, `model/cldm.py`,
`ldm/models/diffusion/ddpm_cldm.py`; notes §3.2) on srkit's trainer, and what both ConsisSR stages share.

Data, restoration framing (`dataset/batch_transform.py`): the Real-ESRGAN second-order degradation with the
DiffBIR/Real-ESRGAN parameters (no USM), the LQ resized back to the HQ size (bicubic) and rounded to 8 bits;
both in [-1, 1].  Per batch: HQ and LQ latents are posterior samples of the frozen VAE; the ControlNet hint is the
frozen `cond_encoder`'s mode on the LQ; the context is [image token of the LQ (OpenCLIP frozen, `ft_layers_4`
trained), the frozen text tower's embedding of the training text '']; t ~ U{0..999} per sample, one u ~ U(0, 1)
per batch, and the TALA loss (`srkit/train/tala.py`).  As upstream's `ControlledUnetModel`, the UNet's encoder
and middle block run without autograd, so gradients reach the trained parameters through the UNet decoder and
the ControlNet's residuals only.

Trainable set, upstream's `ControlLDM.configure_optimizers`, selected by the official parameter names
(`srkit/train/consissr_trainable.py`):
- ControlNet: everything except names containing `attn2` or `norm2`, but with `attn2.to_out_ip`;
- UNet: names containing `attn1.position_emb`, `attnT`, `normT` or `to_out_ip` (the copies in the encoder and
  middle block are listed, as upstream, but receive no gradient, so AdamW never moves them);
- the image-token MLP (`ft_layers_4`).
AdamW at 1e-4, no clipping, no schedule.  Export: a folder with the official Lightning checkpoint (`save_export`:
`ConsisSR.ckpt` and the model's configs): `srkit upscale --model consissr --weights OUT/export`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from srkit.degrade.config import DegradationConfig
from srkit.diffusion.latents import vae_encode
from srkit.train.consissr_trainable import select_trainable, stage2_trainable
from srkit.train.recipes import RecipeInputs, TrainingSetup, local_or_registry
from srkit.train.tala import GAMMA, tala_loss, tala_mask, tala_noisy_and_target

if TYPE_CHECKING:  # the networks' modules load lazily: `srkit --help` lists this recipe without them
    from srkit.nn.consissr import ConsisSRNets

CONSISSR_DEGRADATION = DegradationConfig(usm_sharpen=False, round_8bit=False)
"""`general_deg_realesrgan_train_ImageNet{C,F}.yaml`: Real-ESRGAN's published values, no USM, 8-bit rounding after
the LQ is resized back to the HQ size (`restoration_lq`)."""

TRAINING = TrainingSetup(
    train={"lr": 1e-4, "batch_size": 1, "grad_accum": 1, "steps": 200_001, "max_grad_norm": 0.0,
           "weight_decay": 1e-2, "checkpoint_every": 20_000},
    crop=512,
    degradation=CONSISSR_DEGRADATION,
    source="configs/train_cldm.yaml (1 GPU, 200001 steps, checkpoints every 20000), configs/model/cldm.yaml "
    "(AdamW lr 1e-4), general_deg_realesrgan_train_ImageNetF.yaml (512 crops, batch 1)",
)  # fmt: skip


@dataclass
class ConsisSRSettings:
    """Hyper-parameters with the released values."""

    gamma: float = GAMMA
    """TALA exponent: the LQ latent starts sample i iff u < (t_i/T)^gamma (ddpm_cldm.py p_losses)."""
    prompt: str = ""
    """Training text (the dataset's txt, empty)."""
    model_config: str | None = None
    """Official model yaml for a checkpoint of other sizes (exports carry theirs; default: the released sizes)."""
    clip_config: str | None = None
    """OpenCLIP json going with model_config (default: ViT-H-14)."""


SETTINGS = ConsisSRSettings


def build(settings: ConsisSRSettings, inputs: RecipeInputs) -> ConsisSRRecipe:
    """The ConsisSR checkpoint to start from (`--base`; default: the registry's `consissr`, the release)."""
    return ConsisSRRecipe(local_or_registry(inputs.base, "consissr", inputs.offline), settings)


def restoration_lq(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The LQ at the HQ size in [-1, 1]: LR in [0, 1] bicubic-resized to `size`, rounded to 8 bits (upstream's
    `RealESRGANBatchTransform`, restoration framing)."""
    resized = F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False)
    return (resized * 255).round().clamp(0, 255) / 255 * 2 - 1


@contextmanager
def encoder_without_grad(unet: nn.Module) -> Iterator[None]:
    """The UNet's down blocks and middle block run under no_grad inside (upstream's `ControlledUnetModel`)."""
    blocks = [*unet.down_blocks, unet.mid_block]
    for block in blocks:
        block.forward = torch.no_grad()(block.forward)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class ConsisSRTraining:
    """What both stages share: the networks from an official-layout checkpoint (or an export folder), the
    trainable parameters picked by an upstream rule on the official names, device moves and the export."""

    name = ""

    def __init__(self, checkpoint: str | Path, settings, trainable: Callable[[str], bool]) -> None:
        from srkit.engines.consissr import load_export

        self.nets: ConsisSRNets = load_export(checkpoint, settings.model_config, settings.clip_config).train()
        self.groups = {"consissr": select_trainable(self.nets, trainable)}

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return self.groups

    def to(self, device: torch.device) -> ConsisSRTraining:
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    def export(self, folder: Path) -> Path:
        """The official checkpoint layout with the model's configs, in `folder` (what `--weights` takes)."""
        from srkit.engines.consissr import save_export

        return save_export(self.nets, folder)


class TALAStep(NamedTuple):
    """Everything one TALA loss computes (what the golden fixture records)."""

    z_hq: torch.Tensor
    z_lq: torch.Tensor
    from_lq: torch.Tensor
    noisy: torch.Tensor
    target: torch.Tensor
    hint: torch.Tensor
    context: torch.Tensor
    prediction: torch.Tensor
    per_sample: torch.Tensor
    loss: torch.Tensor


class ConsisSRRecipe(ConsisSRTraining):
    name = "consissr"

    def __init__(self, checkpoint: str | Path, settings: ConsisSRSettings | None = None) -> None:
        self.settings = settings or ConsisSRSettings()
        super().__init__(checkpoint, self.settings, stage2_trainable)
        with torch.no_grad():
            self.text = self.nets.encode_text([self.settings.prompt])

    def to(self, device: torch.device) -> ConsisSRRecipe:
        super().to(device)
        self.text = self.text.to(device)
        return self

    def tala(
        self,
        hq: torch.Tensor,
        lq: torch.Tensor,
        t: torch.Tensor,
        u: float | torch.Tensor,
        *,
        hq_noise: torch.Tensor | None = None,
        lq_noise: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> TALAStep:
        """The TALA loss of HQ/LQ images in [-1, 1] at timesteps t (B,) with the batch's draw u; the posterior
        and diffusion noises are drawn unless given."""
        nets = self.nets
        with torch.no_grad():
            z_hq = vae_encode(nets.vae, hq, latent="sample", noise=hq_noise)
            z_lq = vae_encode(nets.vae, lq, latent="sample", noise=lq_noise)
            hint = nets.hint(lq)
        from_lq = tala_mask(t, u, nets.schedule.num_train_timesteps, self.settings.gamma)
        noise = torch.randn_like(z_hq) if noise is None else noise.to(z_hq)
        noisy, target = tala_noisy_and_target(z_hq, z_lq, noise, t, from_lq, nets.schedule.alphas_cumprod())
        context = nets.context(nets.image_token(lq), self.text)
        with encoder_without_grad(nets.unet):
            prediction = nets.eps(noisy, t, context, nets.embed_hint(hint))
        loss, per_sample = tala_loss(prediction, target)
        return TALAStep(z_hq, z_lq, from_lq, noisy, target, hint, context, prediction, per_sample, loss)

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        hq = batch["hr"].float() * 2 - 1
        lq = restoration_lq(batch["lr"], tuple(hq.shape[-2:]))
        t = torch.randint(0, self.nets.schedule.num_train_timesteps, (hq.shape[0],), device=hq.device)
        result = self.tala(hq, lq, t, torch.rand((), device=hq.device))
        yield "consissr", result.loss, {"tala": result.loss.item(), "lq_start": result.from_lq.float().mean().item()}


__all__ = [
    "CONSISSR_DEGRADATION",
    "SETTINGS",
    "TRAINING",
    "ConsisSRRecipe",
    "ConsisSRSettings",
    "ConsisSRTraining",
    "TALAStep",
    "build",
    "encoder_without_grad",
    "restoration_lq",
]
