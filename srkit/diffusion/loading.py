"""Loading the parts of a diffusers folder (UNet, VAE, scheduler config) in float32 on the CPU, frozen.

Engines and recipes move and cast the networks afterwards (`runtime.prepare_module`); a folder that lacks a part
is a one-line `SDLoadError` saying what to pull, never a traceback from deep inside diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

from srkit.diffusion.schedule import NoiseSchedule
from srkit.registry import WeightsError


class SDLoadError(WeightsError):
    """A diffusers folder or an embeddings file is missing or incomplete; the message says what to do."""


def require_part(folder: str | Path, subfolder: str, filename: str = "config.json") -> Path:
    """`folder/subfolder`, after checking that it holds `filename`."""
    path = Path(folder) / subfolder
    if not (path / filename).is_file():
        raise SDLoadError(
            f"{folder} is not a usable diffusers folder ({subfolder}/{filename} is missing); "
            "run `srkit weights pull <base model>` or pass the folder of a complete diffusers model"
        )
    return path


def load_unet(folder: str | Path, subfolder: str = "unet"):
    """The UNet2DConditionModel of a diffusers folder, in float32 on the CPU, eval mode, no gradients."""
    from diffusers import UNet2DConditionModel

    require_part(folder, subfolder)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    return unet.eval().requires_grad_(False)


def load_vae(folder: str | Path, subfolder: str = "vae"):
    """The AutoencoderKL of a diffusers folder, in float32 on the CPU, eval mode, no gradients."""
    from diffusers import AutoencoderKL

    require_part(folder, subfolder)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    return vae.eval().requires_grad_(False)


def load_noise_schedule(folder: str | Path, subfolder: str = "scheduler") -> NoiseSchedule:
    """The noise schedule of a diffusers folder (`scheduler/scheduler_config.json`)."""
    path = require_part(folder, subfolder, "scheduler_config.json") / "scheduler_config.json"
    return NoiseSchedule.from_config(json.loads(path.read_text()))


def has_text_encoder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()


__all__ = ["SDLoadError", "has_text_encoder", "load_noise_schedule", "load_unet", "load_vae", "require_part"]
