"""GDPO-SR's attribute-aware reward (ARF) and group-relative advantages (Yi et al., GDPO-SR, §4.3 of the notes).

For each LR image the frozen reference model produces a group of G samples.  Every sample is scored by a fidelity
metric (PSNR-Y against the HR) and by detail metrics (MANIQA, MUSIQ); each metric is min-max normalised within the
group; the image's reward mixes them by how much of its HR is smooth (fidelity matters) versus textured (detail
matters):  r_g = f·mean(fidelity_n) + d·mean(detail_n),  with the paper's metrics r_g = f·PSNR_n + d·½(MANIQA_n +
MUSIQ_n).  Advantages are the rewards standardised within the group.

The smooth/texture split is computed on the HR crop: 10×10 patches, each resized to 64×64 (bilinear), Sobel
gradient magnitude, entropy (bits) of its 512-bin histogram over (−5.5, 5.5), times the patch area; a pixel is
"detail" where that complexity exceeds 50.  The ratios are the fractions of detail / smooth pixels, rounded to two
decimals as upstream.

Deliberate choices (documented deviations from the official code):
- gray conversion: upstream applies OpenCV's BGR→gray to RGB data (R and B weights swapped).  srkit keeps that
  quirk by default (`official_gray=True`) so that ratios match the paper's training; `False` uses BT.601 on RGB.
- min-max normalisation: upstream divides by (max − min) with no epsilon, so a metric that is equal across the
  group yields NaN and poisons the step.  srkit maps a constant metric to 0 for every sample (it then carries no
  preference, which is what equal scores mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import torch

PATCH = 10
"""Side of the square patches of the smooth/texture split."""
COMPLEXITY_THRESHOLD = 50.0
"""Entropy (bits) × patch area above which a patch is texture: 0.5 bit for a full 10×10 patch."""
ENTROPY_BINS, ENTROPY_RANGE = 512, (-5.5, 5.5)
ADVANTAGE_EPS = 1e-8


def histogram_entropy(values: np.ndarray) -> float:
    """Entropy in bits of the normalised 512-bin histogram of `values` over (−5.5, 5.5) (+1e-10 inside the log)."""
    hist, _ = np.histogram(values, bins=ENTROPY_BINS, range=ENTROPY_RANGE)
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist.astype(np.float64) / total
    return float(-(p * np.log2(p + 1e-10)).sum())


def gradient_entropy(patch: np.ndarray) -> float:
    """Entropy of the Sobel gradient magnitude of a gray patch in [0, 1], resized to 64×64 first."""
    resized = cv2.resize(patch.astype(np.float64), (64, 64), interpolation=cv2.INTER_LINEAR)
    dx = cv2.Sobel(resized, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    dy = cv2.Sobel(resized, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    return histogram_entropy(np.sqrt(dx**2 + dy**2))


def to_gray(rgb: np.ndarray, official_gray: bool = True) -> np.ndarray:
    """H×W×3 RGB (uint8, or float in [0, 1]) -> H×W gray in [0, 1], quantised to 8 bits as upstream."""
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    code = cv2.COLOR_BGR2GRAY if official_gray else cv2.COLOR_RGB2GRAY
    return cv2.cvtColor(np.ascontiguousarray(rgb), code).astype(np.float64) / 255


def detail_mask(rgb: np.ndarray, *, official_gray: bool = True) -> np.ndarray:
    """Boolean H×W map: True where the pixel's patch is textured (complexity > 50), False where smooth.

    Patches tile the image from the top-left; the remainder strips and corner form smaller patches whose
    complexity scales with their (smaller) area, as upstream.
    """
    gray = to_gray(rgb, official_gray)
    height, width = gray.shape
    mask = np.zeros((height, width), dtype=bool)
    for top in range(0, height, PATCH):
        for left in range(0, width, PATCH):
            patch = gray[top : top + PATCH, left : left + PATCH]
            complexity = gradient_entropy(patch) * patch.size
            mask[top : top + PATCH, left : left + PATCH] = complexity > COMPLEXITY_THRESHOLD
    return mask


def attribute_ratios(rgb: np.ndarray, *, official_gray: bool = True) -> tuple[float, float]:
    """(fidelity ratio f, detail ratio d) of an HR image: fractions of smooth and textured pixels, 2 decimals."""
    detail = float(detail_mask(rgb, official_gray=official_gray).mean())
    return round(1.0 - detail, 2), round(detail, 2)


def minmax_normalise(scores: torch.Tensor) -> torch.Tensor:
    """(…, G) scores -> (s − min)/(max − min) over the last axis; a constant group maps to zeros (see above)."""
    low = scores.amin(dim=-1, keepdim=True)
    spread = scores.amax(dim=-1, keepdim=True) - low
    return torch.where(spread > 0, (scores - low) / spread.clamp_min(torch.finfo(scores.dtype).tiny), 0.0)


def arf_rewards(
    metrics: Mapping[str, torch.Tensor],
    fidelity_ratio: torch.Tensor,
    detail_ratio: torch.Tensor,
    *,
    fidelity_metrics: Sequence[str] = ("psnr",),
    detail_metrics: Sequence[str] = ("maniqa", "musiq"),
) -> torch.Tensor:
    """(B, G) rewards r = f·mean_k(fidelity_k normalised) + d·mean_k(detail_k normalised).

    `metrics[name]` is (B, G), higher = better (pass negated values for lower-is-better metrics such as NIQE);
    `fidelity_ratio` and `detail_ratio` are (B,).
    """
    missing = [name for name in (*fidelity_metrics, *detail_metrics) if name not in metrics]
    if missing:
        raise ValueError(f"reward metrics missing: {', '.join(missing)}")
    if not fidelity_metrics or not detail_metrics:
        raise ValueError("the ARF reward needs at least one fidelity and one detail metric")
    fidelity = torch.stack([minmax_normalise(metrics[name].double()) for name in fidelity_metrics]).mean(0)
    detail = torch.stack([minmax_normalise(metrics[name].double()) for name in detail_metrics]).mean(0)
    return fidelity_ratio.double()[:, None] * fidelity + detail_ratio.double()[:, None] * detail


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(B, G) rewards -> (r − mean)/(unbiased std + 1e-8) within each group, detached."""
    rewards = rewards.detach()
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


__all__ = [
    "arf_rewards",
    "attribute_ratios",
    "detail_mask",
    "gradient_entropy",
    "group_advantages",
    "histogram_entropy",
    "minmax_normalise",
    "to_gray",
]
