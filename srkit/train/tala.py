"""TALA, ConsisSR's timestep-aware latent augmentation (Gujojo/ConsisSR `ldm/models/diffusion/ddpm_cldm.py`
`p_losses`; notes §3.2).

Per batch one uniform draw u ~ U(0, 1) and per sample a timestep t_i; sample i starts its diffusion from the LQ
latent instead of the HQ one iff u < (t_i/T)^γ (γ = 10: about 0.35 at t = 900, 0.001 at t = 500, so only noisy
timesteps are affected):
    start_i = z_LQ,i if u < (t_i/T)^γ else z_HQ,i,      x_t = √ᾱ_t·start + √(1−ᾱ_t)·ε,
and the ε-target is recomputed against the HQ latent, so that it maps x_t back to z_HQ whichever start was used:
    ε* = (x_t − √ᾱ_t·z_HQ) / √(1−ᾱ_t),      loss = mean_i mean((ε̂_i − ε*_i)²).
The schedule factors are the ldm buffers: computed from ᾱ in float64, used in float32; the comparison runs in
float32, as the official `random.random() < (t / T) ** 10` on a tensor does.
"""

from __future__ import annotations

import torch

from srkit.train.losses import per_sample_error

GAMMA = 10.0


def tala_mask(t: torch.Tensor, u: float | torch.Tensor, num_timesteps: int, gamma: float = GAMMA) -> torch.Tensor:
    """(B,) bool: which samples start from the LQ latent, for timesteps t (B,) and one uniform draw u."""
    threshold = (t.to(torch.float32) / num_timesteps) ** gamma
    return torch.as_tensor(u, dtype=torch.float32, device=t.device) < threshold


def _factors(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ_t, √(1−ᾱ_t)) per sample, shaped to broadcast over `like`, float32."""
    shape = (-1,) + (1,) * (like.dim() - 1)
    alpha_bar = alphas_cumprod.to(torch.float64)
    signal = alpha_bar.sqrt().float().to(like.device)[t].view(shape)
    noise = (1 - alpha_bar).sqrt().float().to(like.device)[t].view(shape)
    return signal, noise


def tala_noisy_and_target(
    z_hq: torch.Tensor,
    z_lq: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    from_lq: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, ε*): the noised start (LQ latent where `from_lq`, else HQ) and the ε-target against the HQ latent."""
    signal, sigma = _factors(alphas_cumprod, t, z_hq)
    start = torch.where(from_lq.view(-1, *([1] * (z_hq.dim() - 1))), z_lq, z_hq)
    noisy = signal * start + sigma * noise
    return noisy, (noisy - signal * z_hq) / sigma


def tala_loss(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, (B,) per-sample MSE) of the predicted ε against ε*."""
    per_sample = per_sample_error(prediction, target)
    return per_sample.mean(), per_sample


__all__ = ["GAMMA", "tala_loss", "tala_mask", "tala_noisy_and_target"]
