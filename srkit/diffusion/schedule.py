"""Noise-schedule maths apart from any model (as diffusers keeps schedulers apart from pipelines): ᾱ tables,
x0/ε/v conversions and forward noising, in float32 whatever the networks run in.

x0 is computed directly from the ᾱ table (`NoiseSchedule.predict_x0`), not through `DDPMScheduler.step`, whose
behaviour at t=999 depends on the diffusers version and the timestep spacing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from srkit.diffusion.runtime import fp32_region

SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}
"""SD-Turbo's published `scheduler_config.json` (SD 2.1's DDPM betas): what a model built without the hub
(benchmarks, tests) pairs with its random weights so that ᾱ and the x0 step are the real ones."""

Timestep = int | torch.Tensor
"""One timestep for the whole batch, or one per sample (training draws one t per sample)."""


class ScheduleError(ValueError):
    """A scheduler config srkit cannot honour (e.g. dynamic thresholding)."""


@dataclass(frozen=True)
class NoiseSchedule:
    """The scheduler facts a sampler needs: ᾱ per training timestep and what the UNet predicts.

    Built from a diffusers scheduler config exactly as `DDPMScheduler` would read it (its defaults fill missing
    keys, e.g. `clip_sample=True`), so that a config asking for clipping is honoured.
    """

    alphas_cumprod: torch.Tensor
    """float32, CPU, one entry per training timestep."""
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_config(cls, config: Mapping) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(dict(config))
        if scheduler.config.thresholding:
            raise ScheduleError("the scheduler config asks for dynamic thresholding, which srkit does not implement")
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32).clone(),
            prediction_type=scheduler.config.prediction_type,
            clip_sample=bool(scheduler.config.clip_sample),
            clip_sample_range=float(scheduler.config.clip_sample_range),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, t: Timestep) -> torch.Tensor:
        """ᾱ_t in float32: 0-dim for an int t, (B,) for per-sample timesteps."""
        steps = torch.as_tensor(t).long().cpu()
        if steps.numel() and not (0 <= int(steps.min()) and int(steps.max()) < self.num_train_timesteps):
            raise ValueError(f"timestep {t} is outside the schedule (0..{self.num_train_timesteps - 1})")
        return self.alphas_cumprod[steps]

    def _alpha_bar_like(self, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t on `like`'s device, shaped to broadcast over its non-batch axes."""
        a = self.alpha_bar(t).to(like.device)
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def predict_x0(self, sample: torch.Tensor, model_output: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The clean latent predicted at timestep t, in float32 whatever the inputs' dtype.

        For ε-prediction x0 = (z − √(1−ᾱ_t)·ε)/√ᾱ_t, which is exactly what one DDPM step from t to "before the
        first step" (ᾱ_prev = 1) returns, minus its 1e-10·noise term.
        """
        with fp32_region(sample.device):
            a = self._alpha_bar_like(t, sample)
            b = 1 - a
            z, out = sample.float(), model_output.float()
            if self.prediction_type == "epsilon":
                x0 = (z - b.sqrt() * out) / a.sqrt()
            elif self.prediction_type == "v_prediction":
                x0 = a.sqrt() * z - b.sqrt() * out
            elif self.prediction_type == "sample":
                x0 = out
            else:
                raise ScheduleError(f"unknown prediction type '{self.prediction_type}' in the scheduler config")
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            return x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise in float32."""
        with fp32_region(x0.device):
            a = self._alpha_bar_like(t, x0)
            return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


__all__ = ["SD_TURBO_SCHEDULER", "NoiseSchedule", "ScheduleError", "Timestep"]
