"""Tiled VAE encoder/decoder whose GroupNorms see statistics shared by all tiles.

Why: the SD VAE at 4K output needs tens of GB for its full-resolution feature maps.  Running it on tiles bounds
the working set, but each GroupNorm would then normalise every tile by its own statistics and tiles would differ
in brightness and contrast.  Here all tiles advance through the network in lockstep and stop before every
GroupNorm; the statistics of that GroupNorm are pooled over all tiles, and every tile is normalised with the same
numbers.  Between stops a tile waits on the `store` device (the CPU when computing on CUDA), so the accelerator
holds one tile at a time.

How (written for srkit from the description of the method, not from any existing implementation):
- The image is cut into a grid of *cores* that partition it exactly; each tile is its core plus `pad` pixels of
  context on every side (clipped at the image border).  Core and context boundaries are multiples of the
  network's total down-sampling factor, so every resolution level sees an integer grid.
- After each step each tile reports, per channel, the mean and the sum of squared deviations over its *core*
  only.  Pooling these (Chan's parallel formula, float64) gives the exact mean/variance of the whole feature
  map, so with enough context (`pad` ≥ the receptive field) and no attention the tiled result equals the untiled
  one; the only approximation left is attention (mid block), which sees one tile at a time.
- Valid cores are written into the output; there is no blending, since cores do not overlap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class VAETiling:
    """When and how to tile the VAE; tile sizes as in the one-step SR repos (0 = never tile that half)."""

    encoder_tile: int = 1024
    """Encoder core size in image pixels; tiling starts above encoder_tile + 2·encoder_pad."""
    encoder_pad: int = 32
    decoder_tile: int = 224
    """Decoder core size in latent pixels; tiling starts above decoder_tile + 2·decoder_pad."""
    decoder_pad: int = 11
    offload: bool = True
    """Park waiting tiles on the CPU when computing on an accelerator (no effect on CPU runs)."""

    def use_encoder_tiles(self, image: torch.Tensor) -> bool:
        return self.encoder_tile > 0 and max(image.shape[-2:]) > self.encoder_tile + 2 * self.encoder_pad

    def use_decoder_tiles(self, latents: torch.Tensor) -> bool:
        return self.decoder_tile > 0 and max(latents.shape[-2:]) > self.decoder_tile + 2 * self.decoder_pad


# ---------------------------------------------------------------------------------------------------------------
# Tile geometry


def split_axis(length: int, tile: int, pad: int, align: int) -> list[tuple[int, int, int, int]]:
    """(start, end, core_start, core_end) per tile along one axis, all multiples of `align` (but `length`).

    The cores partition [0, length) into ceil((length − 2·pad)/tile) nearly equal parts.
    """
    count = max(1, math.ceil((length - 2 * pad) / tile))
    bounds = [0] + [round(k * length / count / align) * align for k in range(1, count)] + [length]
    pad = math.ceil(pad / align) * align
    return [(max(0, a - pad), min(length, b + pad), a, b) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class _Tile:
    """One tile's geometry (in input coordinates) and its tensors while it waits between GroupNorms."""

    y0: int
    y1: int
    x0: int
    x1: int
    core: tuple[int, int, int, int]
    """(top, bottom, left, right) of the core, in input coordinates."""
    x: torch.Tensor
    residual: torch.Tensor | None = None
    stats: tuple[torch.Tensor, torch.Tensor, int] | None = None
    """Per-channel (mean, M2) over the core of `x`, float64 on the CPU, and the core's pixel count."""

    def core_slices(self, scale: float) -> tuple[slice, slice]:
        top, bottom, left, right = (round(v * scale) for v in self.core)
        y0, x0 = round(self.y0 * scale), round(self.x0 * scale)
        return slice(top - y0, bottom - y0), slice(left - x0, right - x0)


@dataclass
class _LockstepRun:
    """All tiles of one image, advanced step by step; `scale` maps input coordinates to the current level."""

    tiles: list[_Tile]
    device: torch.device
    store: torch.device
    size: tuple[int, int]
    scale: float = 1.0
    _groups_cache: dict = field(default_factory=dict)

    @classmethod
    def plan(cls, image: torch.Tensor, tile: int, pad: int, align: int, offload: bool) -> _LockstepRun:
        height, width = image.shape[-2:]
        if height % align or width % align:
            raise ValueError(f"tiled VAE needs sides that are multiples of {align}; got {height}x{width}")
        store = torch.device("cpu") if offload else image.device
        tiles = [
            _Tile(y0, y1, x0, x1, (cy0, cy1, cx0, cx1), image[:, :, y0:y1, x0:x1].to(store))
            for y0, y1, cy0, cy1 in split_axis(height, tile, pad, align)
            for x0, x1, cx0, cx1 in split_axis(width, tile, pad, align)
        ]
        return cls(tiles, image.device, store, (height, width))

    def map(
        self,
        fn: Callable[..., torch.Tensor],
        norm: nn.GroupNorm | None = None,
        use_residual: bool = False,
        resample: float = 1.0,
    ) -> None:
        """Replace every tile's activation by fn(activation) (or fn(normalised, residual)), one tile on the device.

        With `norm`, the activation is first normalised with statistics pooled over all tiles.  `resample` is the
        resolution change `fn` makes (1/2 for a down-sampler, 2 for an up-sampler).
        """
        pooled = self._pooled_stats(norm.num_groups) if norm is not None else None
        self.scale *= resample
        for tile in self.tiles:
            x = tile.x.to(self.device, non_blocking=True)
            if norm is not None:
                x = _group_norm_with(x, norm, *pooled)
            if use_residual:
                out = fn(x, tile.residual.to(self.device, non_blocking=True))
                tile.residual = None
            else:
                out = fn(x)
            tile.stats = self._core_stats(tile, out)
            tile.x = out.to(self.store, non_blocking=True)

    def keep_residual(self) -> None:
        for tile in self.tiles:
            tile.residual = tile.x

    def attention(self, attn: nn.Module) -> None:
        """Self-attention within each tile, its input GroupNorm using the pooled statistics."""
        pooled = self._pooled_stats(attn.group_norm.num_groups)
        original = attn.group_norm
        attn.group_norm = _PooledGroupNorm(original, *pooled)
        try:
            self.map(lambda x: attn(x))
        finally:
            attn.group_norm = original

    def assemble(self) -> torch.Tensor:
        """The cores of all tiles written into one output tensor on the store device."""
        first = self.tiles[0].x
        height, width = (round(v * self.scale) for v in self.size)
        out = torch.empty((first.shape[0], first.shape[1], height, width), dtype=first.dtype, device=self.store)
        for tile in self.tiles:
            rows, cols = tile.core_slices(self.scale)
            top, left = round(tile.core[0] * self.scale), round(tile.core[2] * self.scale)
            piece = tile.x[:, :, rows, cols]
            out[:, :, top : top + piece.shape[2], left : left + piece.shape[3]] = piece
        return out

    def _core_stats(self, tile: _Tile, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        rows, cols = tile.core_slices(self.scale)
        core = x[:, :, rows, cols].float()
        count = core.shape[2] * core.shape[3]
        mean = core.mean(dim=(2, 3))
        m2 = (core - mean[:, :, None, None]).square().sum(dim=(2, 3))
        return mean.double().cpu(), m2.double().cpu(), count

    def _pooled_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance per (batch, group) over all cores, from the per-tile per-channel stats."""
        means = torch.stack([t.stats[0] for t in self.tiles])  # (T, B, C)
        m2s = torch.stack([t.stats[1] for t in self.tiles])
        counts = torch.tensor([t.stats[2] for t in self.tiles], dtype=torch.float64)[:, None, None]
        tiles, batch, channels = means.shape
        means = means.view(tiles, batch, groups, channels // groups)
        m2s = m2s.view(tiles, batch, groups, channels // groups)
        counts = counts[..., None]
        total = counts.sum() * (channels // groups)
        mean = (means * counts).sum(dim=(0, 3)) / total
        m2 = (m2s + counts * (means - mean[None, :, :, None]).square()).sum(dim=(0, 3))
        return mean, m2 / total


def _group_norm_with(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of `x` (B, C, ...) with given per-(batch, group) mean/variance, computed in float32."""
    batch, channels = x.shape[:2]
    groups = norm.num_groups
    shape = (batch, groups, channels // groups, -1)
    mean = mean.to(x.device, torch.float32).view(batch, groups, 1, 1)
    inv = torch.rsqrt(var.to(x.device, torch.float32) + norm.eps).view(batch, groups, 1, 1)
    y = ((x.float().reshape(shape) - mean) * inv).reshape(x.shape)
    if norm.affine:
        extra = (1,) * (x.dim() - 2)
        y = y * norm.weight.float().view(1, channels, *extra) + norm.bias.float().view(1, channels, *extra)
    return y.to(x.dtype)


class _PooledGroupNorm(nn.Module):
    """Stands in for an attention block's GroupNorm while that block runs on one tile."""

    def __init__(self, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
        super().__init__()
        self.norm, self.mean, self.var = norm, mean, var
        self.num_groups = norm.num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _group_norm_with(x, self.norm, self.mean, self.var)


# ---------------------------------------------------------------------------------------------------------------
# Walking diffusers' Encoder / Decoder in lockstep


def _resnet(run: _LockstepRun, block: nn.Module) -> None:
    """diffusers ResnetBlock2D without time embedding: norm1-act-conv1, norm2-act-conv2, + shortcut."""
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None:
        raise NotImplementedError("tiled VAE supports resnet blocks without resampling or time embedding")
    act = block.nonlinearity
    run.keep_residual()
    run.map(lambda h: block.conv1(act(h)), norm=block.norm1)

    def second_half(h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = block.conv2(block.dropout(act(h)))
        if block.conv_shortcut is not None:
            residual = block.conv_shortcut(residual)
        return (residual + h) / block.output_scale_factor

    run.map(second_half, norm=block.norm2, use_residual=True)


def _mid_block(run: _LockstepRun, mid: nn.Module) -> None:
    _resnet(run, mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            if attn.group_norm is None or getattr(attn, "spatial_norm", None) is not None:
                raise NotImplementedError("tiled VAE supports mid-block attention with a GroupNorm input")
            run.attention(attn)
        _resnet(run, resnet)


def _output_head(run: _LockstepRun, coder: nn.Module) -> None:
    if not isinstance(coder.conv_norm_out, nn.GroupNorm):
        raise NotImplementedError("tiled VAE supports decoders with a GroupNorm output head only")
    run.map(lambda h: coder.conv_out(coder.conv_act(h)), norm=coder.conv_norm_out)


def tiled_encode(encoder: nn.Module, image: torch.Tensor, tiling: VAETiling) -> torch.Tensor:
    """diffusers `Encoder.forward` on tiles (output before `quant_conv`)."""
    factor = 2 ** sum(len(block.downsamplers or []) for block in encoder.down_blocks)
    run = _LockstepRun.plan(image, tiling.encoder_tile, tiling.encoder_pad, factor, tiling.offload)
    run.map(encoder.conv_in)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            _resnet(run, resnet)
        for down in block.downsamplers or []:
            run.map(down, resample=0.5)
    _mid_block(run, encoder.mid_block)
    _output_head(run, encoder)
    return run.assemble().to(image.device)


def tiled_decode(decoder: nn.Module, latents: torch.Tensor, tiling: VAETiling) -> torch.Tensor:
    """diffusers `Decoder.forward` on tiles (input after `post_quant_conv`)."""
    run = _LockstepRun.plan(latents, tiling.decoder_tile, tiling.decoder_pad, 1, tiling.offload)
    run.map(decoder.conv_in)
    _mid_block(run, decoder.mid_block)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            _resnet(run, resnet)
        for up in block.upsamplers or []:
            run.map(up, resample=2.0)
    _output_head(run, decoder)
    return run.assemble().to(latents.device)


__all__ = ["VAETiling", "split_axis", "tiled_decode", "tiled_encode"]
