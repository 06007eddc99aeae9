"""The forward process and the x0 estimate at per-sample timesteps (training draws one t per sample)."""

from __future__ import annotations

import torch

from srkit.engines.sd import NoiseSchedule


def _alpha_bar(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = schedule.alphas_cumprod.to(like.device)[t.long()]
    return a.view(-1, *([1] * (like.dim() - 1)))


def add_noise_at(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise with t of shape (B,), in float32."""
    a = _alpha_bar(schedule, t, x0)
    return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def predict_x0_at(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t with t of shape (B,) (ε-prediction models), in float32."""
    a = _alpha_bar(schedule, t, x_t)
    return (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()
