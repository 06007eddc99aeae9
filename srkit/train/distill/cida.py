"""GenDR's CiDA: CiD plus an adversarial term and REPA alignment (arXiv 2503.06790 §4.3, Eqs. 10–11, §5.1).

    L_cida = λ₁·L_cid + λ₂·L_adv + λ₃·L_repa      (Eq. 11; λ₁ = 10 for the first 10k steps then 1, λ₂ = 0.01, λ₃ = 0.1)

- Adversarial (Eq. 10): a discriminator head reads UNet features of the noised z_g and z_h (same t and ε as the
  CiD term) and outputs a map of logits. Eq. 10 as printed is a log-likelihood to maximise inside a minimised sum;
  srkit minimises the non-saturating −ln D(z_g) for G and the logistic loss for the head [proposal, notes A.5, §C].
- REPA (Eq. 3, reused on the generator): the generator UNet's features after its first down block, projected by an
  MLP, are aligned token by token with frozen encoder features (DINOv2) of the HR image: −mean cos [proposal; REPA].

Every term is elementwise (per logit, per token); `reduce_loss` makes scalars so that λ₁…λ₃ balance per-sample
means (notes §C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from srkit.train.distill.cid import CiDSettings
from srkit.train.distill.sid import reduce_loss


@dataclass
class CiDASettings(CiDSettings):
    """CiDA's coefficients on top of CiD's, with their sources."""

    lambda_cid: float = 10.0
    """λ₁ for the first lambda_cid_steps generator steps [paper §5.1: 10]."""
    lambda_cid_final: float = 1.0
    """λ₁ afterwards [paper §5.1: 1]."""
    lambda_cid_steps: int = 10_000
    """λ₁ is `lambda_cid` for the first `lambda_cid_steps` generator steps, then `lambda_cid_final` [paper §5.1]."""
    lambda_adv: float = 0.01
    """λ₂ [paper §5.1; also SiDA's lsg_gan]."""
    lambda_repa: float = 0.1
    """λ₃ [paper §5.1]."""
    discriminator_width: int = 256
    """Channels of the discriminator head's hidden convolutions [proposal, notes §C]."""
    projector_width: int = 2048
    """Hidden width of the REPA projector MLP [proposal: REPA's projector_dim]; its output width is the encoder's."""

    def cid_weight(self, step: int) -> float:
        """λ₁ at generator step `step` (0-based)."""
        return self.lambda_cid if step < self.lambda_cid_steps else self.lambda_cid_final


class DiscriminatorHead(nn.Module):
    """The "extra discriminative heads h" of Eq. 10: UNet features (B, C, H′, W′) → logits (B, 1, H′, W′).

    Conv3×3 – GroupNorm – SiLU – Conv3×3 – GroupNorm – SiLU – Conv1×1 [proposal, notes §C: at 512 px it reads the
    8×8×1280 mid-block output of the base UNet with the ϕ adapter]."""

    def __init__(self, in_channels: int = 1280, width: int = 256, groups: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class RepaProjector(nn.Sequential):
    """REPA's projector h of Eq. 3: a three-layer MLP with SiLU applied to each token, (…, in) → (…, out).
    Defaults: the generator's 320-channel features after down_blocks[0] → 768-d DINOv2-B tokens [proposal]."""

    def __init__(self, in_features: int = 320, width: int = 2048, out_features: int = 768) -> None:
        super().__init__(
            nn.Linear(in_features, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, out_features),
        )


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The head's logistic loss per logit, softplus(−D_real) + softplus(D_fake) = −ln σ(D_real) − ln(1 − σ(D_fake)):
    Eq. 1's value function, negated so that it is minimised. Both logit maps must carry the head's graph (the head
    learns from real and fake alike); the caller feeds the head detached features, so no gradient of this loss
    reaches the generator."""
    return F.softplus(-logits_real) + F.softplus(logits_fake)


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_adv per logit, softplus(−D_fake) = −ln σ(D_fake): Eq. 10 with the sign that a minimised Eq. 11 needs
    (non-saturating GAN loss)."""
    return F.softplus(-logits_fake)


def feature_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C): one token per position, in row-major order like a ViT's patch tokens."""
    return feature_map.flatten(2).transpose(1, 2)


def repa_alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_repa per token, −cos(h(h_t[n]), h_E[n]) for (B, N, D) projected generator tokens and (B, N, D) encoder
    tokens (the target is frozen: detached)."""
    if projected.shape != target.shape:
        raise ValueError(
            f"REPA needs one target token per generator token: projected {tuple(projected.shape)} vs "
            f"target {tuple(target.shape)}"
        )
    return -F.cosine_similarity(projected, target.detach(), dim=-1)


@dataclass(frozen=True)
class CiDALoss:
    """The generator's total and its reduced parts (for logging)."""

    total: torch.Tensor
    cid: torch.Tensor
    adversarial: torch.Tensor | None
    repa: torch.Tensor | None


def cida_generator_loss(
    cid_elements: torch.Tensor,
    adversarial_elements: torch.Tensor | None,
    repa_elements: torch.Tensor | None,
    settings: CiDASettings,
    step: int,
) -> CiDALoss:
    """Eq. 11 from the elementwise terms; a term given as None is left out (None, None: plain CiD, λ₁·L_cid)."""
    cid = reduce_loss(cid_elements, settings.normalisation)
    total = settings.cid_weight(step) * cid
    adversarial = repa = None
    if adversarial_elements is not None:
        adversarial = reduce_loss(adversarial_elements, settings.normalisation)
        total = total + settings.lambda_adv * adversarial
    if repa_elements is not None:
        repa = reduce_loss(repa_elements, settings.normalisation)
        total = total + settings.lambda_repa * repa
    return CiDALoss(total, cid, adversarial, repa)


__all__ = [
    "CiDALoss",
    "CiDASettings",
    "DiscriminatorHead",
    "RepaProjector",
    "cida_generator_loss",
    "discriminator_loss",
    "feature_tokens",
    "generator_adversarial_loss",
    "repa_alignment_loss",
]
