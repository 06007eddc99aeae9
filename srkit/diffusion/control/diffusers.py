"""Pixel-space ControlNet conditioning (diffusers `ControlNetModel`, as in SeeSR), the hint embedded once.

A diffusers ControlNet sees its control image only through `controlnet_cond_embedding`, a small conv stack
that maps [0,1] pixels (B,3,8h,8w) to latent-resolution features (B,C,h,w) added to `conv_in(latents)`.  The
features depend neither on the timestep nor on the text, so a sampler embeds each image once and reuses the
result for every step and both CFG halves (a batch-1 embedding broadcasts over the batch).  With latent tiles,
embed each tile's crop: zero padding makes the embedding of a crop differ from the crop of an embedding at its
borders.  `control_residuals` is `ControlNetModel.forward` for the options SeeSR uses (`unsupported_options`
names the others), fed with the embedded hint instead of the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel

UNSUPPORTED_OPTIONS = ("class_embed_type", "addition_embed_type", "global_pool_conditions")
"""ControlNet config options that `control_residuals` does not implement (all unset in SeeSR)."""


def unsupported_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a ControlNet config that `control_residuals` would ignore; empty for SeeSR's."""
    found = {key: config[key] for key in UNSUPPORTED_OPTIONS if config.get(key)}
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        found["controlnet_conditioning_channel_order"] = config["controlnet_conditioning_channel_order"]
    return found


@dataclass(frozen=True)
class ControlFeatures:
    """A control image after the ControlNet's conditioning embedding: (1 or B, C, h, w)."""

    features: torch.Tensor


@dataclass(frozen=True)
class ControlResiduals:
    """What the ControlNet adds to the UNet: a residual per UNet skip connection and one for the mid block."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor


def embed_control(controlnet: ControlNetModel, image: torch.Tensor) -> ControlFeatures:
    """Embed a [0,1] control image (B,3,8h,8w) as it is: SeeSR does not normalise it."""
    weight = controlnet.controlnet_cond_embedding.conv_in.weight
    return ControlFeatures(controlnet.controlnet_cond_embedding(image.to(weight.device, weight.dtype)))


def control_residuals(
    controlnet: ControlNetModel,
    latents: torch.Tensor,
    timestep: int | torch.Tensor,
    text_embeds: torch.Tensor,
    control: ControlFeatures,
    conditioning_scale: float = 1.0,
    cross_attention_kwargs: dict[str, Any] | None = None,
) -> ControlResiduals:
    """The ControlNet's residuals for a batch of latents: its encoder run on conv_in(x) + the embedded hint.

    `cross_attention_kwargs` reaches every attention block (SeeSR's image tokens travel in it).  The residuals
    are the 1×1 "zero convolutions" of every skip feature and of the mid-block output, × `conditioning_scale`.
    """
    timesteps = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
    temb = controlnet.time_embedding(controlnet.time_proj(timesteps).to(latents.dtype))
    text = {"encoder_hidden_states": text_embeds, "cross_attention_kwargs": cross_attention_kwargs}
    hidden = controlnet.conv_in(latents) + control.features
    skips = [hidden]
    for block in controlnet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, block_skips = block(hidden, temb, **text)
        else:
            hidden, block_skips = block(hidden, temb)
        skips.extend(block_skips)
    hidden = controlnet.mid_block(hidden, temb, **text)
    zero_convs = controlnet.controlnet_down_blocks
    down = tuple(conv(skip) * conditioning_scale for conv, skip in zip(zero_convs, skips))
    return ControlResiduals(down=down, mid=controlnet.controlnet_mid_block(hidden) * conditioning_scale)
