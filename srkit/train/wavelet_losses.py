"""RFSR's structure loss: an L1 between the wavelet low-pass bands of the SR output and the ground truth.

Early (noisy) sampler steps decide the layout of the image, so RFSR holds them to the ground truth's low
frequencies only and leaves the details to the rewards of the late steps.

- As released (`DWTLoss` in SeeSR/basicsr/losses/basic_loss.py, notes §2.3): despite its name, a dual-tree
  complex wavelet transform, `pytorch_wavelets.DTCWTForward(J=3, biort='near_sym_b', qshift='qshift_b')`
  (mode 'symmetric'), and `w · mean|Yl(sr) − Yl(gt)|` on its level-3 low-pass.  The DT-CWT does not decimate
  its first level, so Yl is H/4 × W/4.  Its `highq` variant (unused by the script) adds, for each level, the
  mean L1 over the complex high-pass tensors (B, C, 6, h, w, 2).
- The paper's wording (a Haar DWT "LL" band) as an option: the same L1 on the Haar LL band of level J, which
  is H/2^J × W/2^J.  The paper may also add an SSIM term on that band [paper, unverified]; the released code
  has no SSIM and neither has srkit.

Both images are in [0, 1] (the script compares the decoded x̂0 with `pixel_values / 2 + 0.5`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

TRANSFORMS = ("dtcwt", "haar")
INSTALL_HINT = "pip install pytorch-wavelets==1.3.0 PyWavelets 'setuptools<81'"
"""pytorch-wavelets 1.3.0 imports PyWavelets, undeclared, and `pkg_resources` (gone in setuptools 81)."""


def _pytorch_wavelets():
    """The pytorch_wavelets package, imported on first use (an optional training dependency)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import pytorch_wavelets
    except ImportError as exc:
        raise ImportError(f"the structure loss needs pytorch-wavelets ({exc}): {INSTALL_HINT}") from None
    return pytorch_wavelets


def wavelet_transform(transform: str, levels: int, highpass: bool) -> nn.Module:
    """A module mapping (B, C, H, W) to (low-pass, [high-pass per level]): RFSR's DT-CWT, or Haar."""
    wavelets = _pytorch_wavelets()
    if transform == "dtcwt":
        return wavelets.DTCWTForward(J=levels, biort="near_sym_b", qshift="qshift_b", skip_hps=not highpass)
    if transform == "haar":
        return wavelets.DWTForward(J=levels, wave="haar")
    raise ValueError(f"unknown wavelet transform {transform!r}; known: {', '.join(TRANSFORMS)}")


class LowPassL1Loss(nn.Module):
    """`weight · mean|low(sr) − low(gt)|`, plus the high-pass L1 of every level when `highpass`.

    The ground truth is a target: its transform runs without gradient."""

    def __init__(
        self, weight: float, transform: str = "dtcwt", levels: int = 3, highpass: bool = False
    ) -> None:
        super().__init__()
        self.weight = weight
        self.highpass = highpass
        self.transform = wavelet_transform(transform, levels, highpass)

    def forward(self, sr: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        low_sr, high_sr = self.transform(sr)
        with torch.no_grad():
            low_gt, high_gt = self.transform(gt)
        loss = F.l1_loss(low_sr, low_gt)
        if self.highpass:
            loss = loss + sum(F.l1_loss(a, b) for a, b in zip(high_sr, high_gt, strict=True))
        return self.weight * loss


__all__ = ["TRANSFORMS", "LowPassL1Loss", "wavelet_transform"]
