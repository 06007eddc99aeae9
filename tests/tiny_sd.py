"""Tiny random Stable-Diffusion-layout models (SD2 block types, linear attention projections) for the tests.

Every engine test needs a UNet/VAE pair in the diffusers format that builds and runs in a fraction of a second;
the shapes differ per test only in a few arguments, which callers pass as overrides.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from srkit.diffusion.schedule import SD_TURBO_SCHEDULER


def tiny_unet(seed: int | None = None, **overrides):
    """A 4-level SD2-style UNet (8/8/16/16 channels, cross-attention dim 8) in eval mode."""
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    config = {
        "sample_size": 16,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 8,
        "attention_head_dim": 4,
        "norm_num_groups": 4,
        "use_linear_projection": True,
    }
    return UNet2DConditionModel(**{**config, **overrides}).eval()


TWO_LEVELS = {
    "block_out_channels": (8, 16), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "attention_head_dim": 8,
}  # fmt: skip
"""Overrides of `tiny_unet` for an even smaller two-level UNet (attention at the low resolution only)."""


def tiny_vae(seed: int | None = None, **overrides):
    """A 4-level SD-style AutoencoderKL (8/8/16/16 channels, 4 latent channels) in eval mode."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    config = {
        "block_out_channels": (8, 8, 16, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 4,
        "sample_size": 32,
    }
    return AutoencoderKL(**{**config, **overrides}).eval()


def write_scheduler(folder: Path, config: dict | None = None) -> None:
    """`folder/scheduler/scheduler_config.json` (SD-Turbo's values unless given)."""
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config or SD_TURBO_SCHEDULER))


SD2_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
"""SD 2.1-base's scheduler config (the `sd21-text` entry's scheduler)."""


def write_text_side(folder: Path, cross_dim: int = 16) -> Path:
    """The `sd21-text` layout: a character-level CLIP tokenizer, a 2-layer CLIP text model, the SD2 scheduler."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokens = folder / "tokenizer"
    tokens.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,-":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (tokens / "vocab.json").write_text(json.dumps(vocab))
    (tokens / "merges.txt").write_text("#version: 0.2\n")
    (tokens / "special_tokens_map.json").write_text(json.dumps(special))
    (tokens / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special})
    )
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=cross_dim,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    write_scheduler(folder, SD2_SCHEDULER)
    return folder
