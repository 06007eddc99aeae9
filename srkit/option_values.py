"""The names and default texts that options are checked against, with no PyTorch import.

The command line refuses a bad `--color-fix`, `--latent`, `--attention` or `--tagger` before PyTorch loads (which
takes seconds), so these tuples live here; the modules that implement each choice import the same tuple, so the
check and the implementation cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from srkit.common import check_choice

COLOR_FIXES: tuple[str, ...] = ("wavelet", "adain", "none")
"""`--color-fix` (srkit.colorfix)."""
LATENT_MODES: tuple[str, ...] = ("sample", "mode")
"""`--latent`: the seeded VAE posterior sample (upstream) or its mean (srkit.diffusion.latents)."""
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "xformers")
"""`--attention` (srkit.diffusion.runtime)."""
TAGGER_CHOICES: tuple[str, ...] = ("auto", "dape", "ram", "none")
"""`--tagger`: auto = dape when its weights are cached (as upstream), else none with a notice (srkit.taggers)."""
TAG_MODELS: tuple[str, ...] = ("dape", "ram")
"""`srkit tag --tagger`: the tagger networks (srkit.tagging)."""
QUALITY_PROMPT = "clean, high-resolution, 8k"
"""The quality text of the SD2-based SR codebases: GDPO-SR's `--prompt`, SeeSR's `--added_prompt`, ConsisSR's
positive prompt."""


def check_attention(backend: str, device: Any = None) -> None:
    """Refuse an unknown backend, and xformers without CUDA (on `device`, or on this machine when it is not known
    yet) or without the package, with one clear line.  PyTorch is imported only to ask about CUDA for xformers."""
    check_choice(backend, ATTENTION_BACKENDS, "attention")
    if backend == "xformers":
        if device is not None:
            on_cuda = device.type == "cuda"
        else:
            import torch

            on_cuda = torch.cuda.is_available()
        if not on_cuda:
            raise ValueError("--attention xformers needs a CUDA device; use --attention sdpa")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError("--attention xformers needs the xformers package: pip install 'srkit[cuda]'") from None


__all__ = [
    "ATTENTION_BACKENDS",
    "COLOR_FIXES",
    "LATENT_MODES",
    "QUALITY_PROMPT",
    "TAGGER_CHOICES",
    "TAG_MODELS",
    "check_attention",
]
