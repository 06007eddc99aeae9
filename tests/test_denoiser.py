"""The denoiser wrappers every sampler uses: classifier-free guidance in one batched call, and latent tiling that
crops conditioning maps (hints, control images at k× the latent resolution) to the same tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srkit.diffusion.denoiser import Conditioning, guided, tiled


def pointwise(x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
    """A 'network' whose output at a latent pixel depends only on that pixel, its map pixels and the tokens: tiling
    then changes nothing, so any cropping or batching mistake shows."""
    hint = cond.maps["hint"]
    factor = hint.shape[-1] // x.shape[-1]
    pooled = F.avg_pool2d(hint, factor) if factor > 1 else hint
    step = t.float().view(-1, 1, 1, 1) if isinstance(t, torch.Tensor) else float(t)
    return 2 * x + pooled + cond.tokens["text"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + step / 1000


@pytest.mark.parametrize("factor", [1, 8])
@pytest.mark.parametrize("tile_batch", [1, 3])
def test_tiled_denoiser_crops_maps_and_equals_the_whole_latent(factor: int, tile_batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 40, 56, generator=gen)
    cond = Conditioning(
        {"text": torch.randn(2, 5, 3, generator=gen)}, {"hint": torch.randn(1, 4, 40 * factor, 56 * factor, generator=gen)}
    )
    calls: list[int] = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return pointwise(x, t, c)

    whole = pointwise(x, 500, cond.expand(2))
    pieces = tiled(counting, 16, 4, tile_batch=tile_batch)(x, 500, cond)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)
    assert len(calls) > 1 and max(calls) == 2 * tile_batch


def test_tiled_refuses_a_map_not_aligned_with_the_latent() -> None:
    x = torch.zeros(1, 4, 40, 40)
    with pytest.raises(ValueError, match="not aligned"):
        tiled(pointwise, 16, 4)(x, 1, Conditioning({"text": torch.zeros(1, 1, 1)}, {"hint": torch.zeros(1, 4, 41, 40)}))


def test_guided_batches_both_passes_with_per_sample_timesteps() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500, 990])
    hint = torch.randn(1, 4, 8, 8, generator=gen)
    pos = Conditioning({"text": torch.ones(1, 2, 3)}, {"hint": hint})
    neg = Conditioning({"text": -torch.ones(1, 2, 3)}, {"hint": hint})
    calls: list[int] = []

    def counting(x, t, c):
        calls.append(x.shape[0])
        return pointwise(x, t, c)

    eps = guided(counting, neg, 4.0)(x, t, pos)
    expected = pointwise(x, t, neg.expand(3)) + 4.0 * (pointwise(x, t, pos.expand(3)) - pointwise(x, t, neg.expand(3)))
    torch.testing.assert_close(eps, expected)
    assert calls == [6]
    assert guided(pointwise, neg, 1.0) is pointwise and guided(pointwise, None, 4.0) is pointwise


def test_tile_condition_is_computed_once_per_tile_and_reused_at_every_step() -> None:
    """A per-tile conditioning (ConsisSR: hint and image token of the tile's crop) is not recomputed per step."""
    x = torch.randn(1, 4, 40, 40)
    control = torch.randn(1, 4, 320, 320)
    made: list[tuple[int, int, int]] = []

    def tile_condition(cond: Conditioning, box) -> Conditioning:
        made.append(box)
        y, x0, side = box
        crop = cond.maps["hint"][:, :, 8 * y : 8 * (y + side), 8 * x0 : 8 * (x0 + side)]
        return Conditioning({"text": cond.tokens["text"]}, {"hint": crop})

    cond = Conditioning({"text": torch.zeros(1, 2, 3)}, {"hint": control})
    denoiser = tiled(pointwise, 16, 4, tile_condition=tile_condition)
    first = denoiser(x, 10, cond)
    boxes = list(made)
    second = denoiser(x, 10, cond)
    assert made == boxes and len(boxes) == 9
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, pointwise(x, 10, cond), atol=1e-5, rtol=1e-5)
