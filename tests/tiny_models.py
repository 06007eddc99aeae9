"""A tiny model in the official weights layout for every registered engine, for the engine contract test.

`TINY_MODELS[name](folder)` writes the weights an engine needs into `folder` and returns (registry key -> path,
options); options replace what a tiny model cannot have (a text encoder: precomputed prompt embeddings instead).
`NEEDS_WEIGHTS[name]` says why an engine cannot be built from a tiny model, for engines that cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import compact_state_dict
from tiny_sd import SD2_SCHEDULER, tiny_unet, tiny_vae, write_scheduler, write_text_side

from srkit.diffusion.text import NEGATIVE_KEY, PROMPT_KEY, save_prompt_embeddings

CROSS_DIM = 8
Built = tuple[dict[str, Path], dict[str, Any]]


def _rrdb(folder: Path, name: str, scale: int, shuffle: int | None = None) -> Path:
    """An RRDBNet (1 block, 8 filters) in the layout spandrel recognises, saved like the release files."""
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    path = folder / f"{name}.pth"
    torch.save({"params_ema": ESRGAN(num_filters=8, num_blocks=1, scale=scale, shuffle_factor=shuffle).state_dict()}, path)
    return path


def _compact(folder: Path, name: str, seed: int = 0) -> Path:
    path = folder / f"{name}.pth"
    torch.save({"params_ema": compact_state_dict(seed=seed)}, path)
    return path


def _gan(name: str, scale: int = 4, shuffle: int | None = None) -> Callable[[Path], Built]:
    return lambda folder: ({name: _rrdb(folder, name, scale, shuffle)}, {})


def _general_x4v3(folder: Path) -> Built:
    weights = {
        "realesr-general-x4v3": _compact(folder, "general", seed=0),
        "realesr-general-wdn-x4v3": _compact(folder, "general-wdn", seed=1),
    }
    return weights, {"denoise_strength": 0.5}


def _sd_folder(folder: Path, scheduler: dict | None = None) -> Path:
    """unet/, vae/ and scheduler/ of a tiny SD2-layout model."""
    tiny_unet(seed=0).save_pretrained(folder / "unet")
    tiny_vae(seed=1).save_pretrained(folder / "vae")
    write_scheduler(folder, scheduler)
    return folder


def _prompts(folder: Path, *keys: str) -> Path:
    gen = torch.Generator().manual_seed(2)
    table = {key: torch.randn(1, 77, CROSS_DIM, generator=gen) for key in keys}
    return save_prompt_embeddings(folder / "prompts.safetensors", table)


def _osediff(folder: Path) -> Built:
    base = _sd_folder(folder / "base", SD2_SCHEDULER)
    checkpoint = folder / "osediff.pkl"
    empty = {"state_dict_unet": {}, "state_dict_vae": {}, "rank_unet": 4, "rank_vae": 4,
             "vae_lora_encoder_modules": [], "unet_lora_encoder_modules": []}  # fmt: skip
    torch.save(empty, checkpoint)
    weights = {"osediff": checkpoint, "sd21-base": base, "sd21-text": base}
    return weights, {"prompt_embeds": str(_prompts(folder, PROMPT_KEY))}


def _noise_injection(name: str) -> Callable[[Path], Built]:
    def build(folder: Path) -> Built:
        merged = _sd_folder(folder / "merged", SD2_SCHEDULER)
        return {name: merged, "sd21-text": merged}, {"prompt_embeds": str(_prompts(folder, PROMPT_KEY))}

    return build


def _gendr(folder: Path) -> Built:
    """srkit's GenDR export folder: the checkpoint and, in vae/, the 16-channel VAE it runs on."""
    from srkit.engines.gendr import save_gendr

    tiny_vae(seed=1, latent_channels=16, scaling_factor=0.24447420268654824).save_pretrained(folder / "vae")
    prompt = torch.randn(1, 77, CROSS_DIM, generator=torch.Generator().manual_seed(5))
    save_gendr(folder / "gendr.safetensors", tiny_unet(seed=0, in_channels=16, out_channels=16), prompt)
    return {"gendr": folder}, {}


def _s3diff(folder: Path) -> Built:
    from srkit.diffusion.loading import load_noise_schedule
    from srkit.engines.s3diff import (
        UNET_TARGETS,
        VAE_TARGETS,
        S3DiffNetworks,
        attach_dg_lora,
        save_checkpoint,
    )
    from srkit.nn.de_net import DegradationEstimator

    base = folder / "base"
    unet, vae = tiny_unet(seed=0), tiny_vae(seed=1)
    unet.save_pretrained(base / "unet")
    vae.save_pretrained(base / "vae")
    write_scheduler(base)
    guidance, unet_mod, vae_mod = attach_dg_lora(unet, vae, rank_unet=4, rank_vae=2)
    nets = S3DiffNetworks(unet, vae, guidance, DegradationEstimator(), load_noise_schedule(base), unet_mod, vae_mod,
                          UNET_TARGETS, VAE_TARGETS)  # fmt: skip
    save_checkpoint(nets, folder / "s3diff.pkl")
    torch.save(DegradationEstimator().state_dict(), folder / "de_net.pth")
    weights = {"s3diff": folder / "s3diff.pkl", "s3diff-de-net": folder / "de_net.pth", "sd-turbo": base}
    return weights, {"prompt_embeds": str(_prompts(folder, "pos", NEGATIVE_KEY))}


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""An OpenCLIP config small enough for tests (the tokenizer's vocabulary size is fixed)."""


def tiny_consissr(folder: Path, latent_size: int = 64, seed: int = 0) -> Built:
    """An official-layout ConsisSR Lightning checkpoint of tiny random networks (every weight non-zero, unlike a
    fresh init whose zero convs would hide the ControlNet), with its model yaml and OpenCLIP json."""
    import json

    import yaml

    from srkit.convert.consissr import ldm_model_config, save_consissr
    from srkit.nn.consissr import ConsisSRArchitecture, ConsisSRNets

    architecture = ConsisSRArchitecture(
        model_channels=32, num_head_channels=16, context_dim=32, vae_channels=32, vae_channel_mult=(1, 1, 2, 2),
        latent_size=latent_size, clip=TINY_CLIP,
    )  # fmt: skip
    nets = ConsisSRNets(architecture)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in nets.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # normalisation gains near 1
            param.copy_(centre + 0.05 * torch.randn(param.shape, generator=gen))
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "consissr.yaml"
    config.write_text(yaml.safe_dump(ldm_model_config(architecture, nets.schedule)))
    clip = folder / "openclip.json"
    clip.write_text(json.dumps(TINY_CLIP))
    checkpoint = save_consissr(nets, folder / "ConsisSR.ckpt")
    return {"consissr": checkpoint}, {"model_config": str(config), "clip_config": str(clip), "steps": 2}


TINY_RAM_SWIN = {"vision_width": 64, "image_res": 384, "window_size": 12, "embed_dim": 8, "depths": [1, 1, 1, 1],
                 "num_heads": [1, 2, 2, 4]}  # fmt: skip
TINY_RAM_Q2L = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
                "layer_norm_eps": 1e-12, "hidden_act": "gelu"}  # fmt: skip
TAG_NAMES = ("sky", "tree", "house", "dog", "road", "flower", "car", "person")


def tiny_tagger(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A random tiny RAM in the official checkpoint layout (`{"model": ...}`, head under `vision_multi`), its tag
    list and thresholds (0.5: about half the tags fire), and a DAPE file of loralib pairs: the registry files of
    `--tagger dape`."""
    from srkit.taggers.ram import RAM

    torch.manual_seed(seed)
    model = RAM(len(TAG_NAMES), TINY_RAM_SWIN, TINY_RAM_Q2L)
    with torch.no_grad():  # distinct class queries and logits around 0, so tags differ between images
        model.label_embed.normal_(0, 1)
        model.fc.bias.zero_()
    folder.mkdir(parents=True, exist_ok=True)
    state = {key.replace("tagging_head", "vision_multi"): value for key, value in model.state_dict().items()}
    torch.save({"model": state}, folder / "ram.pth")
    gen = torch.Generator().manual_seed(seed + 1)
    dape = {"visual_encoder.layers.0.blocks.0.attn.proj.lora_A": torch.randn(4, 8, generator=gen) * 0.1,
            "visual_encoder.layers.0.blocks.0.attn.proj.lora_B": torch.randn(8, 4, generator=gen) * 0.1}  # fmt: skip
    torch.save(dape, folder / "dape.pth")
    (folder / "tags.txt").write_text("\n".join(TAG_NAMES))
    (folder / "thresholds.txt").write_text("\n".join(["0.5"] * len(TAG_NAMES)) + "\n")
    return {"ram-swin-large-14m": folder / "ram.pth", "dape": folder / "dape.pth",
            "ram-tag-list": folder / "tags.txt", "ram-tag-thresholds": folder / "thresholds.txt"}  # fmt: skip


def tiny_seesr(folder: Path, seed: int = 0) -> Built:
    """SeeSR's released layout in miniature: `seesr/{unet,controlnet}` (image cross-attention on 512-wide RAM
    tokens, config flag set), an SD2-base side (VAE, text encoder, tokenizer, scheduler) and the tiny tagger;
    ControlNet zero convs get random values so the ControlNet matters."""
    from diffusers import ControlNetModel

    from srkit.nn.image_cross_attention import add_image_cross_attention

    torch.manual_seed(seed)
    unet = tiny_unet(seed=seed, cross_attention_dim=CROSS_DIM)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    unet, controlnet = add_image_cross_attention(unet), add_image_cross_attention(controlnet)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    unet.save_pretrained(folder / "seesr" / "unet")
    controlnet.save_pretrained(folder / "seesr" / "controlnet")
    base = write_text_side(folder / "sd2-base", CROSS_DIM)
    tiny_vae(seed=1).save_pretrained(base / "vae")
    weights = {"seesr": folder / "seesr", "sd2-base": base, **tiny_tagger(folder / "tagger")}
    return weights, {"steps": 2, "latent_tile": 16, "latent_overlap": 4}


TINY_MODELS: dict[str, Callable[[Path], Built]] = {
    "realesrgan-x4plus": _gan("realesrgan-x4plus"),
    "realesrnet-x4plus": _gan("realesrnet-x4plus"),
    "realesrgan-x4plus-anime-6b": _gan("realesrgan-x4plus-anime-6b"),
    "realesrgan-x2plus": _gan("realesrgan-x2plus", scale=2, shuffle=2),
    "realesr-animevideov3": lambda folder: ({"realesr-animevideov3": _compact(folder, "animevideov3")}, {}),
    "realesr-general-x4v3": _general_x4v3,
    "osediff": _osediff,
    "naosd": _noise_injection("naosd"),
    "gdpo": _noise_injection("gdpo"),
    "gendr": _gendr,
    "s3diff": _s3diff,
    "consissr": tiny_consissr,
    "seesr": tiny_seesr,
}

def build_engine(name: str, built: Built, **options):
    """The engine `name` from a tiny model's files through `from_weights` (CPU, fp32), options over its defaults."""
    from srkit.common import build_options
    from srkit.engines.base import WeightsSet, get_engine

    paths, defaults = built
    engine_class, _ = get_engine(name)
    values = build_options(engine_class.options_class, {**defaults, **options})
    return engine_class.from_weights(WeightsSet(paths), torch.device("cpu"), torch.float32, values)


def check_seeded_upscale(engine, image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Upscale with seed 0: the expected shape, values in [0, 1], the same again with seed 0, not with seed 1."""

    def run(seed: int) -> torch.Tensor:
        return engine.upscale(image, generator=torch.Generator().manual_seed(seed))

    out = run(0)
    assert out.shape == shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, run(0)) and not torch.equal(out, run(1))
    return out


NEEDS_WEIGHTS: dict[str, str] = {}
"""Engines that cannot be built from a tiny model, and why (none so far)."""
