"""Wavelet and AdaIN colour fixes: definitions, the official 8-bit truncations, and errors."""

from __future__ import annotations

import pytest
import torch

from srkit.colorfix import adain_color_fix, color_fix, truncate_8bit, wavelet_blur, wavelet_decompose


def images(seed: int = 0, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 5, generator=gen), size=(size, size), mode="bilinear")
    detail = 0.1 * torch.rand(1, 3, size, size, generator=gen)
    return (0.6 * smooth + detail).clamp(0, 1), torch.rand(1, 3, size, size, generator=gen) * 0.5 + 0.25


def test_colorfix_wavelet_bands_sum_to_the_image() -> None:
    image, _ = images()
    high, low = wavelet_decompose(image, levels=5)
    torch.testing.assert_close(high + low, image, atol=1e-6, rtol=0)


def test_colorfix_wavelet_blur_is_the_dilated_binomial_kernel() -> None:
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 16.0
    blurred = wavelet_blur(image, radius=2)[0, 0]
    assert blurred[4, 4] == 4 and blurred[4, 2] == blurred[2, 4] == 2 and blurred[2, 2] == 1
    assert blurred.sum() == 16 and blurred[4, 3] == 0  # dilation 2 skips the direct neighbours


def test_colorfix_wavelet_takes_low_frequencies_from_the_reference() -> None:
    content, reference = images()
    fixed = color_fix(content, reference, "wavelet")
    content_high, _ = wavelet_decompose(content)
    _, reference_low = wavelet_decompose(reference)
    torch.testing.assert_close(fixed, (content_high + reference_low).clamp(0, 1))
    torch.testing.assert_close(color_fix(content, content, "wavelet"), content, atol=1e-6, rtol=0)


def test_colorfix_adain_matches_reference_statistics() -> None:
    content, reference = images(1)
    fixed = adain_color_fix(content, reference)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), reference.mean(dim=(2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(fixed.flatten(2).std(2), reference.flatten(2).std(2), atol=1e-3, rtol=0)


def test_colorfix_official_8bit_truncates_before_and_after() -> None:
    content, reference = images(2)
    for method in ("wavelet", "adain"):
        official = color_fix(content, reference, method, official_8bit=True)
        expected = truncate_8bit(color_fix(truncate_8bit(content), truncate_8bit(reference), method))
        assert torch.equal(official, expected)
        assert torch.equal(truncate_8bit(official), official)
    assert torch.equal(color_fix(content, reference, "none", official_8bit=True), truncate_8bit(content))
    assert torch.equal(color_fix(content, reference, "none"), content)


def test_colorfix_truncation_is_not_rounding() -> None:
    assert truncate_8bit(torch.tensor([0.999, 0.5 / 255, 1.0])).mul(255).round().tolist() == [254, 0, 255]


def test_colorfix_unknown_method() -> None:
    content, reference = images()
    with pytest.raises(ValueError, match="color_fix must be one of"):
        color_fix(content, reference, "histogram")
