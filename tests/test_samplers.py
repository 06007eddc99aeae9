"""The multi-step sampler core: guided-diffusion respacing, and one ancestral DDPM step that equals diffusers'
`DDPMScheduler.step` (SeeSR's sampler) and guided-diffusion's spaced posterior (ConsisSR's)."""

from __future__ import annotations

import pytest
import torch

from srkit.diffusion.samplers.ancestral import AncestralSampler, respaced_timesteps, sample
from srkit.diffusion.schedule import NoiseSchedule

SD2 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
       "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1}  # fmt: skip


def test_respacing_follows_guided_diffusion() -> None:
    assert respaced_timesteps(4) == [999, 666, 333, 0]
    assert respaced_timesteps(4, starts=0.6) == [599, 400, 200, 0]
    fifty = respaced_timesteps(50)
    assert fifty[0] == 999 and fifty[-1] == 0 and len(fifty) == 50 and fifty[-3:] == [41, 20, 0]
    assert respaced_timesteps(10, starts=0.6)[0] == 599
    with pytest.raises(ValueError):
        respaced_timesteps(0)


def test_ancestral_step_equals_diffusers_ddpm_step() -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(SD2)
    scheduler.set_timesteps(4)
    schedule = NoiseSchedule.from_config(SD2)
    sampler = AncestralSampler.build(scheduler.timesteps.tolist(), schedule.alphas_cumprod)
    assert list(sampler.timesteps) == [751, 501, 251, 1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    for index, t in enumerate(scheduler.timesteps):
        eps, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        expected = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(index)).prev_sample
        drawn = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(index)) if t > 0 else noise
        ours = sampler.step(index, x, eps, drawn)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_spaced_posterior_by_hand_and_the_loop() -> None:
    """One step from t to t′ of the respaced chain, written out; the loop calls the denoiser once per step."""
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    sampler = AncestralSampler.build(respaced_timesteps(3), alphas)
    a_t, a_prev = alphas[999], alphas[500]  # round(499.5) = 500 (half to even)
    beta = 1 - a_t / a_prev
    x, eps, noise = torch.full((1,), 2.0), torch.full((1,), 0.5), torch.full((1,), -1.0)
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x.double()
    expected = mean + (beta * (1 - a_prev) / (1 - a_t)).sqrt() * noise.double()
    torch.testing.assert_close(sampler.step(0, x, eps, noise), expected.float())
    seen: list[int] = []

    def denoiser(latent, t, cond):
        seen.append(t)
        return torch.zeros_like(latent)

    reports: list = []
    sample(denoiser, sampler, x, None, lambda i, like: torch.zeros_like(like), lambda *r: reports.append(r))
    assert seen == [999, 500, 0] and reports[-1] == ("steps", 3, 3)
