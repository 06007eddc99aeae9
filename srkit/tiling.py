"""One tiler for pixel and latent space: tile grids, blending weights, and OOM back-off.

Why tiles at all: memory.  Why blending: a network sees less context at a tile's border, so hard-edged tiles
(Real-ESRGAN's tiler) leave seams on flat regions and gradients.  Here neighbouring tiles overlap and are
blended with weights that are zero near each tile's inner borders, so every output pixel comes from tile
interiors.  The grid is a Cartesian product of per-axis plans, and every weight is a product of per-axis
weights, so normalising each axis to sum to one normalises the 2-D blend exactly, with no weight-sum
accumulator the size of the output.  Input and output stay on the CPU; only tiles move to the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

TileFn = Callable[[torch.Tensor], torch.Tensor]
WeightFn = Callable[[int, int, int], torch.Tensor]
"""(tile length, overlap with the previous tile, overlap with the next tile; 0 = none) -> 1-D weights."""


def plan_axis(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: the fewest tiles with at least `overlap` shared, spread evenly.

    Even spreading (rather than full tiles plus one thin remainder) keeps every overlap about equal, so no tile
    is blended over a sliver.
    """
    if tile >= length:
        return [0]
    if overlap >= tile:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    return [round(i * stride) for i in range(count)]


def feather_weights(length: int, before: int, after: int) -> torch.Tensor:
    """Raised-cosine ramps over the central half of each shared overlap; flat where there is no neighbour.

    The outer quarter of an overlap gets weight 0, so border-affected pixels never reach the output.
    """
    pos = torch.arange(length, dtype=torch.float64) + 0.5

    def ramp(distance: torch.Tensor, overlap: int) -> torch.Tensor:
        if overlap <= 0:
            return torch.ones_like(distance)
        margin = overlap / 4
        r = ((distance - margin) / (overlap - 2 * margin)).clamp(0, 1)
        return 0.5 - 0.5 * torch.cos(math.pi * r)

    return ramp(pos, before) * ramp(length - pos, after)


def gaussian_weights(length: int, before: int, after: int, var: float = 0.01) -> torch.Tensor:
    """The Gaussian tile weights of the diffusion-SR repos (relative variance 0.01, centred on the tile)."""
    midpoint = (length - 1) / 2
    x = torch.arange(length, dtype=torch.float64)
    return torch.exp(-((x - midpoint) ** 2) / (length * length) / (2 * var)) / math.sqrt(2 * math.pi * var)


def axis_weights(starts: Sequence[int], tile: int, length: int, weight_fn: WeightFn) -> list[torch.Tensor]:
    """Per-tile weights along one axis, normalised so that they sum to one at every position."""
    total = torch.zeros(length, dtype=torch.float64)
    raw = []
    for index, start in enumerate(starts):
        size = min(tile, length - start)
        before = starts[index - 1] + tile - start if index > 0 else 0
        after = start + size - starts[index + 1] if index + 1 < len(starts) else 0
        w = weight_fn(size, before, after)
        raw.append(w)
        total[start : start + size] += w
    if (total <= 0).any():
        raise ValueError("tile weights leave positions uncovered; increase the overlap")
    return [w / total[s : s + w.numel()] for w, s in zip(raw, starts)]


@dataclass(frozen=True)
class TileGrid:
    """Tile starts in input coordinates and the blending weights in output coordinates."""

    ys: list[int]
    xs: list[int]
    tile: int
    scale: int
    wy: list[torch.Tensor]
    wx: list[torch.Tensor]

    @classmethod
    def plan(
        cls, height: int, width: int, tile: int, overlap: int, scale: int = 1, weight_fn: WeightFn = feather_weights
    ) -> TileGrid:
        ys, xs = plan_axis(height, tile, overlap), plan_axis(width, tile, overlap)
        out_tile = tile * scale
        wy = axis_weights([y * scale for y in ys], out_tile, height * scale, weight_fn)
        wx = axis_weights([x * scale for x in xs], out_tile, width * scale, weight_fn)
        return cls(ys, xs, tile, scale, wy, wx)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def run_tiled(
    fn: TileFn,
    image: torch.Tensor,
    scale: int,
    tile: int | None,
    overlap: int,
    *,
    weight_fn: WeightFn = feather_weights,
    min_tile: int = 32,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` (B,C,h,w -> B,C',h*scale,w*scale) to `image` tile by tile and blend the results.

    `image` and the result live where `image` lives (the CPU); `fn` moves each tile to its device.  When a tile
    runs out of memory, that tile and every later one are processed as sub-tiled pieces of half the size, so the
    work already done is kept ("halve and resume").
    """
    _, _, height, width = image.shape
    if tile is None or (height <= tile and width <= tile):
        return _call_with_backoff(fn, image, scale, tile or max(height, width), overlap, weight_fn, min_tile)
    grid = TileGrid.plan(height, width, tile, overlap, scale, weight_fn)
    out: torch.Tensor | None = None
    inner = tile
    done = 0
    for iy, y in enumerate(grid.ys):
        for ix, x in enumerate(grid.xs):
            piece = image[:, :, y : y + tile, x : x + tile]
            if inner >= tile:
                try:
                    result = fn(piece)
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    _free_cuda_cache()
                    inner = _halve(tile, min_tile, exc)
                    result = run_tiled(fn, piece, scale, inner, overlap, weight_fn=weight_fn, min_tile=min_tile)
            else:
                result = run_tiled(fn, piece, scale, inner, overlap, weight_fn=weight_fn, min_tile=min_tile)
            result = result.to(image.device, torch.float32)
            if out is None:
                out = torch.zeros(
                    (image.shape[0], result.shape[1], height * scale, width * scale), dtype=torch.float32
                )
            weight = (grid.wy[iy][:, None] * grid.wx[ix][None, :]).to(torch.float32)
            oy, ox = y * scale, x * scale
            out[:, :, oy : oy + result.shape[2], ox : ox + result.shape[3]] += result * weight
            done += 1
            if on_tile:
                on_tile(done, len(grid))
    assert out is not None
    return out


def _call_with_backoff(fn, image, scale, tile, overlap, weight_fn, min_tile) -> torch.Tensor:
    try:
        return fn(image)
    except Exception as exc:
        if not is_oom(exc):
            raise
        _free_cuda_cache()
        return run_tiled(fn, image, scale, _halve(tile, min_tile, exc), overlap, weight_fn=weight_fn, min_tile=min_tile)


def _halve(tile: int, min_tile: int, exc: BaseException) -> int:
    half = tile // 2
    if half < min_tile:
        raise MemoryError(f"out of memory even with {tile}-pixel tiles; free device memory or use --device cpu") from exc
    return half


def _free_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Latent tiling as the one-step diffusion SR repos (S3Diff, OSEDiff) do it.  Their tile positions and weights are
# part of their outputs, so they are reproduced exactly rather than replaced by the even grid above.


def plan_axis_snapped(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts k·(tile − overlap) for as many tiles as reach the end, the last one snapped to length − tile."""
    if tile >= length:
        return [0]
    if overlap >= tile:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
    stride = tile - overlap
    count = 1
    while (count - 1) * stride + tile < length:
        count += 1
    return [k * stride for k in range(count - 1)] + [length - tile]


def gaussian_weights_rows(length: int, before: int, after: int, var: float = 0.01) -> torch.Tensor:
    """`gaussian_weights` centred at length/2 instead of (length−1)/2: the upstream code's quirk for rows."""
    x = torch.arange(length, dtype=torch.float64)
    return torch.exp(-((x - length / 2) ** 2) / (length * length) / (2 * var)) / math.sqrt(2 * math.pi * var)


def plan_latent_tiles(height: int, width: int, tile: int = 96, overlap: int = 32) -> TileGrid | None:
    """The latent grid of the one-step SR repos, or None when they would not tile.

    They tile only when the latent *area* exceeds tile² (so 128×64 is one piece), use square tiles of
    min(tile, height, width), snap the last tile to the border, and blend with Gaussian weights (relative
    variance 0.01; rows centred at H/2, columns at (W−1)/2).  Blending by per-axis normalised weights equals
    their division by the summed 2-D weights, because the weights and the grid are separable.
    """
    if height * width <= tile * tile:
        return None
    side = min(tile, height, width)
    ys, xs = plan_axis_snapped(height, side, overlap), plan_axis_snapped(width, side, overlap)
    wy = axis_weights(ys, side, height, gaussian_weights_rows)
    wx = axis_weights(xs, side, width, gaussian_weights)
    return TileGrid(ys, xs, side, 1, wy, wx)


Box = tuple[int, int, int]
"""A latent tile: (top, left, side) in latent pixels."""


def run_latent_tiled(
    fn: Callable[[torch.Tensor, list[Box]], torch.Tensor],
    latents: torch.Tensor,
    tile: int = 96,
    overlap: int = 32,
    *,
    tile_batch: int = 1,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Apply `fn` (B,C,t,t -> B,C',t,t, e.g. the guided ε of a UNet) over the upstream latent grid and blend.

    `fn(pieces, boxes)` gets the tiles and where they are (so it can condition each tile on its own crop of a
    control image, or reuse what it computed for that tile at an earlier step).  `tile_batch` tiles go through
    `fn` in one call (stacked along the batch: the first tile's B samples, then the next tile's ...), which fills
    an accelerator better; the blend is the same.  The result is float32 on the latents' device.
    """
    height, width = latents.shape[-2:]
    grid = plan_latent_tiles(height, width, tile, overlap)
    if grid is None:
        return fn(latents, [(0, 0, max(height, width))]).float()
    batch = latents.shape[0]
    positions = [(iy, ix) for iy in range(len(grid.ys)) for ix in range(len(grid.xs))]
    out: torch.Tensor | None = None
    side = grid.tile
    for first in range(0, len(positions), max(1, tile_batch)):
        group = positions[first : first + max(1, tile_batch)]
        boxes = [(grid.ys[iy], grid.xs[ix], side) for iy, ix in group]
        pieces = torch.cat([latents[:, :, y : y + side, x : x + side] for y, x, _ in boxes])
        results = fn(pieces, boxes).float().split(batch)
        for (iy, ix), result in zip(group, results):
            if out is None:
                out = torch.zeros((batch, result.shape[1], height, width), dtype=torch.float32, device=latents.device)
            weight = (grid.wy[iy][:, None] * grid.wx[ix][None, :]).to(latents.device, torch.float32)
            y, x = grid.ys[iy], grid.xs[ix]
            out[:, :, y : y + side, x : x + side] += result * weight
        if on_tile:
            on_tile(first + len(group), len(positions))
    assert out is not None
    return out
