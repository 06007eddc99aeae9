"""What the engine benchmarks share: the command line's start, the CPU setting `srkit upscale` uses, and the facts
about the machine every report must carry (a speed-up measured on one CPU kind is a claim about that kind)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from srkit.cpu_features import detect
from srkit.cpu_memory import keep_freed_memory


def start(doc: str) -> argparse.ArgumentParser:
    """A parser titled by the script's first docstring paragraph; keeps freed memory as srkit does on the CPU."""
    keep_freed_memory()
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def machine() -> dict:
    """Threads, PyTorch's CPU capability (AVX2, AVX512, ...), the processor and the CPU features srkit's choice of
    dtype and kernels follows (`srkit.cpu_features`), for the results."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "cpu": detect().summary(),
    }


def report(results: dict | list, json_path: Path | None) -> None:
    """Print the results as JSON, and write the same text to `--json` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text)


# ---------------------------------------------------------------------------------------------------------------
# Random networks with SD2's shapes: speed depends on the shapes, not the values, so every benchmark that times an
# SD2-based engine without its weights builds the same three.


def sd2_unet(channels: int = 4):
    """SD 2.x's UNet (865M parameters: SD2.1-base, SD-Turbo, SeeSR's base) with random weights, seeded."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=channels, out_channels=channels, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024, use_linear_projection=True,
    ).eval().requires_grad_(False)  # fmt: skip


def sd_vae(latent_channels: int = 4):
    """The SD VAE (83M parameters; 16 latent channels: ostris/vae-kl-f8-d16's shape) with random weights, seeded."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=latent_channels,
        sample_size=768,
    ).eval().requires_grad_(False)  # fmt: skip


def sd2_text_encoder():
    """SD 2.x's text tower (OpenCLIP ViT-H's, 23 of its 24 layers as SD2 uses them) with random weights, seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    config = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                            projection_dim=1024, hidden_act="gelu")  # fmt: skip
    return CLIPTextModel(config).eval().requires_grad_(False)
