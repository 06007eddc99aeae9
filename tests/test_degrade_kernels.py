"""Blur kernels of the degradation pipeline: normalisation, shape, symmetry, and the published formulas."""

from __future__ import annotations

import math

import pytest
import torch

from srkit.degrade.filters import filter2d, gaussian_blur, resize
from srkit.degrade.kernels import KERNEL_KINDS, KernelParams, bivariate_kernel, sinc_kernel

KINDS = {
    "iso": KernelParams("iso", 21, 2.0, 2.0),
    "aniso": KernelParams("aniso", 21, 2.5, 0.8, theta=0.6),
    "generalized_iso": KernelParams("generalized_iso", 15, 1.5, 1.5, beta=0.6),
    "generalized_aniso": KernelParams("generalized_aniso", 15, 2.0, 1.0, theta=-1.1, beta=3.0),
    "plateau_iso": KernelParams("plateau_iso", 13, 1.2, 1.2, beta=1.7),
    "plateau_aniso": KernelParams("plateau_aniso", 13, 2.0, 0.5, theta=2.0, beta=1.3),
    "sinc": KernelParams("sinc", 11, cutoff=1.4),
}


def test_every_kind_is_covered():
    assert set(KINDS) == set(KERNEL_KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kernel_sums_to_one_with_its_size_and_peak_in_the_centre(kind):
    params = KINDS[kind]
    kernel = params.build()
    assert kernel.shape == (params.size, params.size) and kernel.dtype == torch.float32
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
    centre = params.size // 2
    assert kernel[centre, centre] == kernel.max()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kernel_is_point_symmetric(kind):
    """Σ is symmetric, so k(-C) = k(C) for every kind: a blur never shifts the image."""
    kernel = KINDS[kind].build()
    assert torch.allclose(kernel, kernel.flip(0, 1), atol=1e-7)


@pytest.mark.parametrize("kind", ["iso", "generalized_iso", "plateau_iso", "sinc"])
def test_isotropic_kernels_are_mirror_and_transpose_symmetric(kind):
    kernel = KINDS[kind].build()
    for view in (kernel.flip(0), kernel.flip(1), kernel.T):
        assert torch.allclose(kernel, view, atol=1e-7)


def test_anisotropic_kernel_is_not_mirror_symmetric_and_follows_its_rotation():
    """σx > σy along θ = 0 spreads the kernel horizontally; θ = π/2 spreads it vertically."""
    kernel = KINDS["aniso"].build()
    assert not torch.allclose(kernel, kernel.T, atol=1e-4)
    wide = bivariate_kernel(21, 3.0, 1.0, 0.0)
    tall = bivariate_kernel(21, 3.0, 1.0, math.pi / 2)
    assert wide[10, 14] > wide[14, 10]
    assert torch.allclose(tall, wide.T, atol=1e-6)


def test_gaussian_matches_the_closed_form():
    kernel = bivariate_kernel(9, 1.5, 1.5, 0.0).double()
    axis = torch.arange(9, dtype=torch.float64) - 4
    one_d = torch.exp(-axis**2 / (2 * 1.5**2))
    expected = torch.outer(one_d, one_d)
    assert torch.allclose(kernel, expected / expected.sum(), atol=1e-7)


def test_shape_parameter_beta_changes_the_tails_as_published():
    """Generalized: β < 1 heavier tails than the Gaussian, β > 1 lighter; β = 1 is the Gaussian itself."""
    gaussian = bivariate_kernel(21, 2.0, 2.0, 0.0)
    heavy = bivariate_kernel(21, 2.0, 2.0, 0.0, beta=0.5, family="generalized")
    light = bivariate_kernel(21, 2.0, 2.0, 0.0, beta=3.0, family="generalized")
    assert torch.allclose(bivariate_kernel(21, 2.0, 2.0, 0.0, beta=1.0, family="generalized"), gaussian)
    assert heavy[10, 0] > gaussian[10, 0] > light[10, 0]
    plateau = bivariate_kernel(21, 2.0, 2.0, 0.0, beta=2.0, family="plateau")
    assert plateau[10, 10] / plateau[10, 11] < gaussian[10, 10] / gaussian[10, 11]  # flatter top


def test_sinc_kernel_has_ringing_and_its_centre_limit():
    cutoff = 1.0
    kernel = sinc_kernel(21, cutoff)
    assert (kernel < 0).any()  # side lobes: the ringing the final sinc filter imitates
    raw_centre = cutoff**2 / (4 * math.pi)
    raw_neighbour = cutoff * torch.special.bessel_j1(torch.tensor(cutoff, dtype=torch.float64)).item() / (2 * math.pi)
    assert (kernel[10, 10] / kernel[10, 11]).item() == pytest.approx(raw_centre / raw_neighbour, rel=1e-5)


def test_bad_kernel_requests_fail_clearly():
    with pytest.raises(ValueError, match="odd"):
        bivariate_kernel(8, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        KernelParams("box", 7).build()
    with pytest.raises(ValueError, match="family"):
        bivariate_kernel(7, 1.0, 1.0, 0.0, family="box")


def test_filtering_keeps_size_and_mean_and_survives_tiny_images():
    image = torch.rand(2, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    blurred = filter2d(image, KINDS["iso"].build())
    assert blurred.shape == image.shape
    assert blurred.mean().item() == pytest.approx(image.mean().item(), abs=0.01)
    assert blurred.std() < image.std()
    tiny = torch.rand(1, 3, 5, 4)
    assert filter2d(tiny, KINDS["iso"].build()).shape == tiny.shape  # radius 10 > size: replicate padding
    assert gaussian_blur(tiny, 51, 8.3).shape == tiny.shape


def test_resize_gives_the_asked_size_in_every_mode():
    image = torch.rand(1, 3, 20, 30)
    for mode in ("area", "bilinear", "bicubic"):
        assert resize(image, (7, 45), mode).shape == (1, 3, 7, 45)
    assert resize(image, (0, 0), "area").shape == (1, 3, 1, 1)
