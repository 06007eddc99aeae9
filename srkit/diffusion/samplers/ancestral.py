"""Ancestral DDPM sampling over a subset of the training timesteps, with the posterior ("fixed_small") variance.

Both multi-step SR codebases srkit runs sample this way; they only pick the timesteps differently:
- ConsisSR / DiffBIR v1 (`SpacedSampler`, guided-diffusion `space_timesteps`): N steps spread over 0…999 with
  `round(k·999/(N−1)·starts)` (Python rounding), so the first step is 999 (or ≈ starts·999 for GAN-Embedding);
- SeeSR (diffusers `DDPMScheduler`, "leading" spacing, steps_offset 1): t_i = (N−1−i)·(1000//N) + 1.
Between two consecutive chosen timesteps t > t′ the step is the DDPM posterior of the respaced chain
(β′ = 1 − ᾱ_t/ᾱ_t′, ᾱ_t′ = 1 after the last step):
    x̂0 = (x − √(1−ᾱ_t)·ε)/√ᾱ_t
    μ  = √ᾱ_t′·β′/(1−ᾱ_t)·x̂0 + √(1−β′)·(1−ᾱ_t′)/(1−ᾱ_t)·x
    x′ = μ + σ·n,  σ² = max(β′·(1−ᾱ_t′)/(1−ᾱ_t), 1e-20)
which is what guided-diffusion's spaced coefficients and diffusers' `DDPMScheduler.step` both compute.  The
coefficients are computed in float64 and applied in float32, as guided-diffusion does; the latent stays float32
whatever precision the network runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from srkit.diffusion.denoiser import Conditioning, Denoiser
from srkit.diffusion.runtime import fp32_region
from srkit.diffusion.samplers.one_step import draw_noise

NoiseDraw = Callable[[int, torch.Tensor], torch.Tensor]
"""(step index, latent) -> standard normal noise like the latent: the only source of randomness inside the loop."""
MIN_VARIANCE = 1e-20


def respaced_timesteps(steps: int, train_steps: int = 1000, starts: float = 1.0) -> list[int]:
    """guided-diffusion's `space_timesteps` with one section, as DiffBIR v1 / ConsisSR extend it with `starts`:
    stride (train_steps − 1)/(steps − 1)·starts, each timestep the (banker's) rounding of the running sum.
    Descending: the first step is the noisiest."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0 < starts <= 1:
        raise ValueError(f"the start fraction must be in (0, 1], got {starts}")
    if steps == 1:
        return [round((train_steps - 1) * starts)]
    stride = (train_steps - 1) / (steps - 1) * starts
    taken, current = [], 0.0
    for _ in range(steps):
        taken.append(round(current))
        current += stride
    return sorted(set(taken), reverse=True)


@dataclass(frozen=True)
class AncestralSampler:
    """DDPM ancestral steps over `timesteps` (descending original timesteps) of the ᾱ table `alphas_cumprod`."""

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor
    """float64, one value per training timestep."""

    def __post_init__(self) -> None:
        steps = list(self.timesteps)
        if not steps or steps != sorted(set(steps), reverse=True):
            raise ValueError(f"timesteps must be distinct and descending, got {steps}")
        if steps[0] >= self.alphas_cumprod.numel() or steps[-1] < 0:
            raise ValueError(f"timesteps {steps} are outside the schedule (0..{self.alphas_cumprod.numel() - 1})")

    @classmethod
    def build(cls, timesteps: Sequence[int], alphas_cumprod: torch.Tensor) -> AncestralSampler:
        return cls(tuple(int(t) for t in timesteps), alphas_cumprod.detach().to(torch.float64).cpu())

    def __len__(self) -> int:
        return len(self.timesteps)

    def alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    def add_noise(self, z: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """q(x_t | z) sample √ᾱ_t·z + √(1−ᾱ_t)·noise in float32 (the start of LR- or GAN-embedded sampling)."""
        a = self.alpha_bar(t)
        return a**0.5 * z.float() + (1 - a) ** 0.5 * noise.to(z.device).float()

    def coefficients(self, index: int) -> tuple[float, float, float, float, float]:
        """(x̂0 from x, x̂0 from ε, μ from x̂0, μ from x, σ) of step `index`, computed in float64."""
        a_t = self.alphas_cumprod[self.timesteps[index]]
        a_prev = self.alphas_cumprod[self.timesteps[index + 1]] if index + 1 < len(self) else torch.ones((), dtype=a_t.dtype)
        beta = 1 - a_t / a_prev
        variance = torch.clamp(beta * (1 - a_prev) / (1 - a_t), min=MIN_VARIANCE)
        return (
            float((1 / a_t).sqrt()),
            float((1 / a_t - 1).sqrt()),
            float(a_prev.sqrt() * beta / (1 - a_t)),
            float((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)),
            float(variance.sqrt()),
        )

    def step(self, index: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The latent after step `index`, from the latent entering it, the network's ε and standard noise."""
        x0_x, x0_eps, mean_x0, mean_x, std = self.coefficients(index)
        with fp32_region(x.device):
            x, eps = x.float(), eps.float()
            x0 = x0_x * x - x0_eps * eps
            return mean_x0 * x0 + mean_x * x + std * noise.to(x.device).float()


def sample(
    denoiser: Denoiser,
    sampler: AncestralSampler,
    x: torch.Tensor,
    cond: Conditioning,
    draw: NoiseDraw,
    progress: Callable[[str, int, int], None] | None = None,
) -> torch.Tensor:
    """Run every step from `x` (the start latent at the first timestep's noise level) to the clean latent."""
    for index, t in enumerate(sampler.timesteps):
        eps = denoiser(x, t, cond)
        x = sampler.step(index, x, eps, draw(index, x))
        if progress:
            progress("steps", index + 1, len(sampler))
    return x


def generator_draw(generator: torch.Generator | None) -> NoiseDraw:
    """Standard normal noise from one seeded generator (drawn on its device), in step order."""
    return lambda index, like: draw_noise(like, generator)


__all__ = ["AncestralSampler", "NoiseDraw", "generator_draw", "respaced_timesteps", "sample"]
