"""A plain Vision Transformer in the layout of DINO's checkpoints (facebookresearch/dino `vision_transformer.py`),
as the vision-aided GAN discriminator uses it (`dino_vitb16`: ViT-B/16, width 768, 12 blocks, 12 heads).

Tokens: a 16×16 patch convolution, a class token first, learned position embeddings (no interpolation: the
discriminator always feeds 224² images, the checkpoint's size); pre-norm blocks with multi-head attention (q·kᵀ
scaled by d^-½) and a GELU MLP of 4× width; LayerNorm eps 1e-6.  `intermediate(x, last)` returns the final
LayerNorm applied to the outputs of the last `last` blocks, as DINO's `get_intermediate_layers`.  Parameter names
are DINO's (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}`, `norm`), so `dino_vitbase16_pretrain.pth` loads strictly; the sizes are read from the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from srkit.nn.swin import Mlp

HEAD_WIDTH = 64
"""Channels per attention head in every DINO ViT (ViT-S/B: 6/12 heads); a checkpoint does not store the count."""


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp_ratio * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """DINO's ViT without a classification head; defaults: ViT-B/16 at 224²."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, patch: int = 16, image_size: int = 224) -> None:
        super().__init__()
        self.patch, self.image_size = patch, image_size
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    @property
    def grid(self) -> int:
        """Patches per side of the image size the position embeddings were trained for."""
        return self.image_size // self.patch

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images at the trained size S → (B, 1 + (S/patch)², width)."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"this ViT runs on {self.image_size}² images, got {tuple(images.shape[-2:])}")
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def intermediate(self, images: torch.Tensor, last: int) -> list[torch.Tensor]:
        """The normed token outputs of the last `last` blocks, in block order (DINO `get_intermediate_layers`)."""
        x = self.tokens(images)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - index <= last:
                outputs.append(self.norm(x))
        return outputs


def load_dino_vit(path: str | Path) -> VisionTransformer:
    """A DINO ViT checkpoint (a plain state dict, read with `weights_only=True`) with the sizes it stores, frozen,
    in eval mode; ValueError naming the file when it is not one."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
        model = VisionTransformer(width, depth, max(1, width // HEAD_WIDTH), patch, grid * patch)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, KeyError, ValueError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a DINO ViT checkpoint ({first})") from None
    return model.eval().requires_grad_(False)


__all__ = ["HEAD_WIDTH", "VisionTransformer", "load_dino_vit"]
