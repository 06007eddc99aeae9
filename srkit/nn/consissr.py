"""ConsisSR's networks as one object: text and image prompt, latent hint, ControlNet + UNet ε, VAE decode.

Official code (Gujojo/ConsisSR `model/cldm.py::ControlLDM`, `configs/model/cldm.yaml`): an ldm
LatentDiffusion on SD 2.1-base (ε-prediction, linear-in-√β schedule 0.00085→0.012 over 1000 steps, scale
factor 0.18215) with a DiffBIR-v1 ControlNet on a latent hint (`srkit/diffusion/control/ldm.py`), HPA
transformer blocks in the UNet and the ControlNet (`srkit/nn/hpa.py`) and an OpenCLIP ViT-H-14 hybrid prompt
(`srkit/nn/hpa_prompt.py`).  A network call (`apply_model`) is ControlNet(x_t, hint, t, ctx) → 13 residuals
→ UNet(x_t, t, ctx, residuals).

srkit builds the same networks from diffusers parts (UNet2DConditionModel, ControlNetModel, AutoencoderKL,
Encoder), with the real sizes as the default architecture; `srkit.convert.consissr` loads the official
checkpoint into them.  For classifier-free guidance the conditional and unconditional passes can run as one
batch (contexts stacked along dim 0, x_t and the hint embedding repeated).  What the two passes share is
computed once per image: the hint, its embedding, the image token (the text embeddings once per run).  The
ControlNet cannot be shared: it cross-attends to the context, so its residuals change with the text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from srkit.diffusion.control.ldm import LatentControlNet, LatentHintEncoder
from srkit.diffusion.latents import VAETiling, vae_decode
from srkit.nn.hpa import use_hpa_blocks
from srkit.nn.hpa_prompt import HybridPrompt


def _vit_h14() -> dict:
    import open_clip

    return open_clip.get_model_config("ViT-H-14")


@dataclass(frozen=True)
class ConsisSRSchedule:
    """The diffusion schedule the networks were trained with (ldm "linear": linear in √β)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    scale_factor: float = 0.18215
    """Latent = scale_factor · VAE posterior; the decoder gets latent / scale_factor."""

    def betas(self) -> torch.Tensor:
        """β_t in float64: linspace(√β_start, √β_end, T)²."""
        root = torch.linspace(
            math.sqrt(self.beta_start),
            math.sqrt(self.beta_end),
            self.num_train_timesteps,
            dtype=torch.float64,
        )
        return root**2

    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t in float64."""
        return torch.cumprod(1 - self.betas(), dim=0)


@dataclass(frozen=True)
class ConsisSRArchitecture:
    """Network sizes in the official (ldm) terms; defaults: the released model (SD 2.1-base, ViT-H-14)."""

    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    context_dim: int = 1024
    latent_channels: int = 4
    latent_size: int = 64
    """The HPA positional tables fix the latent to latent_size² (official: 64, a 512² image)."""
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    vae_channels: int = 128
    vae_channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_res_blocks: int = 2
    clip: Mapping = field(default_factory=_vit_h14)
    """OpenCLIP model config (ViT-H-14 by default); its embed_dim and text width must equal context_dim."""

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def unet_config(self) -> dict:
        """UNet2DConditionModel config; `attention_head_dim` holds the head counts (diffusers' SD2 naming)."""
        channels = [self.model_channels * mult for mult in self.channel_mult]
        attention = [2**level in self.attention_resolutions for level in range(self.levels)]
        return {
            "sample_size": self.latent_size,
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "block_out_channels": channels,
            "layers_per_block": self.num_res_blocks,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "attention_head_dim": [c // self.num_head_channels for c in channels],
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": True,
        }

    def controlnet_config(self) -> dict:
        unet = self.unet_config()
        keep = (
            "in_channels",
            "block_out_channels",
            "layers_per_block",
            "down_block_types",
            "attention_head_dim",
            "cross_attention_dim",
            "use_linear_projection",
        )
        return {key: unet[key] for key in keep} | {"conditioning_channels": self.latent_channels}

    def vae_config(self, scale_factor: float) -> dict:
        levels = len(self.vae_channel_mult)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [self.vae_channels * mult for mult in self.vae_channel_mult],
            "layers_per_block": self.vae_res_blocks,
            "latent_channels": self.latent_channels,
            "norm_num_groups": 32,
            "sample_size": 8 * self.latent_size,
            "scaling_factor": scale_factor,
        }

    def check(self) -> None:
        """The image token joins the text tokens, so CLIP's widths must equal the context width."""
        widths = {
            "context_dim": self.context_dim,
            "CLIP embed_dim": self.clip["embed_dim"],
            "CLIP text width": self.clip["text_cfg"]["width"],
        }
        if len(set(widths.values())) != 1:
            raise ValueError(f"ConsisSR needs equal prompt widths, got {widths}")


class ConsisSRNets(nn.Module):
    """The five ConsisSR networks and the calls a sampler makes; outputs are float32.

    Per run: `encode_text` once.  Per image (a 512² control image in [-1, 1] for the official model):
    `image_token`, `hint`, `embed_hint` once.  Per step: `eps`, with the CFG passes batched if wanted.
    """

    def __init__(
        self, architecture: ConsisSRArchitecture | None = None, schedule: ConsisSRSchedule | None = None
    ) -> None:
        super().__init__()
        self.architecture = architecture = architecture or ConsisSRArchitecture()
        self.schedule = schedule = schedule or ConsisSRSchedule()
        architecture.check()
        self.prompt = HybridPrompt(architecture.clip)
        vae_config = architecture.vae_config(schedule.scale_factor)
        self.hint_encoder = LatentHintEncoder(vae_config)
        controlnet_config = architecture.controlnet_config()
        self.controlnet = LatentControlNet(architecture.hint_block_channels, **controlnet_config)
        self.unet = UNet2DConditionModel(**architecture.unet_config())
        self.vae = AutoencoderKL(**vae_config)
        use_hpa_blocks(self.controlnet, architecture.latent_size)
        use_hpa_blocks(self.unet, architecture.latent_size)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, 77, context_dim) text embeddings."""
        return self.prompt.encode_text(prompts).float()

    def image_token(self, control: torch.Tensor) -> torch.Tensor:
        """(B, 1, context_dim) HPA image token of the control image (B, 3, H, W) in [-1, 1]."""
        return self.prompt.image_token(control.contiguous()).float()

    def hint(self, control: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """(B, 4, H/8, W/8) ControlNet hint = scale · mode of `cond_encoder` on the control image in [-1, 1].

        The image is made contiguous first, as the official `get_input` does: a channels-last batch (an NHWC
        array permuted) takes other oneDNN kernels, whose rounding a random-weight encoder amplifies (1.5e-2
        on the golden fixture's hint).
        """
        return self.hint_encoder(control.contiguous(), tiling).float()

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The ControlNet's hint embedding (its input after conv_in): independent of t and prompt."""
        return self.controlnet.embed_hint(hint.to(next(self.controlnet.parameters()).dtype))

    @staticmethod
    def context(image_token: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 1 + 77, context_dim) cross-attention context: the image token first, then the text tokens."""
        return torch.cat([image_token, text.expand(image_token.shape[0], -1, -1)], dim=1)

    def eps(
        self, x: torch.Tensor, t: int | torch.Tensor, context: torch.Tensor, hint_embedding: torch.Tensor
    ) -> torch.Tensor:
        """ε(x_t, t) of ControlNet + UNet; x, context and hint_embedding share the batch size.

        `t` is the original (not respaced) timestep, an int or a (B,) tensor.  The context must be
        [image token, text tokens] (`context`): the official model asserts its 1 + 77 tokens.
        """
        tokens = 1 + self.architecture.clip["text_cfg"]["context_length"]
        if context.shape[1] != tokens:
            raise ValueError(
                f"ConsisSR's context is [image token, text tokens] = {tokens} tokens, got {context.shape[1]}"
            )
        dtype = next(self.unet.parameters()).dtype
        x, context, hint_embedding = x.to(dtype), context.to(dtype), hint_embedding.to(dtype)
        timesteps = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        down, mid = self.controlnet(
            x, timesteps, encoder_hidden_states=context, controlnet_cond=hint_embedding, return_dict=False
        )
        eps = self.unet(
            x,
            timesteps,
            encoder_hidden_states=context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        return eps.float()

    def decode(self, latent: torch.Tensor, tiling: VAETiling | None = None) -> torch.Tensor:
        """VAE decoder output in [-1, 1] (unclamped) of a scaled latent (tiled when `tiling` says it is large)."""
        return vae_decode(self.vae, latent, tiling=tiling).float()
