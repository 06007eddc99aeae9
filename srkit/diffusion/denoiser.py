"""The denoiser interface every sampler talks to: (x_t, t, conditioning) -> the network's prediction (ε or v).

Two wrappers are the only places in srkit where classifier-free guidance and latent tiling are written:
- `guided(denoiser, uncond, scale)`: ε_u + s·(ε_c − ε_u), the conditional and unconditional passes batched into one
  network call (activations: the conditional batch, then the unconditional one).  What both passes share (a
  ControlNet hint, an image token) is computed once by the engine, before sampling, and only repeated here.
- `tiled(denoiser, tile, overlap)`: the network over the upstream latent grid with Gaussian blending
  (`srkit.tiling.run_latent_tiled`); conditioning maps aligned with the latent (hints, control images) are cropped
  to the same tiles, token sequences are shared.
Samplers (`srkit.diffusion.samplers`) then never know whether guidance or tiling happen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from srkit.diffusion.schedule import Timestep
from srkit.tiling import Box, run_latent_tiled


@dataclass(frozen=True)
class Conditioning:
    """What a denoiser sees besides x_t and t.

    `tokens`: sequences the network attends to (text embeddings, image tokens), (1 or B, L, D).
    `maps`: spatial maps aligned with x_t (a latent hint, a pixel-space control image), (1 or B, C, h·k, w·k) for
    an (h, w) latent and an integer k.  Entries with batch 1 are shared by every sample.
    """

    tokens: Mapping[str, torch.Tensor] = field(default_factory=dict)
    maps: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def expand(self, batch: int) -> Conditioning:
        """Every entry with batch `batch` (views of batch-1 entries, no copy)."""

        def grow(value: torch.Tensor) -> torch.Tensor:
            if value.shape[0] == batch:
                return value
            if value.shape[0] != 1:
                raise ValueError(f"conditioning of batch {value.shape[0]} does not fit a batch of {batch}")
            return value.expand(batch, *value.shape[1:])

        return Conditioning({k: grow(v) for k, v in self.tokens.items()}, {k: grow(v) for k, v in self.maps.items()})

    def with_tokens(self, **tokens: torch.Tensor) -> Conditioning:
        """The same conditioning with some token entries replaced (e.g. the negative prompt's text)."""
        return Conditioning({**self.tokens, **tokens}, dict(self.maps))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Entries concatenated along the batch (all parts must have the same keys)."""
        first = parts[0]
        return Conditioning(
            {k: torch.cat([p.tokens[k] for p in parts]) for k in first.tokens},
            {k: torch.cat([p.maps[k] for p in parts]) for k in first.maps},
        )


class Denoiser(Protocol):
    """A diffusion network seen by a sampler: x_t (B, C, h, w), t (int or (B,)) -> prediction (B, C, h, w)."""

    def __call__(self, x: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor: ...


class UNetDenoiser:
    """A text-conditioned diffusers UNet (`cond.tokens["text"]`), called in its own dtype.

    `unet` may be the module or a compiled callable of it (`runtime.maybe_compile`); gradients flow when the caller
    allows them (training recipes use the same class).
    """

    def __init__(self, unet: Callable, dtype: torch.dtype | None = None) -> None:
        self.unet = unet
        self.dtype = dtype or next(unet.parameters()).dtype

    def __call__(self, x: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        text = cond.expand(batch).tokens["text"].to(x.device, self.dtype)
        return self.unet(x.to(self.dtype), timesteps(t, batch, x.device), encoder_hidden_states=text).sample


def timesteps(t: Timestep, batch: int, device: torch.device) -> torch.Tensor:
    """t as the long tensor a diffusers network takes: (1,) for one timestep, (B,) per sample."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        if t.shape[0] != batch:
            raise ValueError(f"{t.shape[0]} timesteps for a batch of {batch}")
        return t.to(device=device, dtype=torch.long)
    return torch.tensor([int(t)], device=device, dtype=torch.long)


Unconditional = Conditioning | Callable[[Conditioning], Conditioning]
"""The unconditional pass's conditioning: fixed, or derived from the conditional one (the same per-tile hint and
image token with the negative prompt's text)."""


def guided(denoiser: Denoiser, uncond: Unconditional | None, scale: float) -> Denoiser:
    """Classifier-free guidance ε_u + s·(ε_c − ε_u) in one batched call; the denoiser itself when s = 1."""
    if uncond is None or scale == 1.0:
        return denoiser

    def call(x: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        negative = uncond(cond) if callable(uncond) else uncond
        both_t = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        both = denoiser(torch.cat([x, x]), both_t, Conditioning.cat([cond.expand(batch), negative.expand(batch)]))
        eps_cond, eps_uncond = both.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return call


TileCondition = Callable[[Conditioning, Box], Conditioning]
"""The conditioning of one latent tile, from the whole image's conditioning and the tile's box."""


def crop_maps(cond: Conditioning, box: Box, latent_size: tuple[int, int]) -> Conditioning:
    """The tile's crop of every conditioning map (maps cover the latent at an integer factor k); tokens shared."""
    y, x, side = box
    maps = {}
    for name, spatial in cond.maps.items():
        k = spatial.shape[-2] // latent_size[0]
        if k < 1 or tuple(spatial.shape[-2:]) != (latent_size[0] * k, latent_size[1] * k):
            raise ValueError(
                f"conditioning map '{name}' of {tuple(spatial.shape[-2:])} is not aligned with the "
                f"{latent_size[0]}x{latent_size[1]} latent"
            )
        maps[name] = spatial[:, :, y * k : (y + side) * k, x * k : (x + side) * k]
    return Conditioning(dict(cond.tokens), maps)


def tiled(
    denoiser: Denoiser,
    tile: int,
    overlap: int,
    *,
    tile_batch: int = 1,
    on_tile: Callable[[int, int], None] | None = None,
    tile_condition: TileCondition | None = None,
) -> Denoiser:
    """The denoiser over latent tiles (upstream grid, Gaussian blend) when the latent is larger than `tile`²;
    `tile` 0 never tiles.  `tile_batch` tiles share one network call.

    Each tile is conditioned on its crop of the conditioning maps, or on what `tile_condition` computes from the
    tile's box (e.g. a hint and an image token from its crop of the control image); those are computed at the
    first call and reused at every later one (the grid is the same at every sampler step), so the returned
    denoiser belongs to one image.
    """
    if tile <= 0:
        return denoiser
    cache: dict[Box, Conditioning] = {}

    def condition_of(full: Conditioning, box: Box, size: tuple[int, int]) -> Conditioning:
        if tile_condition is None:
            return crop_maps(full, box, size)
        if box not in cache:
            cache[box] = tile_condition(full, box)
        return cache[box]

    def call(x: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        full = cond.expand(batch)
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 1:
            raise ValueError("latent tiling takes one timestep for the whole batch")

        def one_call(pieces: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
            parts = [condition_of(full, box, tuple(x.shape[-2:])).expand(batch) for box in boxes]
            return denoiser(pieces, t, Conditioning.cat(parts))

        return run_latent_tiled(one_call, x, tile, overlap, tile_batch=tile_batch, on_tile=on_tile)

    return call


__all__ = [
    "Conditioning",
    "Denoiser",
    "TileCondition",
    "UNetDenoiser",
    "Unconditional",
    "crop_maps",
    "guided",
    "tiled",
    "timesteps",
]
