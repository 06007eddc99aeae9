"""Precision, attention kernels and compilation of diffusion networks: one place that decides how they run.

- Mixed precision is torch.autocast on CUDA only; `fp32_region()` marks the numerically sensitive parts (x0 formula,
  modulation matrices, colour fix).  CPU runs stay plain fp32 and never enter a CUDA-only branch (xformers, half
  precision, CUDA compile modes).
- On the CPU, srkit picks its own convolution kernels (`prepare_module`); on CUDA the original layers run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch

AttentionBackend = Literal["sdpa", "xformers"]
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "xformers")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """fp16/bf16 autocast on CUDA; a no-op on the CPU and in float32 (CPU runs stay plain fp32)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Code inside runs in float32 even inside `autocast` (x0 formula, modulation matrices, colour fix)."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
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


def prepare_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a network to its device and dtype (no-op when already there) and pick its CPU computations.

    On the CPU every nearest ×2 upsample + 3×3 conv runs as four 2×2 convolutions on the low-resolution map
    (`srkit/nn/upsample_conv.py`: 2.25× fewer FLOPs, same result up to rounding), and 3×3 convolutions on large
    maps run through NNPACK's Winograd kernels (`srkit/nn/winograd_conv.py`: 2–4× faster per layer, ~1e-5
    relative rounding; on the CPUs where that was measured, see `winograd_wanted`).  On CUDA the original layers
    run (not measured there).
    Deliberately no channels-last on the CPU: measured slower for the SD VAE decoder with oneDNN, and its
    different summation order moves S3Diff outputs by ~5e-3 (x0 amplifies ε errors ~15x).
    """
    first = next(module.parameters())
    if first.device != device or first.dtype != dtype:
        module.to(device=device, dtype=dtype)
    from srkit.nn.upsample_conv import use_phase_upsampling  # imports diffusers: only when a model is built
    from srkit.nn.winograd_conv import use_winograd_convolutions

    use_phase_upsampling(module, enabled=device.type == "cpu")
    use_winograd_convolutions(module, enabled=device.type == "cpu")
    return module


def prepare_networks(
    device: torch.device, dtype: torch.dtype, denoising: Iterable[torch.nn.Module], vae: torch.nn.Module
) -> None:
    """A diffusion engine's networks on the device: the denoising ones in `dtype`, the VAE in the dtype it can
    run in (`vae_dtype`), each with srkit's CPU kernels (`prepare_module`)."""
    for module in denoising:
        prepare_module(module, device, dtype)
    prepare_module(vae, device, vae_dtype(vae, dtype))


def set_attention(module: torch.nn.Module, backend: str, device: torch.device) -> None:
    """Select the attention kernels of a diffusers model: PyTorch SDPA (default) or xformers (CUDA, opt-in)."""
    check_attention(backend, device)
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0())
    else:
        module.enable_xformers_memory_efficient_attention()


def check_attention(backend: str, device: torch.device | None = None) -> None:
    """Refuse an unknown backend, and xformers without CUDA (on `device`, or on this machine when it is not known
    yet) or without the package, with one clear line."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; use {' or '.join(ATTENTION_BACKENDS)}")
    if backend == "xformers":
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if not on_cuda:
            raise ValueError("--attention xformers needs a CUDA device; use --attention sdpa")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError("--attention xformers needs the xformers package: pip install 'srkit[cuda]'") from None


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
    "autocast",
    "check_attention",
    "fp32_region",
    "inference",
    "maybe_compile",
    "prepare_module",
    "prepare_networks",
    "set_attention",
    "vae_dtype",
]
