"""ConsisSR stage 1, HPA CLIP distillation (Gujojo/ConsisSR `configs/train_clip.yaml`,
`configs/model/clip_distill.yaml`, `model/clip_distill.py` + `ldm/models/diffusion/ddpm_clip.py`; notes §3.2).

The OpenCLIP visual tower is tuned so that its pooled embedding of the LQ matches what a frozen copy of itself
(taken at the start, upstream's `v_fix`) gives for the HQ:  loss = MSE(visual(LQ), visual_frozen(HQ)), both
through the image-token path (to [0, 1], bicubic to 224², OpenAI CLIP mean/std).  The diffusion networks are
not used.  Trainable: every parameter of the visual tower (upstream: names containing `visual`).  AdamW at
1e-4 × LambdaWarmUpCosineScheduler(warm-up 1000 steps from 0.01 to 1, cosine to 0.01 at step 100001), no
clipping; 224² crops, batch 8, the same degradation and restoration framing as stage 2.  Export: the whole
checkpoint with the tuned tower in the official layout — the `--base` of `--recipe consissr`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from srkit.nn.hpa_prompt import clip_pixels
from srkit.train.consissr_trainable import stage1_trainable
from srkit.train.recipes import RecipeInputs, local_or_registry
from srkit.train.recipes.consissr import TRAINING as STAGE2_TRAINING
from srkit.train.recipes.consissr import ConsisSRTraining, restoration_lq

TRAINING = replace(
    STAGE2_TRAINING,
    train={**STAGE2_TRAINING.train, "batch_size": 8, "steps": 100_001, "checkpoint_every": 10_000},
    crop=224,
    source="configs/train_clip.yaml (1 GPU, 100001 steps, checkpoints every 10000), configs/model/"
    "clip_distill.yaml (AdamW lr 1e-4), general_deg_realesrgan_train_ImageNetC.yaml (224 crops, batch 8)",
)
"""Stage 2's setup (same optimiser, degradation) with stage 1's batch, length and crop."""


@dataclass
class ConsisSRClipSettings:
    """Hyper-parameters with the released values (the learning-rate schedule is a multiplier of --lr)."""

    warm_up_steps: int = 1000
    """Linear warm-up steps of the learning-rate multiplier (clip_distill.yaml LambdaWarmUpCosineScheduler)."""
    lr_start: float = 0.01
    """Multiplier at step 0 (clip_distill.yaml)."""
    lr_max: float = 1.0
    """Multiplier at the end of the warm-up (clip_distill.yaml)."""
    lr_min: float = 0.01
    """Multiplier at the end of the cosine (clip_distill.yaml)."""
    max_decay_steps: int = 100_001
    """Step where the cosine ends (clip_distill.yaml)."""
    model_config: str | None = None
    """Official model yaml for a checkpoint of other sizes (exports carry theirs; default: the released sizes)."""
    clip_config: str | None = None
    """OpenCLIP json going with model_config (default: ViT-H-14)."""

    def __post_init__(self) -> None:
        if not 0 <= self.warm_up_steps < self.max_decay_steps:
            raise ValueError("warm_up_steps must be at least 0 and below max_decay_steps")


SETTINGS = ConsisSRClipSettings


def build(settings: ConsisSRClipSettings, inputs: RecipeInputs) -> ConsisSRClipRecipe:
    """The ConsisSR checkpoint whose visual tower to tune (`--base`; default: the registry's `consissr`)."""
    return ConsisSRClipRecipe(local_or_registry(inputs.base, "consissr", inputs.offline), settings)


def warmup_cosine(step: int, s: ConsisSRClipSettings) -> float:
    """ldm's LambdaWarmUpCosineScheduler: linear from lr_start to lr_max over the warm-up, then a half cosine
    to lr_min at max_decay_steps, then lr_min."""
    if step < s.warm_up_steps:
        return (s.lr_max - s.lr_start) / s.warm_up_steps * step + s.lr_start
    progress = min((step - s.warm_up_steps) / (s.max_decay_steps - s.warm_up_steps), 1.0)
    return s.lr_min + 0.5 * (s.lr_max - s.lr_min) * (1 + math.cos(progress * math.pi))


class ConsisSRClipRecipe(ConsisSRTraining):
    name = "consissr-clip"

    def __init__(self, checkpoint: str | Path, settings: ConsisSRClipSettings | None = None) -> None:
        self.settings = settings or ConsisSRClipSettings()
        super().__init__(checkpoint, self.settings, stage1_trainable)
        self.frozen_visual = copy.deepcopy(self.nets.prompt.clip.visual).eval().requires_grad_(False)

    def lr_factor(self, group: str, step: int) -> float:
        return warmup_cosine(step, self.settings)

    def distillation(self, lq: torch.Tensor, hq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, LQ embedding, HQ embedding) for images in [-1, 1]: MSE(visual(LQ), frozen visual(HQ))."""
        lq_embedding = self.nets.prompt.image_embedding(lq)
        with torch.no_grad():
            hq_embedding = self.frozen_visual(clip_pixels(hq))
        return F.mse_loss(lq_embedding.float(), hq_embedding.float()), lq_embedding, hq_embedding

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        hq = batch["hr"].float() * 2 - 1
        loss, _, _ = self.distillation(restoration_lq(batch["lr"], tuple(hq.shape[-2:])), hq)
        yield "consissr", loss, {"clip": loss.item()}


__all__ = ["SETTINGS", "TRAINING", "ConsisSRClipRecipe", "ConsisSRClipSettings", "build", "warmup_cosine"]
