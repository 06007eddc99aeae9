"""The DDPM ᾱ (variance-preserving) formulas that score distillation needs, written once and dtype-generic.

z_t = a_t·z + b_t·ε with a_t = √ᾱ_t and b_t = √(1 − ᾱ_t), where ᾱ_t is `alphas_cumprod[t]`. The GenDR paper
writes a_t as "ᾱ_t" (notes §0): the square root is part of the formula here, not of the table.

Unlike the engines' float32 schedule, everything here runs in the dtype of the latents it is given, so the golden
tests can run in float64 and the recipe keeps the networks' autocast dtype out of the loss arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EpsModel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""An ε-predicting network called as model(z_t, t, prompt_embedding) with per-sample integer timesteps t (B,);
the embedding is None for unconditional toy networks. A diffusers UNet fits through
`lambda z, t, e: unet(z, t, encoder_hidden_states=e).sample`."""


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000
) -> torch.Tensor:
    """ᾱ of Stable Diffusion's "scaled_linear" schedule in float32, as diffusers builds it: β on a linear grid of
    √β, squared; ᾱ = cumulative product of 1 − β."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def vp_coefficients(
    alphas_cumprod: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, b_t) = (√ᾱ_t, √(1 − ᾱ_t)) in `like`'s dtype and device, shaped to broadcast over it: one value per
    sample for a (B,) tensor of timesteps, a 0-dim tensor for an int."""
    steps = torch.as_tensor(t, device=alphas_cumprod.device).long()
    alpha_bar = alphas_cumprod[steps].to(device=like.device, dtype=like.dtype)
    if alpha_bar.dim():
        alpha_bar = alpha_bar.view(-1, *([1] * (like.dim() - 1)))
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def x0_from_eps(
    noisy: torch.Tensor, eps: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float
) -> torch.Tensor:
    """The clean latent implied by a noise prediction, (z_t − b·ε̂)/a. Also GenDR's one-step generator (Eq. 2,
    with a = b = 0.5 per §4.4) and SiD-LSG's one-step sampler; no clipping (SD's scheduler sets clip_sample off)."""
    return (noisy - b * eps) / a


@dataclass(frozen=True)
class PromptGuidance:
    """The prompt conditioning of an ε-network and its classifier-free guidance scale κ.

    ε̂_κ = ε(∅) + κ·(ε(c) − ε(∅)); with κ = 1 only the conditional branch is evaluated (∅ may then be None).
    Embeddings are (tokens, dim), shared by the batch, or (batch, tokens, dim); `cond` None means an
    unconditional network.
    """

    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    scale: float = 1.0

    def with_scale(self, scale: float) -> PromptGuidance:
        return PromptGuidance(self.cond, self.uncond, scale)


def _batched(embedding: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if embedding is None or embedding.dim() == 3:
        return embedding
    return embedding.unsqueeze(0).expand(batch, *embedding.shape)


def guided_eps(
    eps_model: EpsModel, noisy: torch.Tensor, t: int | torch.Tensor, guidance: PromptGuidance
) -> torch.Tensor:
    """ε̂_κ(z_t, t). With κ ≠ 1 the unconditional and conditional branches run as one batched call [∅, c], as
    SiD-LSG does."""
    batch = noisy.shape[0]
    cond = _batched(guidance.cond, batch)
    steps = torch.as_tensor(t, device=noisy.device).long().expand(batch)
    if guidance.scale == 1.0:
        return eps_model(noisy, steps, cond)
    if cond is None or guidance.uncond is None:
        raise ValueError(
            "classifier-free guidance (scale != 1) needs both the prompt and the empty-prompt embedding"
        )
    both = eps_model(
        torch.cat([noisy, noisy]),
        torch.cat([steps, steps]),
        torch.cat([_batched(guidance.uncond, batch), cond]),
    )
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance.scale * (eps_cond - eps_uncond)


def guided_x0(
    eps_model: EpsModel,
    noisy: torch.Tensor,
    t: int | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    guidance: PromptGuidance,
) -> torch.Tensor:
    """The guided x0 estimate ("score (latent)" f_κ in GenDR Eq. 7) of an ε-network at z_t."""
    a, b = vp_coefficients(alphas_cumprod, t, noisy)
    return x0_from_eps(noisy, guided_eps(eps_model, noisy, t, guidance), a, b)


def drop_prompts(
    guidance: PromptGuidance, batch: int, probability: float, generator: torch.Generator | None = None
) -> PromptGuidance:
    """Per-sample prompts with c replaced by ∅ for a random fraction of the batch, so that a score network trained
    with κ = 1 keeps the unconditional branch that guidance needs later (SiD-LSG drops 10 %)."""
    if probability <= 0 or guidance.cond is None:
        return guidance
    if guidance.uncond is None:
        raise ValueError("prompt dropout needs the empty-prompt embedding")
    cond, uncond = _batched(guidance.cond, batch), _batched(guidance.uncond, batch)
    dropped = (
        torch.rand(batch, generator=generator, device=generator.device if generator else "cpu") < probability
    )
    dropped = dropped.to(cond.device).view(-1, *([1] * (cond.dim() - 1)))
    return PromptGuidance(torch.where(dropped, uncond, cond), guidance.uncond, guidance.scale)


__all__ = [
    "EpsModel",
    "PromptGuidance",
    "drop_prompts",
    "guided_eps",
    "guided_x0",
    "scaled_linear_alphas_cumprod",
    "vp_coefficients",
    "x0_from_eps",
]
