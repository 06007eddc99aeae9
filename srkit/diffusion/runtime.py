"""Precision, attention kernels and compilation of diffusion networks: one place that applies how they run.

- Mixed precision on CUDA is torch.autocast over half-precision weights; `fp32_region()` marks the numerically
  sensitive parts (x0 formula, modulation matrices, colour fix) and keeps them fp32 under any autocast, CUDA's or
  the CPU's.  CPU runs never enter a CUDA-only branch (xformers, fp16, CUDA compile modes).
- On the CPU, `prepare_module` gives each network part the dtype and kernels `srkit.cpu_features` chose for this
  CPU (bf16 weights where measured faster and within the quality gates, channels-last, NNPACK Winograd, 2×2-phase
  upsampling); a part kept in fp32 there really computes in fp32.  On CUDA the original layers run.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch

from srkit.cpu_features import Kernels, kernels_for
from srkit.option_values import ATTENTION_BACKENDS, check_attention

AttentionBackend = Literal["sdpa", "xformers"]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """fp16/bf16 autocast on CUDA; a no-op on the CPU and in float32.  On the CPU each part computes in the dtype
    of its weights (`prepare_module`), so a part kept in fp32 next to bf16 parts is not cast down."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Code inside runs in float32 even inside an autocast on `device` (CUDA's, or a CPU autocast the caller
    opened): the x0 formula, modulation matrices, colour fix.  Tensors must still arrive as float32 (`.float()`)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def inference(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """inference_mode + (CUDA) autocast: the context every diffusion engine's `upscale` body runs in."""
    with torch.inference_mode(), autocast(device, dtype):
        yield


def vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a VAE in: fp16 is upcast to fp32 when the VAE config says it overflows (`force_upcast`)."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def prepare_module(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype, part: str = "other"
) -> torch.nn.Module:
    """Move network `part` (one of `srkit.cpu_features.PARTS`: "unet", "vae", "gan", ...) to its device, in the
    dtype and with the kernels `kernels_for(part, device, dtype)` chose, and return it.  Engines read the dtype
    back from the module (`module_dtype`): on the CPU a part may stay fp32 in a bf16 engine.

    On CUDA: `dtype` and the original layers.  On the CPU (what `srkit info` prints): bf16 weights where measured
    faster and within the quality gates; channels-last feature maps where measured faster; each nearest ×2
    upsample + 3×3 conv as four 2×2 convolutions on the low-resolution map (`srkit/nn/upsample_conv.py`: 2.25×
    fewer FLOPs); 3×3 convolutions on large maps through NNPACK's Winograd kernels where they beat oneDNN
    (`srkit/nn/winograd_conv.py`, AVX2).  "other" (a part nobody measured yet) stays fp32 on the CPU.
    """
    return apply_kernels(module, device, kernels_for(part, device, dtype))


def apply_kernels(module: torch.nn.Module, device: torch.device, kernels: Kernels) -> torch.nn.Module:
    """Put `module` on `device` in `kernels`' dtype, memory format and convolution kernels (any choice: the
    benchmarks compare choices with it; engines use `prepare_module`)."""
    from srkit.nn.fp32_ends import conv_ends, keep_ends_fp32, release_ends
    from srkit.nn.winograd_conv import use_winograd_convolutions

    release_ends(module)
    ends = conv_ends(module) if kernels.layout.fp32_ends and kernels.dtype != torch.float32 else []
    fp32_tensors = {id(t) for end in ends for t in end.parameters()}

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor.to(device)
        return tensor.to(device, torch.float32 if id(tensor) in fp32_tensors else kernels.dtype)

    # torch's own `to` logic, tensor by tensor (the ends' weights never take a round trip through bf16); not
    # diffusers' `to`, which warns about fp32-only modules on every cast even for models that have none.
    torch.nn.Module._apply(module, convert)
    module.to(memory_format=torch.channels_last if kernels.channels_last else torch.contiguous_format)
    if ends:
        keep_ends_fp32(module, kernels.dtype)
    use_winograd_convolutions(module, enabled=kernels.winograd)
    if kernels.phase_upsampling or "srkit.nn.upsample_conv" in sys.modules:  # a GAN never imports diffusers
        from srkit.nn.upsample_conv import use_phase_upsampling

        use_phase_upsampling(module, enabled=kernels.phase_upsampling)
    return module


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a prepared network computes in (that of its first floating-point parameter)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def prepare_networks(
    device: torch.device, dtype: torch.dtype, denoising: Iterable[torch.nn.Module], vae: torch.nn.Module
) -> None:
    """A diffusion engine's networks on the device: the denoising ones (UNet, ControlNet, hint encoder: part
    "unet") in `dtype`, the VAE (part "vae") in the dtype it can run in (`vae_dtype`), each with the dtype and
    kernels chosen for its part (`prepare_module`; on the CPU a part may stay fp32 in a bf16 engine)."""
    for module in denoising:
        prepare_module(module, device, dtype, part="unet")
    prepare_module(vae, device, vae_dtype(vae, dtype), part="vae")


def set_attention(module: torch.nn.Module, backend: str, device: torch.device) -> None:
    """Select the attention kernels of a diffusers model: PyTorch SDPA (default) or xformers (CUDA, opt-in)."""
    check_attention(backend, device)
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0())
    else:
        module.enable_xformers_memory_efficient_attention()


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """torch.compile for fixed shapes (latent tiles all have one size), or `fn` unchanged.

    `dynamic=False` because every tile has the same shape; a different image size costs one recompile.
    """
    if not enabled:
        return fn
    return torch.compile(fn, dynamic=False)


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "apply_kernels",
    "autocast",
    "check_attention",
    "fp32_region",
    "inference",
    "maybe_compile",
    "module_dtype",
    "prepare_module",
    "prepare_networks",
    "set_attention",
    "vae_dtype",
]
