"""Training losses of the one-step family: GDPO (group DPO on denoising errors), Diffusion-DPO, and VSD.

GDPO-SR (notes §4.4): for every sample g of a group, the policy and the frozen reference predict the noise of the
same noised latent; with per-sample errors e = mean_{C,H,W}(ε̂ − ε)² and group advantages A,
    L = −mean_b log σ( −(ω/2) · Σ_g A_g · (e_θ,g − e_ref,g) ),   ω = 5000
(the official code writes the factor as −0.5·5000).  Above-average samples are pushed to a lower denoising error
than the reference's, below-average ones to a higher one.  With G = 2 the advantages are ±1/√2, so GDPO equals
Diffusion-DPO (Wallace et al., 2023) with β = ω/√2 — a unit test pins that.

VSD / distribution matching (OSEDiff/NAOSD, notes §3.3): with x0 estimates of the LoRA "fake" score and the frozen
"real" score (CFG 7.5), w = mean|ẑ − x0_real| per sample, g = (x0_fake − x0_real)/w and
    L_VSD = MSE(ẑ, stopgrad(ẑ − g)),
whose gradient with respect to ẑ is 2g/N (DMD-style): it moves ẑ away from the fake score towards the real one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GDPO_OMEGA = 5000.0


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all but the first axis of (prediction − target)², in float32: (N, …) -> (N,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def gdpo_loss(
    policy_error: torch.Tensor, reference_error: torch.Tensor, advantages: torch.Tensor, omega: float = GDPO_OMEGA
) -> torch.Tensor:
    """GDPO loss from (B, G) per-sample denoising errors of the policy and the reference and (B, G) advantages."""
    if not policy_error.shape == reference_error.shape == advantages.shape or policy_error.dim() != 2:
        raise ValueError("policy_error, reference_error and advantages must all be (B, G)")
    inside = -(omega / 2) * (advantages.detach() * (policy_error - reference_error)).sum(dim=1)
    return -F.logsigmoid(inside).mean()


def diffusion_dpo_loss(
    policy_win: torch.Tensor,
    reference_win: torch.Tensor,
    policy_lose: torch.Tensor,
    reference_lose: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Diffusion-DPO on (B,) per-sample errors of the preferred (win) and the other (lose) sample:
    −log σ(−(β/2)·((e_θ,w − e_ref,w) − (e_θ,l − e_ref,l)))."""
    inside = -(beta / 2) * ((policy_win - reference_win) - (policy_lose - reference_lose))
    return -F.logsigmoid(inside).mean()


def vsd_loss(latents: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """Variational score distillation on predicted clean latents ẑ (B, C, H, W); gradient 2g/N with respect to ẑ."""
    with torch.no_grad():
        weight = (latents - x0_real).abs().float().mean(dim=(1, 2, 3), keepdim=True)
        direction = (x0_fake.float() - x0_real.float()) / weight
        target = latents.float() - direction
    return F.mse_loss(latents.float(), target)


__all__ = ["GDPO_OMEGA", "diffusion_dpo_loss", "gdpo_loss", "per_sample_error", "vsd_loss"]
