"""DiffBIR-v1 ControlNet conditioning (used by ConsisSR): the hint is a VAE latent, not an image.

Official code (Gujojo/ConsisSR `model/cldm.py`, from DiffBIR v1):
- `cond_encoder` = its own copy of the SD VAE encoder + quant_conv; hint = 0.18215 · mode(posterior)
  (`apply_condition_encoder`), a (B, 4, h, w) latent at the UNet's resolution;
- `ControlNet`: copy of the UNet encoder + middle block; `input_hint_block` = eight 3×3 convs
  4→16→16→32→32→96→96→256→model_channels, SiLU between, **no stride**, added to h after
  `input_blocks[0]` (conv_in) only; 1×1 `zero_convs` on the 12 input-block outputs and `middle_block_out`
  give 13 residuals;
- `ControlledUnetModel`: h += control[12] after the middle block, output block j gets hs[11−j] +
  control[11−j] (control scales 1.0).  That is what diffusers' UNet2DConditionModel does with
  `down_block_additional_residuals` / `mid_block_additional_residual`, so the UNet stays diffusers' own.

srkit's `LatentControlNet` is diffusers' ControlNetModel with DiffBIR's stride-1 conditioning stack.  The
hint embedding depends on neither t nor the prompt, so it is computed once per image (`embed_hint`) and the
forward receives it already embedded.  The official code runs the UNet encoder under `torch.no_grad()` (it is
frozen in training); srkit leaves gradients to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers.models.autoencoders.vae import Encoder
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding, ControlNetModel
from torch import nn

from srkit.diffusion.latents import VAETiling, encode_moments


class LatentHintEmbedding(ControlNetConditioningEmbedding):
    """DiffBIR's `input_hint_block`: diffusers' conditioning embedding with every conv at stride 1.

    The hint is already a latent at the UNet's resolution, so the ×8 downsampling that a pixel-space
    ControlNet needs is dropped; the layers (3×3 convs, SiLU between) and their order are the same.
    """

    def __init__(
        self,
        embedding_channels: int,
        hint_channels: int,
        block_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> None:
        super().__init__(embedding_channels, hint_channels, block_out_channels)
        for conv in self.blocks:
            conv.stride = (1, 1)


class LatentControlNet(ControlNetModel):
    """diffusers' ControlNetModel conditioned on a pre-embedded latent hint (see `embed_hint`).

    Call it as diffusers' ControlNetModel with `controlnet_cond=embed_hint(hint)`; it returns the 12
    down-block residuals and the middle-block residual for UNet2DConditionModel.
    """

    def __init__(self, hint_block_channels: tuple[int, ...] = (16, 32, 96, 256), **config) -> None:
        super().__init__(conditioning_embedding_out_channels=hint_block_channels, **config)
        self.hint_embedding = LatentHintEmbedding(
            self.config.block_out_channels[0], self.config.conditioning_channels, hint_block_channels
        )
        self.controlnet_cond_embedding = nn.Identity()

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latent hint → (B, C0, h, w), added after conv_in; one per image, for all steps."""
        return self.hint_embedding(hint)


class LatentHintEncoder(nn.Module):
    """DiffBIR's `cond_encoder`: an SD VAE encoder + quant_conv of its own; hint = scale · posterior mode.

    Built from the AutoencoderKL config of the model's VAE (same layout, other weights).
    """

    def __init__(self, vae_config: Mapping) -> None:
        super().__init__()
        latent_channels = vae_config["latent_channels"]
        self.scale_factor = vae_config["scaling_factor"]
        self.encoder = Encoder(
            in_channels=vae_config["in_channels"],
            out_channels=latent_channels,
            down_block_types=vae_config["down_block_types"],
            block_out_channels=vae_config["block_out_channels"],
            layers_per_block=vae_config["layers_per_block"],
            norm_num_groups=vae_config["norm_num_groups"],
            double_z=True,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, image: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 4, H/8, W/8): posterior mean (= mode) times the scale factor; the tiled
        encoder (shared GroupNorm statistics) when `tiling` says the image is large."""
        image = image.to(next(self.encoder.parameters()).dtype)
        moments = encode_moments(self.encoder, self.quant_conv, image, tiling)
        return self.scale_factor * moments[:, : moments.shape[1] // 2]
