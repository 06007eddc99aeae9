"""ConsisSR's transformer block (the HPA block) inside diffusers' UNet and ControlNet.

Official code (Gujojo/ConsisSR `ldm/modules/attention_new.py::HybridDecoupleTransformer`): each attention
level of the UNet and of the ControlNet runs GroupNorm → Linear → one block → Linear → + input; the block is

    x += attn1(norm1 x)       self-attention; a learned table `position_emb` (HW, d) added to q and k of
                              every head
    x += attnT(normT x)       "Restormer" transposed attention: the d channels of a head are the tokens
    x += attn2(norm2 x, ctx)  decoupled cross-attention: text tokens ctx[:, 1:], HPA image token ctx[:, :1]
    x += ff(norm3 x)          GEGLU feed-forward

and every attention calls `xformers.ops.memory_efficient_attention` (the official code needs xformers).

srkit keeps diffusers' `Transformer2DModel` (norm, linear projections, residual) and swaps its block for
`HPATransformerBlock` (`use_hpa_blocks`).  Differences from the official code:
- attention runs through torch SDPA; xformers is an option on CUDA;
- the image branch of attn2 is `to_out_ip(v_ip)`: with one image token the softmax runs over a single key
  and is exactly 1, so attention over it returns v_ip for every query.  `to_k_ip` is loaded but has no
  effect, as in the official model;
- the map size comes from the block (fixed by `position_emb`) instead of `int(sqrt(HW))`, and a token count
  that does not match the table raises ValueError instead of failing an assert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    XFormersAttnProcessor,
)
from torch import nn


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xformers: bool) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head for (B, heads, tokens, d) tensors: torch SDPA, or xformers on CUDA."""
    if xformers:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·d) → (B, heads, N, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) → (B, N, heads·d)."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


class HPAAttnProcessor:
    """Base of the HPA processors: which attention kernel runs (SDPA, or xformers when enabled on CUDA)."""

    def __init__(self, xformers: bool = False) -> None:
        self.xformers = xformers


class PositionalSelfAttnProcessor(HPAAttnProcessor):
    """attn1: self-attention with `attn.position_emb` added to q and k (not v) of every head."""

    def __call__(
        self,
        attn: PositionalSelfAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: None = None,
        attention_mask: None = None,
    ) -> torch.Tensor:
        attn.check_tokens(hidden_states.shape[1])
        q = split_heads(attn.to_q(hidden_states), attn.heads)
        table = attn.position_emb.to(q.dtype)
        q = q + table
        k = split_heads(attn.to_k(hidden_states), attn.heads) + table
        v = split_heads(attn.to_v(hidden_states), attn.heads)
        out = merge_heads(multi_head_attention(q, k, v, self.xformers))
        return attn.to_out[1](attn.to_out[0](out))


class DecoupledCrossAttnProcessor(HPAAttnProcessor):
    """attn2: attention over the text tokens plus, per head, `to_out_ip` of the image token's value."""

    def __call__(
        self,
        attn: DecoupledCrossAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: None = None,
    ) -> torch.Tensor:
        image, text = encoder_hidden_states[:, :1], encoder_hidden_states[:, 1:]
        q = split_heads(attn.to_q(hidden_states), attn.heads)
        k = split_heads(attn.to_k(text), attn.heads)
        v = split_heads(attn.to_v(text), attn.heads)
        out = multi_head_attention(q, k, v, self.xformers)
        # one image key: its softmax weight is exactly 1, so every query receives v_ip
        out = out + attn.to_out_ip(split_heads(attn.to_v_ip(image), attn.heads))
        return attn.to_out[1](attn.to_out[0](merge_heads(out)))


class _HPAAttention(Attention):
    """A diffusers Attention that only runs its own processor class.

    Requests for diffusers' standard kernels (`set_attn_processor(AttnProcessor2_0())`,
    `XFormersAttnProcessor`, `enable_xformers_memory_efficient_attention`) become this processor with that
    kernel, so that model-wide attention switches keep working; any other processor would silently drop the
    HPA terms and is refused.
    """

    processor_class: type[HPAAttnProcessor]

    def set_processor(self, processor) -> None:
        if isinstance(processor, (AttnProcessor, AttnProcessor2_0)):
            processor = self.processor_class(xformers=False)
        elif isinstance(processor, XFormersAttnProcessor):
            processor = self.processor_class(xformers=True)
        elif not isinstance(processor, self.processor_class):
            raise TypeError(
                f"{type(self).__name__} runs only {self.processor_class.__name__} (SDPA or xformers), "
                f"not {type(processor).__name__}"
            )
        super().set_processor(processor)

    def set_use_memory_efficient_attention_xformers(self, use: bool, attention_op=None) -> None:
        if use and not torch.cuda.is_available():
            raise ValueError("xformers attention needs a CUDA device; use SDPA (the default)")
        self.set_processor(self.processor_class(xformers=use))


class PositionalSelfAttention(_HPAAttention):
    """Self-attention whose q and k get a learned (tokens, dim_head) table, the same for every head.

    The table fixes the map size: ConsisSR's block at downscale s of a 64×64 latent has (64/s)² positions.
    """

    processor_class = PositionalSelfAttnProcessor

    def __init__(self, dim: int, heads: int, dim_head: int, tokens: int) -> None:
        super().__init__(
            query_dim=dim, heads=heads, dim_head=dim_head, processor=PositionalSelfAttnProcessor()
        )
        self.position_emb = nn.Parameter(torch.zeros(tokens, dim_head))

    def check_tokens(self, tokens: int) -> None:
        expected = self.position_emb.shape[0]
        if tokens != expected:
            raise ValueError(
                f"ConsisSR's positional embedding fixes this attention level to {expected} positions, "
                f"got {tokens}: the networks run on one latent size only (64×64, a 512×512 image, for the "
                "official model); split larger latents into tiles of that size"
            )


class DecoupledCrossAttention(_HPAAttention):
    """IP-Adapter-like cross-attention over [image token, text tokens], with a per-head Linear `to_out_ip`."""

    processor_class = DecoupledCrossAttnProcessor

    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__(
            query_dim=dim,
            cross_attention_dim=context_dim,
            heads=heads,
            dim_head=dim_head,
            processor=DecoupledCrossAttnProcessor(),
        )
        self.to_k_ip = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_v_ip = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_out_ip = nn.Linear(dim_head, dim_head)


class TransposedAttention(nn.Module):
    """Restormer-style channel attention, without Restormer's L2 normalisation and temperature.

    qkv = depth-wise 3×3 conv of a 1×1 conv of the (B, C, H, W) map; per head the d channels are the tokens
    and the H·W positions their features, so the softmax is over channels with scale 1/√(H·W).  Always SDPA:
    the "head size" is H·W, beyond what fused kernels are built for, and the d×d attention is small.
    """

    def __init__(self, dim: int, heads: int, grid: int) -> None:
        super().__init__()
        self.heads = heads
        self.grid = grid
        self.to_qkv = nn.Conv2d(dim, 3 * dim, kernel_size=1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, kernel_size=3, padding=1, groups=3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = hidden_states.shape
        image = hidden_states.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
        q, k, v = (
            part.reshape(batch, self.heads, dim // self.heads, tokens)
            for part in self.qkv_dwconv(self.to_qkv(image)).chunk(3, dim=1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.reshape(batch, dim, tokens).transpose(1, 2))


class HPATransformerBlock(nn.Module):
    """attn1 (positional) → attnT (transposed) → attn2 (decoupled cross) → GEGLU FF; pre-norm, residual.

    Takes the place of diffusers' BasicTransformerBlock inside a Transformer2DModel, hence its call signature;
    masks, timestep and class labels are not part of ConsisSR and are ignored.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, grid: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = PositionalSelfAttention(dim, heads, dim_head, tokens=grid * grid)
        self.normT = nn.LayerNorm(dim)
        self.attnT = TransposedAttention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = DecoupledCrossAttention(dim, context_dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        *unused_args,
        **unused_kwargs,
    ) -> torch.Tensor:
        x = hidden_states
        x = x + self.attn1(self.norm1(x))
        x = x + self.attnT(self.normT(x))
        x = x + self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))


def use_hpa_blocks(model: nn.Module, latent_size: int) -> None:
    """Swap every transformer block of a diffusers UNet2DConditionModel or ControlNetModel for an HPA block.

    The block at downscale 2^level gets a positional table for a (latent_size / 2^level)² map; the middle
    block sits at the deepest level, up block j at level (levels − 1 − j).
    """
    levels = len(model.down_blocks)
    placed = [(block, level) for level, block in enumerate(model.down_blocks)]
    placed.append((model.mid_block, levels - 1))
    placed += [(block, levels - 1 - j) for j, block in enumerate(getattr(model, "up_blocks", ()))]
    for block, level in placed:
        for transformer in getattr(block, "attentions", ()):
            config = transformer.config
            transformer.transformer_blocks = nn.ModuleList(
                HPATransformerBlock(
                    dim=config.num_attention_heads * config.attention_head_dim,
                    heads=config.num_attention_heads,
                    dim_head=config.attention_head_dim,
                    context_dim=config.cross_attention_dim,
                    grid=latent_size // 2**level,
                )
                for _ in transformer.transformer_blocks
            )
