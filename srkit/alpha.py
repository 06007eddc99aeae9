"""Alpha handling for networks that only see RGB.

The colour under transparent pixels is arbitrary (often black, green or leftover paint), and an SR network
spreads it into the visible edge: the dark or green fringes users report.  Premultiplying removes that colour
but then needs a division by the upscaled alpha, which amplifies the network's ringing wherever alpha is small.
srkit composites the premultiplied image over its own "pulled" neighbourhood colour instead (push-pull
fill): fully opaque pixels are unchanged, transparent ones take the colour of the nearest visible content, and
no division is needed after the network.
"""

from __future__ import annotations

import cv2
import numpy as np

ALPHA_MODES = ("model", "resize", "drop")
"""`--alpha`: upscaled by the model (as a second image), by the resize filter, or dropped."""


def bleed_colour(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiplied `rgb` composited over a push-pull fill of itself: opaque everywhere, same where α = 1."""
    premultiplied = rgb * alpha[:, :, None]
    if alpha.min() >= 1.0:
        return rgb
    return _pull(premultiplied.astype(np.float32), alpha.astype(np.float32))


def _pull(colour: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Recursive push-pull: fill each level's missing coverage with the next coarser level's colour."""
    height, width = coverage.shape
    if height <= 1 and width <= 1:
        return colour / max(float(coverage.max()), 1e-6)
    size = (max(1, width // 2), max(1, height // 2))
    coarse_colour = cv2.resize(colour, size, interpolation=cv2.INTER_AREA)
    coarse_coverage = cv2.resize(coverage, size, interpolation=cv2.INTER_AREA)
    if coarse_colour.ndim == 2:
        coarse_colour = coarse_colour[:, :, None]
    filled = _pull(coarse_colour, coarse_coverage)
    upsampled = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR)
    if upsampled.ndim == 2:
        upsampled = upsampled[:, :, None]
    return colour + (1.0 - coverage)[:, :, None] * upsampled
