"""A bf16 network whose image-facing ends compute in fp32: its first convolution reads the fp32 image, its last one
writes fp32 pixels.

Why: a bf16 value in [0.5, 1) lies on a grid of 1/256 steps, almost the 8-bit grid of 1/255 steps, so an
output computed in bf16 and then rounded to 8 bits is snapped twice, with a systematic beat between the grids.
Measured with the embedded default (RRDBNet x4plus, the 100 RealSR crops): all-bf16 moves PSNR-Y by +0.026 dB
from fp32; with the last convolution in fp32, by ~+0.004 dB.  Reading the input in fp32 keeps an exact copy of the
image for nets that add it back at the end (SRVGGNetCompact's nearest-upsampled skip).  Both ends are a few
percent of the FLOPs (3 channels on one side).

`keep_ends_fp32(model, dtype)` takes a model whose weights are already in `dtype` except those two convolutions
(see `srkit.diffusion.runtime.apply_kernels`) and swaps their class (parameters and state-dict keys unchanged);
`release_ends(model)` swaps them back.
"""

from __future__ import annotations

import torch
from torch import nn


class Fp32EndConv2d(nn.Conv2d):
    """A Conv2d with fp32 weights in a lower-precision network: casts its input to fp32, its output to
    `output_dtype` (the body's dtype for the first convolution, fp32 for the last)."""

    output_dtype: torch.dtype = torch.float32

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(input.to(weight.dtype), weight, bias).to(self.output_dtype)


def conv_ends(model: nn.Module) -> list[nn.Conv2d]:
    """The first and the last plain 2-D convolution of `model` in module order (one when it has one)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [] if not convs else [convs[0]] if len(convs) == 1 else [convs[0], convs[-1]]


def release_ends(model: nn.Module) -> None:
    """Turn every Fp32EndConv2d of `model` back into a plain Conv2d (its weights keep their dtype)."""
    for module in model.modules():
        if type(module) is Fp32EndConv2d:
            module.__class__ = nn.Conv2d
            module.__dict__.pop("output_dtype", None)


def keep_ends_fp32(model: nn.Module, dtype: torch.dtype) -> list[nn.Conv2d]:
    """Make the ends of `model` (whose other weights are `dtype`) fp32 convolutions at the boundary; returns them."""
    ends = conv_ends(model)
    for index, conv in enumerate(ends):
        conv.float()  # a no-op after apply_kernels, which never casts them down
        conv.__class__ = Fp32EndConv2d
        conv.output_dtype = torch.float32 if index == len(ends) - 1 else dtype
    return ends


__all__ = ["Fp32EndConv2d", "conv_ends", "keep_ends_fp32", "release_ends"]
