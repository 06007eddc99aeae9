"""Deterministic pixel operations of the pipeline: kernel filtering, resizing, unsharp masking.

Images are float tensors N×C×H×W on any device.  Filtering pads by reflection (as the reference's filter2D
does) so borders are not darkened; an image too small to reflect by the kernel radius (tiny inputs after a
strong down-scale) is padded by replication instead of failing.  The reference zero-pads every kernel to
21×21 to batch them; filtering with the unpadded kernel gives the same values with less work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

USM_SIZE = 51
USM_SIGMA = 0.3 * ((USM_SIZE - 1) * 0.5 - 1) + 0.8
"""Gaussian of the reference's USMSharp(radius=50): size 51, σ from OpenCV's rule for σ = 0 (8.3)."""
USM_WEIGHT = 0.5
USM_THRESHOLD = 10 / 255
"""Residuals below this are treated as flat (noise) and not sharpened."""


def _pad(images: torch.Tensor, top_bottom: int, left_right: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    mode = "reflect" if top_bottom < height and left_right < width else "replicate"
    return F.pad(images, (left_right, left_right, top_bottom, top_bottom), mode=mode)


def filter2d(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel of every image with one odd kh×kw kernel; output size = input size."""
    channels = images.shape[1]
    kh, kw = kernel.shape
    weight = kernel.to(images).expand(channels, 1, kh, kw)
    return F.conv2d(_pad(images, kh // 2, kw // 2), weight, groups=channels)


def gaussian_blur(images: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (two 1-D passes: 2·size taps per pixel instead of size²)."""
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-0.5 * (axis / sigma) ** 2)
    taps = (taps / taps.sum()).float()
    return filter2d(filter2d(images, taps[None, :]), taps[:, None])


def usm_sharpen(images: torch.Tensor) -> torch.Tensor:
    """Unsharp masking with a soft threshold mask, as Real-ESRGAN applies to the GT before degrading it.

    Sharpening only where the residual is significant (and feathering that mask) keeps flat areas and
    noise untouched, so the pipeline starts from crisp edges without amplified grain.
    """
    residual = images - gaussian_blur(images, USM_SIZE, USM_SIGMA)
    mask = (residual.abs() > USM_THRESHOLD).to(images.dtype)
    soft_mask = gaussian_blur(mask, USM_SIZE, USM_SIGMA)
    sharp = (images + USM_WEIGHT * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize to (height, width) ≥ 1 with area | bilinear | bicubic, without antialiasing (as the reference)."""
    size = (max(1, size[0]), max(1, size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, align_corners=False)
