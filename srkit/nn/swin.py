"""Swin Transformer image encoder (Liu et al., 2021) with the parameter names of the official implementation.

Written for RAM's visual encoder, so it returns what RAM consumes: the final tokens with their mean
prepended (B, 1 + H·W/32², C_last).  Parameter names match Microsoft's `swin_transformer.py`, which RAM
copies, so its checkpoints load without renames; the two derived buffers of that code
(`relative_position_index`, `attn_mask`) are rebuilt here from the geometry and kept out of the state dict.

Numerics follow the reference order of operations (q scaled before q·kᵀ, relative bias then shift mask added
to the scores, masked pairs at −100 rather than −inf) so that fp32 outputs agree to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

SHIFT_MASK_VALUE = -100.0
"""Score added between tokens of a shifted window that come from different image regions (reference value)."""


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2w−1)² bias table: (Δy + w−1)·(2w−1) + (Δx + w−1), Δ = query − key position."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return delta[0] * (2 * window - 1) + delta[1]


def windows_of(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, w², C): windows row-major over the map, tokens row-major inside a window."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def map_of(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `windows_of`: (B·nW, w², C) → (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w², w²) additive mask of a cyclically shifted map: pairs from different regions get −100.

    After rolling by −shift, the last window row/column mixes tokens from opposite image borders; the map is
    cut into 3×3 regions by [0, −w), [−w, −shift), [−shift, end) and attention is kept inside a region.
    """
    labels = torch.zeros(1, height, width, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for index, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        labels[:, rows, cols, :] = index
    region = windows_of(labels, window).squeeze(-1)
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, SHIFT_MASK_VALUE)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a learned relative-position bias per head."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch_windows, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch_windows, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.position_index].permute(2, 0, 1)
        scores = scores + bias.unsqueeze(0)
        if mask is not None:
            per_image = scores.view(-1, mask.shape[0], self.num_heads, tokens, tokens) + mask[None, :, None]
            scores = per_image.view(batch_windows, self.num_heads, tokens, tokens)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch_windows, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm block: x += W-MSA(LN(x)) on (shifted) windows; x += MLP(LN(x))."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # one window covers the map: nothing to shift across
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("shift_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        size = self.resolution
        h = self.norm1(x).view(batch, size, size, dim)
        if self.shift:
            h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        h = map_of(self.attn(windows_of(h, self.window), self.shift_mask), self.window, size, size)
        if self.shift:
            h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(batch, size * size, dim)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Halve the resolution: concatenate 2×2 neighbourhoods (row offset first), LN(4C), Linear(4C → 2C)."""

    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        x = x.view(batch, self.resolution, self.resolution, dim)
        quads = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
        return self.reduction(self.norm(torch.cat(quads, dim=-1).view(batch, -1, 4 * dim)))


class SwinStage(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        merge: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, window // 2 if j % 2 else 0, mlp_ratio)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Square-input Swin encoder, no classifier; `forward` returns [mean token; tokens] (B, 1+L, C_last)."""

    def __init__(
        self,
        image_size: int,
        embed_dim: int,
        depths: list[int],
        num_heads: list[int],
        window: int,
        patch: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"Swin config: {len(depths)} stage depths but {len(num_heads)} head counts")
        resolution = image_size // patch
        self.patch_embed = PatchEmbed(patch, embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(
                embed_dim * 2**i,
                resolution // 2**i,
                depth,
                heads,
                window,
                mlp_ratio,
                merge=i < len(depths) - 1,
            )
            for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True))
        )
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """Resample a (s², heads) bias table to (2·window−1)² rows as the official loader does (BEiT's recipe).

    Why not plain bicubic: the source offsets are placed on a geometric progression (ratio q found by
    bisection so that the outermost offset reaches the target's), which keeps the near-diagonal biases nearly
    unchanged while stretching the far ones; a bicubic spline through those points is read on the integer
    target grid.  SciPy's `RectBivariateSpline(kx=ky=3, s=0)` reproduces the removed
    `interp2d(kind='cubic')` used upstream; SciPy is imported only when a table needs resampling.
    """
    source = math.isqrt(table.shape[0])
    target = 2 * window - 1
    if source == target:
        return table
    from scipy.interpolate import RectBivariateSpline

    half, reach = source // 2, target // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio**half) / (1.0 - ratio) > reach:
            right = ratio
        else:
            left = ratio
    offsets = np.cumsum([1.0] + [ratio ** (i + 1) for i in range(half - 1)])
    grid = np.concatenate([-offsets[::-1], [0.0], offsets])
    points = np.arange(-reach, reach + 0.1, 1.0)
    columns = []
    for head in table.float().T:
        spline = RectBivariateSpline(grid, grid, head.reshape(source, source).numpy(), kx=3, ky=3, s=0)
        columns.append(torch.from_numpy(spline(points, points)).float().reshape(-1))
    return torch.stack(columns, dim=1).to(table.dtype)
