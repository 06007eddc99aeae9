"""The one-step SR updates: one network evaluation turns an LR latent into a clean latent (float32).

- `x0_at`: OSEDiff and S3Diff read the network at a fixed timestep (999) on the LR latent itself and take its x0.
- `noise_injected_x0`: NAOSD / GDPO-SR first noise the latent to t_add, then let the network see it as t_diff
  ("unequal timesteps"); the noise is what makes one LR give many plausible outputs.
- `gendr_update`: GenDR's z_g = (z_l − β̄·ε̂(z_l, t_s))/ᾱ, whose ᾱ, β̄ are not schedule values (ᾱ² + β̄² ≠ 1).
Inference passes seeded (or replayed) noise; training passes fresh noise and keeps gradients.
"""

from __future__ import annotations

import torch

from srkit.diffusion.denoiser import Conditioning, Denoiser
from srkit.diffusion.runtime import fp32_region
from srkit.diffusion.schedule import NoiseSchedule, Timestep


def draw_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device (the api seeds it per image), so
    a seed gives the same noise on every device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def x0_at(denoiser: Denoiser, schedule: NoiseSchedule, z: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor:
    """x0 = (z − √(1−ᾱ_t)·ε̂(z, t))/√ᾱ_t (for ε-prediction; the schedule handles v and sample prediction)."""
    return schedule.predict_x0(z, denoiser(z, t, cond), t)


def noise_injected_x0(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    z: torch.Tensor,
    noise: torch.Tensor,
    t_add: Timestep,
    t_diff: Timestep,
    cond: Conditioning,
) -> torch.Tensor:
    """Noise z to t_add with `noise`, let the network see it as t_diff, return its x0."""
    noisy = schedule.add_noise(z, noise.to(z.device), t_add)
    return schedule.predict_x0(noisy, denoiser(noisy, t_diff, cond), t_diff)


def gendr_update(
    denoiser: Denoiser, z: torch.Tensor, t: Timestep, cond: Conditioning, alpha: float, beta: float
) -> torch.Tensor:
    """GenDR's one step, z_g = (z_l − β̄·ε̂(z_l, t_s))/ᾱ."""
    eps = denoiser(z, t, cond)
    with fp32_region(z.device):
        return (z.float() - beta * eps.float()) / alpha


__all__ = ["draw_noise", "gendr_update", "noise_injected_x0", "x0_at"]
