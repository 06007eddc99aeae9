"""Colour correction of a diffusion SR output against its (upsampled) input: wavelet and AdaIN.

One-step diffusion SR shifts colours (over-saturation, tinted flat areas); the SR repos correct it by keeping the
output's detail and taking the input's colours.  Two methods, as the StableSR-derived code defines them:
- wavelet: the output's high frequencies (5 levels of a dilated 3×3 binomial blur, replicate padding) plus the
  reference's final low-pass band;
- AdaIN: per-channel mean/std of the output matched to the reference (unbiased variance + 1e-5).

The official scripts apply them to 8-bit images: output and reference are truncated to uint8 (`mul(255).byte()`)
before the fix and the result is truncated again.  `color_fix(..., official_8bit=True)` reproduces that bit for
bit; `official_8bit=False` works in float throughout (no banding, and right for 16-bit output).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from srkit.common import check_choice
from srkit.option_values import COLOR_FIXES

ColorFix = Literal["wavelet", "adain", "none"]

_BINOMIAL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


def truncate_8bit(image: torch.Tensor) -> torch.Tensor:
    """[0,1] float -> the float value of its uint8 truncation (what torchvision's ToPILImage stores)."""
    return image.mul(255).to(torch.uint8).float().div(255)


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise 3×3 binomial blur with dilation `radius` after replicate padding by `radius`."""
    channels = image.shape[1]
    kernel = _BINOMIAL.to(image.device, image.dtype).expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decompose(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the high-frequency bands, final low-pass band) over `levels` dyadic radii 1, 2, 4, ..."""
    high = torch.zeros_like(image)
    for level in range(levels):
        low = wavelet_blur(image, 2**level)
        high += image - low
        image = low
    return high, image


def wavelet_color_fix(content: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Detail of `content`, colours (low-pass band) of `reference`; clamped to [0, 1]."""
    content_high, _ = wavelet_decompose(content, levels)
    _, reference_low = wavelet_decompose(reference, levels)
    return (content_high + reference_low).clamp(0, 1)


def _mean_std(image: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = image.flatten(2)
    return flat.mean(dim=2)[:, :, None, None], (flat.var(dim=2) + eps).sqrt()[:, :, None, None]


def adain_color_fix(content: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of `content` replaced by those of `reference`; clamped to [0, 1]."""
    content_mean, content_std = _mean_std(content, eps)
    reference_mean, reference_std = _mean_std(reference, eps)
    return ((content - content_mean) / content_std * reference_std + reference_mean).clamp(0, 1)


def color_fix(
    content: torch.Tensor, reference: torch.Tensor, method: str = "wavelet", *, official_8bit: bool = False
) -> torch.Tensor:
    """Colour-correct `content` (B,3,H,W in [0,1]) against `reference` (same size) in float32.

    `official_8bit` truncates both inputs and the result to 8 bits, as the official inference scripts do when
    they pass images through PIL.
    """
    check_choice(method, COLOR_FIXES, "color_fix")
    content, reference = content.float(), reference.float()
    if official_8bit:
        content, reference = truncate_8bit(content), truncate_8bit(reference)
    if method == "none":
        return content
    fixed = wavelet_color_fix(content, reference) if method == "wavelet" else adain_color_fix(content, reference)
    return truncate_8bit(fixed) if official_8bit else fixed


__all__ = [
    "COLOR_FIXES",
    "ColorFix",
    "adain_color_fix",
    "color_fix",
    "truncate_8bit",
    "wavelet_blur",
    "wavelet_color_fix",
    "wavelet_decompose",
]
