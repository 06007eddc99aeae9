"""GenDR's CiD, consistent score identity distillation (arXiv 2503.06790 §4.2, Eqs. 7–9, §5.1), on SiD-LSG's maths.

Per batch, with z_g = G_θ(z_l) the generator's latent and z_h the HR latent of the same image (notes A.4, §C):
1. Score networks (Eq. 7, x0 targets, κ = 1): the real score ϕ learns the HR manifold, L_ϕ = ‖f_ϕ(z_t) − z_h‖²
   with z_t from z_h; the fake score ψ learns the generator's, L_ψ = ‖f_ψ(z_t) − z_g‖² with z_t from sg(z_g).
2. Generator (Eqs. 8–9): one t and ε per sample shared by both guided scores at z_t = a_t·z_g + b_t·ε, and
       ℓ = ω·[(f_ϕ,κ − f_ψ,κ)·(f_ϕ,κ − z_h) − ξ·(f_ϕ,κ − f_ψ,κ)²],   ω = 1/max(mean|z_h − f_ϕ,κ|, 1e-5),
   i.e. SiD's loss with the HR latent as the reference r, in the inner product (Eq. 8) and in ω (§5.1).
   With a constant z_h the direct ∂ℓ/∂z_g term is gone: the whole gradient reaches G through both networks'
   Jacobians at z_t, which therefore must not be detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from srkit.train.distill.sid import (
    SID_ALPHA_LSG,
    WEIGHT_FLOOR,
    Normalisation,
    ScoreIdentityTerms,
    sid_generator_loss_vp,
)
from srkit.train.distill.vp import EpsModel, PromptGuidance


@dataclass
class CiDSettings:
    """CiD's coefficients, with their sources (the recipe extends this)."""

    cfg_scale: float = 2.0
    """κ on both scores in the generator loss [proposal: SiD-LSG's SD runs, κ₂ = κ₄ = 2; paper: not stated]."""
    xi: float = SID_ALPHA_LSG
    """ξ of Eq. 9, weight of L⁽¹⁾ (SiD's α) [proposal: SiD-LSG's 1.0; paper: not stated; SiD EDM uses 1.2]."""
    t_min: int = 20
    """Lowest score timestep [paper §5.1: 20]."""
    t_max: int = 980
    """Score timesteps t ~ U{t_min, …, t_max − 1} [paper §5.1: t ∈ {20, …, 979}; code: SiD-LSG randint(20, 980)]."""
    weight_floor: float = WEIGHT_FLOOR
    """Lower bound of ω⁻¹ [code: SiD; paper: ω = C/sg‖z_h − f_ϕ,κ‖ with C and the norm not stated]."""
    score_cfg_scale: float = 1.0
    """κ when training ϕ and ψ [paper Eq. 7: no guidance]."""
    prompt_dropout: float = 0.1
    """Fraction of score-training samples whose prompt becomes ∅, keeping the unconditional branch that guidance
    uses [proposal: SiD-LSG drops 10 % when κ ≠ 1]."""
    score_target: str = "x0"
    """"x0": Eq. 7's unweighted x0 MSE [paper]; "eps": SiD-LSG's ε MSE [code]."""
    normalisation: Normalisation = "mean"
    """How elementwise terms become a scalar (this fixes what λ₁…λ₃ mean) [proposal, notes §C: per-sample mean;
    the paper does not say; the official SiD code and the golden use "sum" = Σℓ/B]."""


def sample_timesteps(
    batch: int,
    t_min: int,
    t_max: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One score timestep per sample, uniform on {t_min, …, t_max − 1}."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(t_min, t_max, (batch,), generator=generator, device=gen_device).to(device)


CiDForm = Literal["paper", "hr-weight", "sid"]
"""Where the HR latent enters the generator loss:
- "paper": in the inner product (Eq. 8) and in ω (§5.1), as the paper writes it (and the golden pins it);
- "hr-weight": SiD's inner product ⟨f_ϕ − f_ψ, f_ϕ − z_g⟩ (it keeps SiD's direct gradient), z_h only in ω;
- "sid": plain SiD-LSG, z_g in both (a baseline; the HR then enters only through ϕ and any regression term)."""


def cid_generator_loss(
    generated: torch.Tensor,
    hr_latents: torch.Tensor,
    real: EpsModel,
    fake: EpsModel,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    guidance: PromptGuidance,
    xi: float = SID_ALPHA_LSG,
    form: CiDForm = "paper",
) -> ScoreIdentityTerms:
    """L_cid = L⁽³⁾ − ξ·L⁽¹⁾ (Eq. 9) elementwise, with `guidance` carrying κ for both scores; its weight_factor is
    ω⁻¹ and its noisy latents are the z_t the discriminator of CiDA reuses. `form` says where z_h enters (CiDForm)."""
    hr = hr_latents.detach()
    if form == "paper":
        reference, weight_reference = hr, hr
    elif form == "hr-weight":
        reference, weight_reference = generated, hr
    elif form == "sid":
        reference, weight_reference = generated, generated
    else:
        raise ValueError(f"unknown CiD form '{form}' (expected 'paper', 'hr-weight' or 'sid')")
    return sid_generator_loss_vp(
        generated, real, fake, t, noise, alphas_cumprod, guidance, alpha=xi, reference=reference,
        weight_reference=weight_reference,
    )  # fmt: skip


def regression_loss(generated: torch.Tensor, hr_latents: torch.Tensor) -> torch.Tensor:
    """Eq. 6's L_mse = (z_g − z_h)² elementwise: the explicit SR term of earlier one-step methods (OSEDiff), which
    the fact sheet (§1.5) says CiD adds and the CiD sheet (A.4) says Eq. 11 leaves out."""
    return (generated - hr_latents.detach()) ** 2


__all__ = ["CiDForm", "CiDSettings", "cid_generator_loss", "regression_loss", "sample_timesteps"]
