"""The hybrid prompt of ConsisSR's HPA: OpenCLIP text tokens plus one image token made from the LR image.

Official code (Gujojo/ConsisSR `ldm/modules/encoders/modules.py::OpenCLIPEmbedder`, open_clip_torch 2.23):
- text: `open_clip.tokenize` (77 tokens) → token + positional embedding → every text block but the last
  ("penultimate") → ln_final → (N, 77, width);
- image: img ∈ [-1, 1] → (img + 1)/2 → bicubic to 224² (`F.interpolate`, align_corners False, no
  antialias; skipped when already 224²) → OpenAI CLIP mean/std → `encode_image` (pooled, not
  L2-normalised) → `ft_layers_4` = LayerNorm → Linear → GELU → view(B, 1, dim) → Linear → GELU → Linear
  (zero-initialised for training) → (B, 1, dim);
- the UNet context is cat(image token, text) = (B, 78, dim).

srkit builds the CLIP model from an OpenCLIP config (ViT-H-14 for the real model; no weights are fetched,
they all live in the ConsisSR checkpoint) with the installed open_clip (3.x runs the text tower batch-first,
2.23 sequence-first: same numbers) and keeps `ft_layers_4`, with the same layer indices, as `image_proj`.
The text tower stops after the penultimate block instead of running the last one and discarding it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_IMAGE_SIZE = 224


def build_open_clip(config: Mapping) -> nn.Module:
    """An untrained open_clip CLIP from a model config (the JSON of `open_clip.get_model_config`)."""
    from open_clip.model import CLIP

    return CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=dict(config["vision_cfg"]),
        text_cfg=dict(config["text_cfg"]),
    )


def image_token_mlp(dim: int) -> nn.Sequential:
    """ConsisSR's `ft_layers_4`: pooled CLIP image embedding (B, dim) → one context token (B, 1, dim)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim),
        nn.GELU(),
        nn.Unflatten(1, (1, dim)),
        nn.Linear(dim, dim),
        nn.GELU(),
        nn.Linear(dim, dim),
    )


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) → the visual tower's input: [0, 1], bicubic to 224² (when not already),
    OpenAI CLIP mean/std."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = (images + 1) / 2
    if x.shape[-2:] != (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE):
        x = F.interpolate(x, size=(CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), mode="bicubic", align_corners=False)
    mean = x.new_tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = x.new_tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    return (x - mean) / std


class HybridPrompt(nn.Module):
    """OpenCLIP text embeddings and the HPA image token, for the cross-attention context of ConsisSR."""

    def __init__(self, clip_config: Mapping) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        self.clip = build_open_clip(clip_config)
        self.image_proj = image_token_mlp(clip_config["embed_dim"])
        self.tokenizer = SimpleTokenizer(context_length=clip_config["text_cfg"]["context_length"])

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, context_length, width): penultimate text block, then ln_final (computed once per prompt)."""
        clip = self.clip
        tokens = self.tokenizer(list(prompts)).to(clip.token_embedding.weight.device)
        x = clip.token_embedding(tokens) + clip.positional_embedding
        penultimate = len(clip.transformer.resblocks) - 2
        _, (x,) = clip.transformer.forward_intermediates(
            x, attn_mask=clip.attn_mask, indices=[penultimate], stop_early=True
        )
        return clip.ln_final(x)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled CLIP embedding (B, embed_dim) of images in [-1, 1] (B, 3, H, W); not L2-normalised."""
        return self.clip.encode_image(clip_pixels(images))

    def image_token(self, images: torch.Tensor) -> torch.Tensor:
        """The HPA image token (B, 1, embed_dim) of images in [-1, 1]: first token of the context."""
        return self.image_proj(self.image_embedding(images))

    def restore_causal_mask(self) -> None:
        """Rebuild the text tower's causal mask, a non-persistent buffer that a checkpoint does not carry."""
        length = self.clip.positional_embedding.shape[0]
        mask = torch.full(
            (length, length), float("-inf"), device=self.clip.positional_embedding.device
        ).triu_(1)
        self.clip.attn_mask = mask
