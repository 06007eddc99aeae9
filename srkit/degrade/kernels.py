"""Blur kernels of the Real-ESRGAN pipeline: Gaussian, generalized Gaussian and plateau (each isotropic or
anisotropic), and the circular sinc (low-pass) kernel that imitates ringing and overshoot.

The formulas are those of the Real-ESRGAN paper (Wang et al., ICCVW 2021, §3.1).  With the pixel offset
C = (x, y) from the kernel centre and Σ = R(θ) diag(σx², σy²) R(θ)ᵀ, the quadratic form Q = Cᵀ Σ⁻¹ C gives

    Gaussian              exp(-Q / 2)
    generalized Gaussian  exp(-Q^β / 2)      (β < 1: heavier tails, β > 1: flatter top)
    plateau               1 / (1 + Q^β)

and the sinc kernel is ω·J1(ω·r) / (2π·r) with its limit ω² / (4π) at r = 0.  Every kernel is normalised to
sum 1 so that blurring keeps the mean brightness.  Kernels are built in float64 (small, and the sinc's
alternating tails cancel badly in float32) and returned as float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from srkit.degrade.config import GAUSSIAN_FAMILIES, KERNEL_KINDS


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) offsets from the centre of an odd size×size kernel."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def bivariate_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0,
                     family: str = "gaussian") -> torch.Tensor:
    """A size×size kernel of `family` (gaussian | generalized | plateau) with axes σx, σy rotated by θ."""
    x, y = _grid(size)
    u = math.cos(theta) * x + math.sin(theta) * y  # coordinates along the rotated principal axes
    v = -math.sin(theta) * x + math.cos(theta) * y
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    if family == "gaussian":
        kernel = torch.exp(-0.5 * q)
    elif family == "generalized":
        kernel = torch.exp(-0.5 * q.pow(beta))
    elif family == "plateau":
        kernel = 1.0 / (1.0 + q.pow(beta))
    else:
        raise ValueError(f"unknown kernel family '{family}'; use gaussian, generalized or plateau")
    return (kernel / kernel.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Circularly symmetric ideal low-pass kernel with cut-off frequency `cutoff` (radians, π = Nyquist)."""
    x, y = _grid(size)
    r = torch.sqrt(x**2 + y**2)
    centre = r == 0
    safe_r = torch.where(centre, torch.ones_like(r), r)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(centre, torch.full_like(r, cutoff**2 / (4 * math.pi)), kernel)
    return (kernel / kernel.sum()).float()


@dataclass(frozen=True)
class KernelParams:
    """Everything needed to rebuild one drawn kernel; kept instead of the pixels so draws are cheap to test."""

    kind: str
    """One of KERNEL_KINDS."""
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    cutoff: float = 0.0
    """Sinc cut-off in radians (sinc only)."""

    def build(self) -> torch.Tensor:
        """The size×size float32 kernel, summing to 1."""
        if self.kind == "sinc":
            return sinc_kernel(self.size, self.cutoff)
        family = GAUSSIAN_FAMILIES.get(self.kind)
        if family is None:
            raise ValueError(f"unknown kernel kind '{self.kind}'; use one of {', '.join(KERNEL_KINDS)}")
        return bivariate_kernel(self.size, self.sigma_x, self.sigma_y, self.theta, self.beta, family)
