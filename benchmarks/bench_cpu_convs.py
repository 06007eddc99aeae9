"""srkit's CPU convolution choices against PyTorch's default (oneDNN), layer by layer, on the shapes of SD models.

Two rows per shape, same input and weights, one process:
- 3×3 convolutions: oneDNN (what `F.conv2d` runs) vs NNPACK's Winograd kernels (`srkit/nn/winograd_conv.py`),
  and whether srkit's rule picks NNPACK for that shape;
- nearest ×2 upsample + 3×3 convolution: diffusers' way (upsample, then convolve) vs four 2×2 convolutions on the
  low-resolution map (`srkit/nn/upsample_conv.py`).
Reported: median seconds over `--repeats` calls after one warm-up, the speed ratio, and the largest difference
relative to the output's largest magnitude.

`--decoder` adds a whole-model accuracy check: an SD-shaped VAE decoder (random weights) decodes one latent with
PyTorch's kernels and with srkit's, first as initialised, then with outlier channels (the first two channels of
every resnet's second conv scaled by 100 and 1000, giving activations in the thousands, where Winograd's
tile-wide rounding is at its worst); reported: the largest activation and max |difference| of the output.

Run:  .venv/bin/python benchmarks/bench_cpu_convs.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import bench_common
import torch
import torch.nn.functional as F

from srkit.cpu_memory import keep_freed_memory
from srkit.nn.upsample_conv import upsample_conv
from srkit.nn.winograd_conv import WinogradConv2d, winograd_applies, winograd_conv3x3

# (batch, in channels, out channels, side): where SD's VAE and UNet spend their convolution time at 512² output
CONV_SHAPES = [
    (1, 128, 128, 512), (1, 256, 128, 512), (1, 256, 256, 256), (1, 512, 256, 256), (1, 512, 512, 128),
    (1, 512, 512, 64), (2, 320, 320, 64), (2, 640, 640, 32), (2, 1280, 1280, 16), (1, 128, 3, 512),
]  # fmt: skip
# (channels, low-resolution side) of the SD VAE decoder's three upsamplers
UPSAMPLE_SHAPES = [(512, 64), (512, 128), (256, 256)]


def median_seconds(repeats: int, call: Callable[..., torch.Tensor], *args, **kwargs) -> float:
    call(*args, **kwargs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call(*args, **kwargs)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def upsample_then_conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """diffusers' `Upsample2D`: nearest ×2, then the 3×3 convolution."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def conv_rows(repeats: int) -> list[dict]:
    rows = []
    for batch, c_in, c_out, side in CONV_SHAPES:
        x = torch.randn(batch, c_in, side, side)
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).requires_grad_(False)
        reference = F.conv2d(x, conv.weight, conv.bias, padding=1)
        fast = winograd_conv3x3(x, conv.weight, conv.bias)
        onednn = median_seconds(repeats, F.conv2d, x, conv.weight, conv.bias, padding=1)
        nnpack = median_seconds(repeats, winograd_conv3x3, x, conv.weight, conv.bias)
        conv.__class__ = WinogradConv2d
        rows.append({
            "layer": f"conv3x3 b{batch} {c_in}->{c_out} @ {side}²",
            "onednn_s": round(onednn, 4),
            "nnpack_s": round(nnpack, 4),
            "ratio": round(onednn / nnpack, 2),
            "srkit_uses_nnpack": winograd_applies(conv, x, conv.weight, conv.bias),
            "relative_difference": relative_difference(fast, reference),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def upsample_rows(repeats: int) -> list[dict]:
    rows = []
    for channels, side in UPSAMPLE_SHAPES:
        x = torch.randn(1, channels, side, side)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False)

        plain_s = median_seconds(repeats, upsample_then_conv, x, conv)
        phases_s = median_seconds(repeats, upsample_conv, x, conv.weight, conv.bias)
        rows.append({
            "layer": f"nearest x2 + conv3x3 {channels} ch @ {side}² -> {2 * side}²",
            "upsample_then_conv_s": round(plain_s, 4),
            "four_2x2_convs_s": round(phases_s, 4),
            "ratio": round(plain_s / phases_s, 2),
            "relative_difference": relative_difference(
                upsample_conv(x, conv.weight, conv.bias), upsample_then_conv(x, conv)
            ),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def sd_vae_decoder(outlier_scale: float) -> torch.nn.Module:
    """An SD-shaped VAE decoder (random weights) whose resnets' second convs have two channels scaled up."""
    decoder = bench_common.sd_vae().decoder
    for name, module in decoder.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name.endswith("conv2"):
            module.weight[:2] *= outlier_scale
            module.bias[:2] *= outlier_scale
    return decoder


def largest_conv_activation(model: torch.nn.Module, latent: torch.Tensor) -> float:
    outputs: list[float] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out.abs().max().item()))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    model(latent)
    for hook in hooks:
        hook.remove()
    return max(outputs)


def decoder_rows() -> list[dict]:
    from srkit.nn.upsample_conv import use_phase_upsampling
    from srkit.nn.winograd_conv import use_winograd_convolutions

    rows = []
    latent = torch.randn(1, 4, 64, 64)
    for outlier_scale in (1.0, 100.0, 1000.0):
        decoder = sd_vae_decoder(outlier_scale)
        plain = decoder(latent)
        largest = largest_conv_activation(decoder, latent)
        use_phase_upsampling(decoder)
        use_winograd_convolutions(decoder)
        fast = decoder(latent)
        rows.append({
            "decoder": f"SD VAE decoder, 64² latent, outlier channels x{outlier_scale:g}",
            "largest_activation": round(largest, 1),
            "max_abs_difference": (fast - plain).abs().max().item(),
            "max_abs_difference_clamped": (fast.clamp(-1, 1) - plain.clamp(-1, 1)).abs().max().item(),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder", action="store_true", help="also check a whole SD VAE decoder (slower)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    with torch.inference_mode():
        result = {
            "threads": torch.get_num_threads(),
            "conv3x3": conv_rows(args.repeats),
            "upsample_conv": upsample_rows(args.repeats),
        }
        if args.decoder:
            result["decoder"] = decoder_rows()
    bench_common.report(result, args.json)


if __name__ == "__main__":
    main()
