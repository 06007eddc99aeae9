"""Tiling: even plans, exact blending, OOM back-off, and no visible seams with a real network."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import smooth_image

from srkit.api import load_engine
from srkit.tiling import TileGrid, feather_weights, plan_axis, run_tiled


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.mark.parametrize("length, tile, overlap", [(256, 96, 24), (97, 96, 8), (1000, 128, 32), (50, 96, 24)])
def test_plan_covers_the_axis_with_the_requested_overlap(length, tile, overlap):
    starts = plan_axis(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(tile - g >= overlap for g in gaps)
    assert not gaps or max(gaps) - min(gaps) <= 1  # spread evenly, no thin remainder tile


def test_axis_weights_sum_to_one_and_vanish_at_inner_borders():
    grid = TileGrid.plan(256, 256, 96, 24, scale=2)
    total = torch.zeros(512, dtype=torch.float64)
    for start, w in zip(grid.ys, grid.wy):
        total[start * 2 : start * 2 + w.numel()] += w
    assert torch.allclose(total, torch.ones_like(total))
    assert grid.wy[1][0] == 0 and grid.wy[0][-1] == 0
    assert feather_weights(10, 0, 0).eq(1).all()


def test_pointwise_function_is_reproduced_exactly():
    image = torch.rand(2, 3, 150, 170)
    up = lambda t: F.interpolate(t, scale_factor=3, mode="nearest")
    tiled = run_tiled(up, image, 3, 64, 16)
    assert torch.allclose(tiled, up(image), atol=1e-6)


def test_out_of_memory_halves_the_tile_and_resumes():
    image = torch.rand(1, 3, 128, 128)
    calls: list[int] = []

    def picky(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape[-1])
        if t.shape[-1] > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return t * 2

    out = run_tiled(picky, image, 1, 128, 8)
    assert torch.allclose(out, image * 2, atol=1e-6)
    assert calls[:2] == [128, 64] and max(calls[2:]) <= 40  # one failure per size, then only smaller tiles


def test_out_of_memory_at_the_smallest_tile_is_a_clear_error():
    def always_oom(t):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(MemoryError, match="even with"):
        run_tiled(always_oom, torch.rand(1, 3, 64, 64), 1, 64, 8)


def test_other_errors_are_not_swallowed():
    def broken(t):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_tiled(broken, torch.rand(1, 3, 64, 64), 1, 32, 8)


def _upscale(model: str, image: np.ndarray, tile) -> np.ndarray:
    return load_engine(model, tile=tile, tile_overlap=24).upscale(image)


@pytest.fixture(scope="module")
def x4plus():
    # fp32: the floor is about blending; on a bf16 CPU (`--dtype auto` on AMX) each tile's bf16 rounding adds its
    # own noise (measured 44.4 dB tiled vs untiled there, both ~bf16-noisy against fp32).
    return load_engine("realesrgan-x4plus", tile=None, dtype="fp32")


def test_tiled_matches_untiled_on_the_default_model(x4plus):
    """Issue floor: 256² LR, tile 96, overlap 24, tiled vs untiled ≥ 45 dB with Real-ESRGAN x4plus."""
    image = smooth_image(256, 256, seed=3)
    untiled = x4plus.upscale(image)
    x4plus.tile, x4plus.tile_overlap = 96, 24
    tiled = x4plus.upscale(image)
    x4plus.tile = None
    assert tiled.shape == untiled.shape == (1024, 1024, 3)
    assert psnr(tiled, untiled) >= 45.0


def seam_score(image: np.ndarray, borders: list[int], axis: int) -> float:
    """Mean |second difference| across the given rows/columns over its mean everywhere (1.0 = no seam)."""
    second = np.abs(np.diff(image.astype(np.float64), n=2, axis=axis)).mean(axis=tuple(i for i in (0, 1, 2) if i != axis))
    at_borders = np.mean([second[b - 1] for b in borders if 1 <= b - 1 < len(second)])
    return float(at_borders / second.mean())


def test_no_visible_seam_on_a_smooth_gradient():
    """Hard-edged tiles leave a jump where tiles meet; blended tiles must look like the untiled output there."""
    y, x = np.mgrid[0:192, 0:192].astype(np.float32)
    gradient = np.stack([x / 192, y / 192, (x + y) / 384], axis=2).astype(np.float32)
    engine = load_engine("realesr-animevideov3", tile=64, tile_overlap=16)
    tiled = engine.upscale(gradient)
    engine.tile = None
    untiled = engine.upscale(gradient)
    grid = TileGrid.plan(192, 192, 64, 16, scale=4)
    # where two tiles' weights cross (the middle of each overlap) is where a seam would show
    borders = [4 * (b + (a + 64 - b) // 2) for a, b in zip(grid.xs, grid.xs[1:])]
    for axis in (0, 1):
        assert seam_score(tiled, borders, axis) < 1.5 * seam_score(untiled, borders, axis) + 0.05
    assert psnr(tiled, untiled) >= 45.0
