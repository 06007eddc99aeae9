"""SeeSR's networks for one sampler step: ε = UNet(x_t, t, text, RAM tokens, ControlNet residuals).

SeeSR (cswry/SeeSR, `pipelines/pipeline_seesr.py`) runs, per step and per latent (tile):
  1. the ControlNet on x_t with the text embeddings, the RAM image tokens and the pixel-space control image
     (the upsampled LR in [0,1]), giving 12 skip residuals and one mid residual, each × conditioning_scale;
  2. the UNet on x_t with the same text and RAM tokens, the residuals added to its skips and mid block.
Guidance is the caller's: upstream batches [uncond, cond] with negative/positive text, the SAME RAM tokens and
the same control image in both halves.  So `eps` takes a batch and returns its raw ε; text or tokens given
with batch 1 are broadcast, and a control image embedded once (`embed_control`) serves both halves and every
step.

Attention runs through diffusers' default SDPA processor (`AttnProcessor2_0`).  `unet` and `controlnet` are
plain diffusers models, so the engine's attention (xformers on CUDA), device and precision setup applies to
them as to any other; nothing here enters autocast or a CUDA-only path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from srkit.diffusion.control.diffusers import ControlFeatures, control_residuals, embed_control
from srkit.nn.image_cross_attention import image_token_kwargs


@dataclass
class SeeSRNets:
    """SeeSR's UNet (with image cross-attention) and its pixel-space ControlNet."""

    unet: UNet2DConditionModel
    controlnet: ControlNetModel

    def embed_control(self, image: torch.Tensor) -> ControlFeatures:
        """ControlNet embedding of a [0,1] control image (1|B, 3, 8h, 8w): compute once, pass to `eps`."""
        return embed_control(self.controlnet, image)

    def eps(
        self,
        latents: torch.Tensor,
        t: int | torch.Tensor,
        text_embeds: torch.Tensor,
        ram_embeds: torch.Tensor,
        control: torch.Tensor | ControlFeatures,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        """ε for latents (B,4,h,w) at timestep t, given text (1|B, 77, D), RAM tokens (1|B, N, 512) and the
        control image (1|B, 3, 8h, 8w) in [0,1] or its `embed_control` features.  No guidance."""
        weight = next(self.unet.parameters())
        batch = latents.shape[0]
        latents = latents.to(weight.device, weight.dtype)
        text = text_embeds.to(weight.device, weight.dtype).expand(batch, -1, -1)
        image_tokens = image_token_kwargs(ram_embeds.to(weight.device, weight.dtype).expand(batch, -1, -1))
        features = control if isinstance(control, ControlFeatures) else self.embed_control(control)
        residuals = control_residuals(
            self.controlnet, latents, t, text, features, conditioning_scale, image_tokens
        )
        return self.unet(
            latents,
            t,
            encoder_hidden_states=text,
            cross_attention_kwargs=image_tokens,
            down_block_additional_residuals=residuals.down,
            mid_block_additional_residual=residuals.mid,
        ).sample
