"""Where the SD-based one-step SR methods (OSEDiff, NAOSD/GDPO-SR, S3Diff) put their LoRA, and peft's default
scaling they all rely on.  One copy, read by the engines (checkpoint loading), the DG-LoRA layers and the recipes."""

from __future__ import annotations

import re

PEFT_DEFAULT_ALPHA = 8
"""`LoraConfig.lora_alpha` when a script does not set it (peft 0.9 through 0.21): the scaling is 8 / rank."""

UNET_LORA_TARGETS: tuple[str, ...] = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
"""UNet LoRA sites (peft list semantics: a module name equal to one, or ending with "." + one)."""

VAE_ENCODER_LORA_TARGETS: tuple[str, ...] = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0",
)  # fmt: skip
"""VAE LoRA sites, encoder only (the decoder stays frozen)."""


def encoder_regex(targets: tuple[str, ...] = VAE_ENCODER_LORA_TARGETS) -> str:
    """The same sites as one peft regex over the VAE (what S3Diff's checkpoint stores): encoder layers only."""
    return r"^encoder\..*(" + "|".join(re.escape(name) for name in targets) + ")$"


__all__ = ["PEFT_DEFAULT_ALPHA", "UNET_LORA_TARGETS", "VAE_ENCODER_LORA_TARGETS", "encoder_regex"]
