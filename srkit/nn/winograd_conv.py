"""3×3 convolutions on the CPU through NNPACK's Winograd kernels, where those beat oneDNN.

PyTorch's CPU convolutions go to oneDNN's direct algorithm.  NNPACK (bundled with PyTorch's x86 builds, used by
PyTorch itself only for batches of 16 or more) computes a 3×3 convolution with Winograd F(6×6, 3×3), ~5× fewer
multiplications.  Measured on 2 AVX2 cores, fp32, one image (`benchmarks/bench_cpu_convs.py`):

- 2.2–4× faster for 3×3, stride 1, padding 1 with ≥ 64 input and output channels on maps of ≥ 64² pixels: the SD
  VAE encoder and decoder (VAE decode at 512²: ~14 s → ~8 s) and the 64² level of an SD UNet;
- slower on small maps with many channels (UNet inner levels, 16²×1280: 0.3×) and for the 3-channel ends, which
  therefore keep oneDNN;
- NNPACK's batched routine is tuned for training and is slower than its single-image one, so a batch runs image
  by image.

Accuracy: Winograd rounds differently, ~1e-5 relative error per convolution (oneDNN's ~1e-7).  S3Diff's 512²
output moves by ~1e-5, far below one 8-bit level (3.9e-3); an SD-shaped VAE decoder given outlier channels
(activations up to 5e3; trained SD VAEs are known for large activations) moves by ≤ 8e-5
(`bench_cpu_convs.py --decoder`).  Used by default only on the CPUs it was measured on
(`srkit.cpu_features.winograd_wanted`); `SRKIT_CPU_WINOGRAD=0` keeps oneDNN everywhere, `=1` uses NNPACK wherever
it exists.
NNPACK runs its own thread pool with one thread per core, which `torch.set_num_threads` does not limit.

`use_winograd_convolutions(model)` swaps the class of every plain `nn.Conv2d` (parameters, state-dict keys and
hooks unchanged); each call then picks NNPACK or oneDNN from the shapes it sees.  Anything that needs gradients
keeps oneDNN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from srkit.cpu_features import WINOGRAD_SWITCH as ENV_SWITCH
from srkit.cpu_features import winograd_wanted

MIN_CHANNELS = 64
MIN_PIXELS = 64 * 64
MAX_BAND_ELEMENTS = 1 << 25
"""Input values per NNPACK call (128 MiB in fp32): bounds its workspace on large maps (see winograd_conv3x3)."""


@functools.cache
def nnpack_available() -> bool:
    """Whether this PyTorch build has NNPACK (the check also initialises it, which its kernels need)."""
    return bool(torch.backends.nnpack.is_available())


def plain_3x3(conv: nn.Conv2d) -> bool:
    """A 3×3 convolution with stride 1, zero padding 1, no dilation or groups: the one both of srkit's CPU
    rewrites (Winograd here, the 2×2-phase upsampling in upsample_conv.py) compute exactly."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def winograd_applies(
    conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> bool:
    """Whether NNPACK can compute this call (same convolution, Winograd rounding) and is faster for its shape."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 4
        and plain_3x3(conv)
        and min(weight.shape[0], weight.shape[1]) >= MIN_CHANNELS
        and x.shape[2] * x.shape[3] >= MIN_PIXELS
        and not (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        and nnpack_available()
    )


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """3×3 convolution, stride 1, zero padding 1, through NNPACK: one image at a time, in bands of rows.

    NNPACK's workspace is ~2.6× its input (a 128-channel 1024² map: +1.3 GB), so large maps run in bands of at
    most MAX_BAND_ELEMENTS input values, each with a one-row halo (zero rows at the image's edges)."""
    if not nnpack_available():  # also initialises NNPACK: without that its kernels fail
        raise RuntimeError("this PyTorch build has no NNPACK; use torch.nn.functional.conv2d")
    weight = weight.contiguous()
    images, channels, height, width = x.shape
    band = max(1, MAX_BAND_ELEMENTS // (channels * width))
    if images == 1 and band >= height:
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, [1, 1])
    out = x.new_empty(images, weight.shape[0], height, width)
    for image in range(images):
        for top in range(0, height, band):
            bottom = min(top + band, height)
            rows = x[image : image + 1, :, max(top - 1, 0) : bottom + 1]
            rows = F.pad(rows, (0, 0, int(top == 0), int(bottom == height)))  # zero rows at the image edges
            out[image : image + 1, :, top:bottom] = torch._nnpack_spatial_convolution(rows, weight, bias, [0, 1])
    return out


class WinogradConv2d(nn.Conv2d):
    """`nn.Conv2d` that runs through NNPACK when `winograd_applies`, through oneDNN otherwise."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if winograd_applies(self, input, weight, bias):
            return winograd_conv3x3(input, weight, bias)
        return super()._conv_forward(input, weight, bias)


def use_winograd_convolutions(model: nn.Module, enabled: bool = True) -> int:
    """Switch every plain `nn.Conv2d` of `model` to `WinogradConv2d` (or back); returns how many were switched.
    `enabled` asks; `winograd_wanted` (the CPU and SRKIT_CPU_WINOGRAD) decides."""
    target = WinogradConv2d if enabled and winograd_wanted() else nn.Conv2d
    switched = 0
    for module in model.modules():
        if type(module) in (nn.Conv2d, WinogradConv2d):
            module.__class__ = target
            switched += 1
    return switched


__all__ = [
    "ENV_SWITCH",
    "WinogradConv2d",
    "plain_3x3",
    "use_winograd_convolutions",
    "winograd_applies",
    "winograd_conv3x3",
    "winograd_wanted",
]
