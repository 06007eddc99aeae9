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
from srkit.tiling import run_latent_tiled


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


def guided(denoiser: Denoiser, uncond: Conditioning | None, scale: float) -> Denoiser:
    """Classifier-free guidance ε_u + s·(ε_c − ε_u) in one batched call; the denoiser itself when s = 1."""
    if uncond is None or scale == 1.0:
        return denoiser

    def call(x: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        both_t = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t
        both = denoiser(torch.cat([x, x]), both_t, Conditioning.cat([cond.expand(batch), uncond.expand(batch)]))
        eps_cond, eps_uncond = both.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return call


def tiled(
    denoiser: Denoiser,
    tile: int,
    overlap: int,
    *,
    tile_batch: int = 1,
    on_tile: Callable[[int, int], None] | None = None,
) -> Denoiser:
    """The denoiser over latent tiles (upstream grid, Gaussian blend) when the latent is larger than `tile`²;
    `tile` 0 never tiles.  `tile_batch` tiles share one network call."""
    if tile <= 0:
        return denoiser

    def call(x: torch.Tensor, t: Timestep, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        full = cond.expand(batch)
        names = list(full.maps)
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] > 1:
            raise ValueError("latent tiling takes one timestep for the whole batch")

        def one_call(pieces: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
            copies = pieces.shape[0] // batch
            tokens = {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in full.tokens.items()}
            return denoiser(pieces, t, Conditioning(tokens, dict(zip(names, maps))))

        return run_latent_tiled(
            one_call, x, tile, overlap, tile_batch=tile_batch, aligned=[full.maps[k] for k in names], on_tile=on_tile
        )

    return call


__all__ = ["Conditioning", "Denoiser", "UNetDenoiser", "guided", "tiled", "timesteps"]
