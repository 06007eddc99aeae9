"""Score identity Distillation (SiD, Zhou et al. 2024) in both parameterisations: EDM σ (native SiD) and DDPM ᾱ
(SiD-LSG, for Stable Diffusion), as pure functions over the networks the caller plugs in.

One step of SiD draws one noise level and one ε per sample, noises the generator output y, and asks the frozen
teacher ("real" score) and the fake score (trained on the generator's samples) for x0 estimates at the **same**
noised input. In x0 space the generator loss is, elementwise (notes B.1),

    ℓ = (y_real − y_fake) ⊙ ((y_real − r) − α·(y_real − y_fake)) / w,   w = max(mean_CHW |r − y_real|, 1e-5),

with r = y for SiD (CiD puts the HR latent there, see cid.py). w is a per-sample constant (no gradient), but the
networks' **inputs keep the graph**: ∂ℓ/∂y = direct part + both networks' Jacobians. Detaching z_t changes the
gradient by ~22 % on the golden, and removes CiD's gradient entirely.

Losses are returned elementwise; `reduce_loss` turns them into the scalar with the official sum/B ("sum") or a
per-sample mean ("mean", srkit's CiDA convention, notes §C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from srkit.train.distill.vp import (
    EpsModel,
    PromptGuidance,
    guided_eps,
    guided_x0,
    vp_coefficients,
    x0_from_eps,
)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""An EDM-preconditioned denoiser D(x, σ) → x0, with σ shaped (B, 1, 1, 1) as EDM passes it."""

Normalisation = Literal["sum", "mean"]

WEIGHT_FLOOR = 1e-5
"""Lower bound of the weight factor w [code: SiD sid_loss.py]."""
SID_ALPHA_EDM = 1.2
"""α of native SiD [code: SiD sid_train.py --alpha default; CIFAR-10, ImageNet-64, FFHQ runs]."""
SID_ALPHA_LSG = 1.0
"""α of SiD-LSG's Stable Diffusion runs [code: SiD-LSG run scripts]."""
SID_TMAX = 800
"""SiD's generator noise levels cover u·tmax/1000 of the ρ-schedule [code: SiD sid_train.py --tmax]."""
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5
"""EDM's log-normal training σ and data std [code: SiD SID_EDMLoss defaults]."""


@dataclass(frozen=True)
class ScoreIdentityTerms:
    """The SiD generator loss of one batch and what it was computed from (the recipe logs them; CiDA reuses the
    noised latents for its discriminator)."""

    elements: torch.Tensor
    """ℓ, elementwise, shaped like the latents."""
    x0_real: torch.Tensor
    x0_fake: torch.Tensor
    weight_factor: torch.Tensor
    """w per sample, (B,), no gradient: SiD's weight_factor, CiD's ω⁻¹."""
    noisy: torch.Tensor
    """The noised generator output both networks saw (z_t or y + σn)."""


def sid_weight_factor(
    reference: torch.Tensor, x0_real: torch.Tensor, floor: float = WEIGHT_FLOOR
) -> torch.Tensor:
    """w = max(mean over C,H,W of |r − x0_real|, floor), one value per sample, without gradient and in at least
    float32: it only normalises the step size per sample."""
    dtype = torch.promote_types(x0_real.dtype, torch.float32)
    with torch.no_grad():
        distance = (reference.detach().to(dtype) - x0_real.detach().to(dtype)).abs()
        return distance.flatten(1).mean(dim=1).clamp_min(floor)


def score_identity_loss(
    x0_real: torch.Tensor,
    x0_fake: torch.Tensor,
    reference: torch.Tensor,
    alpha: float,
    floor: float = WEIGHT_FLOOR,
    weight_reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ℓ, w): ℓ = (x0_real − x0_fake)·((x0_real − r) − α·(x0_real − x0_fake))/w, elementwise ("L2 − α·L1").
    w is measured from `weight_reference` (default r: SiD, and CiD as the paper states it)."""
    weight = sid_weight_factor(reference if weight_reference is None else weight_reference, x0_real, floor)
    gap = x0_real - x0_fake
    elements = (
        gap * ((x0_real - reference) - alpha * gap) / weight.to(gap.dtype).view(-1, *([1] * (gap.dim() - 1)))
    )
    return elements, weight


def reduce_loss(elements: torch.Tensor, normalisation: Normalisation = "sum") -> torch.Tensor:
    """The scalar loss of per-element terms: "sum" is the official Σℓ/B (SiD, SiD-LSG, the golden); "mean" is the
    per-sample mean over all non-batch elements, averaged over the batch (the same for every term's shape, so
    λ-weights compare terms of different sizes on one footing)."""
    if normalisation == "sum":
        return elements.sum() / elements.shape[0]
    if normalisation == "mean":
        return elements.mean()
    raise ValueError(f"unknown normalisation '{normalisation}' (expected 'sum' or 'mean')")


# ---------------------------------------------------------------------------------------------------------------
# EDM σ-parameterisation (native SiD): z = y + σ·n, networks are preconditioned denoisers D(x, σ)
# ---------------------------------------------------------------------------------------------------------------


def sid_generator_sigma(
    u: torch.Tensor,
    tmax: int = SID_TMAX,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = EDM_RHO,
) -> torch.Tensor:
    """σ for the generator step from u ~ U[0, 1): the point u·tmax/1000 of EDM's ρ-schedule counted from σ_min,
    (σ_max^{1/ρ} + (1 − u·tmax/1000)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, in [0.002, 24.41) for tmax = 800."""
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (top + (1 - u * (tmax / 1000)) * (bottom - top)) ** rho


def edm_training_sigma(
    normal: torch.Tensor, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD
) -> torch.Tensor:
    """EDM's log-normal σ = exp(P_mean + P_std·n) for the fake-score step, from n ~ N(0, 1)."""
    return (p_mean + p_std * normal).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = EDM_SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)², EDM's weighting of the x0 error (= 1/σ² + 1/σ_d²)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def sid_generator_loss_edm(
    generated: torch.Tensor,
    real: Denoiser,
    fake: Denoiser,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    alpha: float = SID_ALPHA_EDM,
) -> ScoreIdentityTerms:
    """SiD's generator loss on generator output y (with its graph) at per-sample σ (B,), noise n ~ N(0, I)."""
    sigma = _per_sample(sigma, generated)
    noisy = generated + sigma * noise.to(generated.dtype)
    x0_real, x0_fake = real(noisy, sigma), fake(noisy, sigma)
    elements, weight = score_identity_loss(x0_real, x0_fake, generated, alpha)
    return ScoreIdentityTerms(elements, x0_real, x0_fake, weight, noisy)


def edm_fake_score_loss(
    generated: torch.Tensor,
    fake: Denoiser,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    sigma_data: float = EDM_SIGMA_DATA,
) -> torch.Tensor:
    """SiD's fake-score loss λ(σ)·(D_fake(y + σn, σ) − y)², elementwise; y is data here (detached)."""
    target = generated.detach()
    sigma = _per_sample(sigma, target)
    prediction = fake(target + sigma * noise.to(target.dtype), sigma)
    return edm_loss_weight(sigma, sigma_data) * (prediction - target) ** 2


# ---------------------------------------------------------------------------------------------------------------
# DDPM ᾱ-parameterisation (SiD-LSG, GenDR): z_t = a_t·y + b_t·ε, networks predict ε, guidance on both scores
# ---------------------------------------------------------------------------------------------------------------


def sid_generator_loss_vp(
    generated: torch.Tensor,
    real: EpsModel,
    fake: EpsModel,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    guidance: PromptGuidance,
    alpha: float = SID_ALPHA_LSG,
    reference: torch.Tensor | None = None,
    weight_reference: torch.Tensor | None = None,
) -> ScoreIdentityTerms:
    """SiD-LSG's generator loss: both scores give guided x0 estimates (the same κ, SiD-LSG's κ₂ = κ₄) at one z_t
    built from y with its graph. `reference` r defaults to y (SiD); CiD passes the HR latent. `weight_reference`
    (default r) is what w is measured from."""
    a, b = vp_coefficients(alphas_cumprod, t, generated)
    noisy = a * generated + b * noise.to(generated.dtype)
    x0_real = guided_x0(real, noisy, t, alphas_cumprod, guidance)
    x0_fake = guided_x0(fake, noisy, t, alphas_cumprod, guidance)
    elements, weight = score_identity_loss(
        x0_real, x0_fake, generated if reference is None else reference, alpha, weight_reference=weight_reference
    )
    return ScoreIdentityTerms(elements, x0_real, x0_fake, weight, noisy)


def score_matching_loss(
    eps_model: EpsModel,
    clean: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    guidance: PromptGuidance,
    target: Literal["x0", "eps"] = "x0",
) -> torch.Tensor:
    """Denoising loss of a score network on data `clean` (detached: it only teaches the network), elementwise:
    "x0": (x̂0_κ − z)², GenDR Eq. 7 (both L_ϕ on z_h and L_ψ on z_g); "eps": (ε̂_κ − ε)², SiD-LSG's fake loss."""
    clean = clean.detach()
    a, b = vp_coefficients(alphas_cumprod, t, clean)
    noise = noise.to(clean.dtype)
    noisy = a * clean + b * noise
    eps = guided_eps(eps_model, noisy, t, guidance)
    if target == "eps":
        return (eps - noise) ** 2
    if target == "x0":
        return (x0_from_eps(noisy, eps, a, b) - clean) ** 2
    raise ValueError(f"unknown score target '{target}' (expected 'x0' or 'eps')")


__all__ = [
    "SID_ALPHA_EDM",
    "SID_ALPHA_LSG",
    "SID_TMAX",
    "WEIGHT_FLOOR",
    "Denoiser",
    "Normalisation",
    "ScoreIdentityTerms",
    "edm_fake_score_loss",
    "edm_loss_weight",
    "edm_training_sigma",
    "reduce_loss",
    "score_identity_loss",
    "score_matching_loss",
    "sid_generator_loss_edm",
    "sid_generator_loss_vp",
    "sid_generator_sigma",
    "sid_weight_factor",
]
