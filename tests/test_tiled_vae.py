"""Tiled VAE: exact with enough context and no attention (the pooled GroupNorm statistics are exact), close with
attention, tile geometry, and the thresholds that decide when it runs."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_sd import tiny_vae

from srkit.diffusion.latents import vae_decode, vae_encode
from srkit.nn.tiled_vae import VAETiling, split_axis, tiled_decode, tiled_encode


def vae_with(attention: bool):
    return tiny_vae(seed=0, mid_block_add_attention=attention)


def image(size: int = 96) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.nn.functional.interpolate(
        torch.rand(1, 3, 12, 12, generator=gen), size=(size, size), mode="bicubic"
    )


@torch.inference_mode()
def test_tiled_vae_encoder_is_exact_with_full_context() -> None:
    vae, x = vae_with(attention=False), image(128)
    tiling = VAETiling(encoder_tile=32, encoder_pad=128, offload=False)
    torch.testing.assert_close(tiled_encode(vae.encoder, x, tiling), vae.encoder(x), atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_tiled_vae_decoder_is_exact_with_full_context() -> None:
    vae = vae_with(attention=False)
    z = torch.randn(2, 4, 24, 20, generator=torch.Generator().manual_seed(2))
    tiling = VAETiling(decoder_tile=7, decoder_pad=24)
    torch.testing.assert_close(tiled_decode(vae.decoder, z, tiling), vae.decoder(z), atol=2e-5, rtol=1e-4)


def independent_tiles(encoder, x: torch.Tensor, tile: int, pad: int) -> torch.Tensor:
    """What tiling without shared statistics gives: each tile encoded on its own, cores stitched."""
    rows = split_axis(x.shape[2], tile, pad, 8)
    cols = split_axis(x.shape[3], tile, pad, 8)
    out = torch.zeros(x.shape[0], 8, x.shape[2] // 8, x.shape[3] // 8)
    for y0, y1, cy0, cy1 in rows:
        for x0, x1, cx0, cx1 in cols:
            piece = encoder(x[:, :, y0:y1, x0:x1])
            out[:, :, cy0 // 8 : cy1 // 8, cx0 // 8 : cx1 // 8] = piece[
                :, :, (cy0 - y0) // 8 : (cy1 - y0) // 8, (cx0 - x0) // 8 : (cx1 - x0) // 8
            ]
    return out


@pytest.mark.parametrize("attention,gain", [(False, 0.3), (True, 0.4)])
@torch.inference_mode()
def test_tiled_vae_shared_statistics_beat_per_tile_statistics(attention: bool, gain: float) -> None:
    """With less context than the receptive field, shared GroupNorm statistics remove most of the tiling
    error; attention within tiles (the approximation that remains) keeps part of it."""
    vae, x = vae_with(attention), image(192) * 2 - 1
    tiling = VAETiling(encoder_tile=64, encoder_pad=32, decoder_tile=8, decoder_pad=6)
    whole = vae.encoder(x)
    shared = tiled_encode(vae.encoder, x, tiling)
    alone = independent_tiles(vae.encoder, x, 64, 32)
    assert (shared - whole).abs().mean() < gain * (alone - whole).abs().mean()
    z = vae_encode(vae, x, latent="mode")
    assert tiling.use_encoder_tiles(x) and tiling.use_decoder_tiles(z)
    out, out_tiled = vae_decode(vae, z), vae_decode(vae, z, tiling=tiling)
    assert out_tiled.shape == out.shape
    assert (out_tiled - out).abs().mean() < 0.2 * (out - out.mean()).abs().mean()


def test_tiled_vae_split_axis_partitions_with_aligned_context() -> None:
    tiles = split_axis(1000, 300, 20, 8)
    cores = [(a, b) for _, _, a, b in tiles]
    assert cores[0][0] == 0 and cores[-1][1] == 1000
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(cores))
    assert all(a % 8 == 0 and s % 8 == 0 for s, _, a, _ in tiles)
    assert all(s == max(0, a - 24) and e == min(1000, b + 24) for s, e, a, b in tiles)
    assert split_axis(100, 300, 20, 8) == [(0, 100, 0, 100)]


def test_tiled_vae_thresholds_follow_the_one_step_repos() -> None:
    tiling = VAETiling()
    assert not tiling.use_encoder_tiles(torch.empty(1, 3, 1088, 1088))
    assert tiling.use_encoder_tiles(torch.empty(1, 3, 1096, 64))
    assert not tiling.use_decoder_tiles(torch.empty(1, 4, 246, 246))
    assert tiling.use_decoder_tiles(torch.empty(1, 4, 32, 247))
    assert not VAETiling(encoder_tile=0).use_encoder_tiles(torch.empty(1, 3, 5000, 5000))


def test_tiled_vae_needs_aligned_sides() -> None:
    vae = vae_with(attention=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_encode(vae.encoder, torch.zeros(1, 3, 100, 100), VAETiling(encoder_tile=32))
