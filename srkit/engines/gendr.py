"""GenDR: an SD2.1 UNet retrained on the 16-channel latent of ostris/vae-kl-f8-d16, distilled to one step.

The authors publish neither code nor weights (notes/gendr-rfsr-consissr-seesr.md), so this engine runs
checkpoints that srkit itself writes (`srkit distill --recipe cid|cida`), in the srkit format defined here:
one safetensors file holding the UNet (`unet.*`), the fixed prompt embedding (`prompt_embeds`, so no text encoder
is needed at inference, as the paper describes) and optionally fine-tuned VAE tensors (`vae.*`), with a JSON config
in the file's header (UNet architecture, α, β, t_s, and the registry name of its VAE).

`--weights` takes that file or a training export folder (`gendr.safetensors` plus the VAE it was trained with in
`vae/`). The latent width is the UNet's: the paper's model reads the 16-channel VAE, a GenDR-style student
distilled from SD2.1-base reads SD's 4-channel one; either VAE comes with the export, or from the registry entry
the checkpoint names (`vae-kl-f8-d16` unless it says otherwise), fetched only when needed.

The one step, as the paper states it: z_g = (z_l − β̄·ε̂(z_l, t_s))/ᾱ with ᾱ = β̄ = 0.5 and t_s = 500 by
default.  ᾱ and β̄ are not schedule values (ᾱ² + β̄² ≠ 1), so this is not `NoiseSchedule.predict_x0`.
Input preparation: bicubic ×4 in float (no upstream code to match, so no 8-bit round trip: 16-bit inputs keep their
precision), reflect-padded to a multiple of 8 for the VAE; the distillation recipe trains on the same step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from srkit.common import atomic_path
from srkit.diffusion.loading import load_vae
from srkit.diffusion.samplers.one_step import gendr_update
from srkit.engines.base import WeightsSet, register
from srkit.engines.one_step import OneStepEngine
from srkit.engines.options import GenDROptions
from srkit.registry import WeightsError

CHECKPOINT_FORMAT = "srkit-gendr"
FORMAT_VERSION = 1
CONFIG_KEY = "srkit_config"
"""safetensors header key holding the JSON config."""
DEFAULTS = {"alpha": 0.5, "beta": 0.5, "timestep": 500}
DEFAULT_VAE = "vae-kl-f8-d16"
"""The registry entry of the paper's VAE: what a checkpoint without a `vae` entry in its config runs on."""
EXPORT_CHECKPOINT = "gendr.safetensors"
EXPORT_VAE = "vae"
"""An export folder: the checkpoint and the diffusers VAE folder it was trained with."""
OBTAIN = (
    "GenDR's weights are not published: train them with `srkit distill --recipe cida --data HR_DIR -o OUT` "
    "(then `--weights OUT/export`) or pass `--weights FILE`"
)


# ---------------------------------------------------------------------------------------------------------------
# srkit-format checkpoint: safetensors tensors + a JSON config in the header


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write tensors and a JSON-serialisable config as one safetensors file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata={CONFIG_KEY: json.dumps(dict(config))})
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and config of an srkit-format checkpoint; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} is not a file; {OBTAIN}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()
            tensors = {key: handle.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path} is not a safetensors file ({exc}); {OBTAIN}") from exc
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path} has no srkit config in its header, so it is not an srkit checkpoint; {OBTAIN}")
    return tensors, json.loads(metadata[CONFIG_KEY])


def save_gendr(
    path: str | Path,
    unet,
    prompt_embeds: torch.Tensor,
    *,
    vae_state: Mapping[str, torch.Tensor] | None = None,
    alpha: float = DEFAULTS["alpha"],
    beta: float = DEFAULTS["beta"],
    timestep: int = DEFAULTS["timestep"],
    vae: str = DEFAULT_VAE,
) -> Path:
    """What a GenDR trainer calls to export: the UNet (weights + architecture), the fixed prompt, α/β/t_s.

    `vae_state` holds only the VAE tensors the trainer changed (e.g. an encoder fine-tune), in diffusers keys;
    `vae` names the registry entry of the VAE to run on when no `vae/` folder travels with the file.
    """
    tensors = {f"unet.{key}": value for key, value in unet.state_dict().items()}
    tensors["prompt_embeds"] = prompt_embeds.reshape(1, *prompt_embeds.shape[-2:])
    tensors.update({f"vae.{key}": value for key, value in (vae_state or {}).items()})
    unet_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    config = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "unet": unet_config,
        "alpha": alpha,
        "beta": beta,
        "timestep": timestep,
        "vae": vae,
    }
    return save_checkpoint(path, tensors, config)


@dataclass(frozen=True)
class GenDRCheckpoint:
    unet_config: dict[str, Any]
    unet_state: dict[str, torch.Tensor]
    vae_state: dict[str, torch.Tensor]
    prompt_embeds: torch.Tensor
    settings: dict[str, float]
    """alpha, beta, timestep as trained."""
    vae: str = DEFAULT_VAE
    """Registry entry of the VAE the UNet was trained on."""

    @classmethod
    def load(cls, path: str | Path) -> GenDRCheckpoint:
        tensors, config = load_checkpoint(path)
        if config.get("format") != CHECKPOINT_FORMAT:
            raise WeightsError(f"{path} is an srkit checkpoint of format '{config.get('format')}', not GenDR")
        if config.get("version", 0) > FORMAT_VERSION:
            raise WeightsError(f"{path} was written by a newer srkit (format version {config['version']}); upgrade")
        if "prompt_embeds" not in tensors or "unet" not in config:
            raise WeightsError(f"{path} lacks the UNet config or the prompt embedding; re-export it")
        return cls(
            unet_config=config["unet"],
            unet_state={k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")},
            vae_state={k.removeprefix("vae."): v for k, v in tensors.items() if k.startswith("vae.")},
            prompt_embeds=tensors["prompt_embeds"].float(),
            settings={key: config.get(key, default) for key, default in DEFAULTS.items()},
            vae=config.get("vae") or DEFAULT_VAE,
        )

    def build_unet(self):
        """The UNet from its config, built on the meta device and filled with the stored tensors (no random init)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(self.unet_config)
        unet.load_state_dict(self.unet_state, strict=True, assign=True)
        return unet.eval().requires_grad_(False)


def load_vae16(folder: Path):
    """GenDR's VAE (16 channels for the paper's model): a bare diffusers VAE folder (ostris layout) or a full model
    folder with vae/."""
    return load_vae(folder, subfolder="vae" if (Path(folder) / "vae" / "config.json").is_file() else "")


def gendr_files(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, VAE folder or None) of what `--weights` points at: a checkpoint file, or an export folder
    with `gendr.safetensors` and the VAE it was trained with in `vae/`."""
    path = Path(path)
    if not path.is_dir():
        return path, None
    checkpoint, vae = path / EXPORT_CHECKPOINT, path / EXPORT_VAE
    if not checkpoint.is_file():
        raise WeightsError(f"{path} is a folder without {EXPORT_CHECKPOINT}, so it is not a GenDR export; {OBTAIN}")
    return checkpoint, vae if (vae / "config.json").is_file() else None


def prepare_bicubic(batch: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """LR in [0,1] -> bicubic ×scale in float, clamped to [0,1] (the model input and the colour-fix reference)."""
    size = (batch.shape[-2] * scale, batch.shape[-1] * scale)
    return F.interpolate(batch.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------------------
# The engine

@register("gendr")
class GenDREngine(OneStepEngine):
    def __init__(self, unet, vae, prompt_embeds, settings: Mapping[str, float], device, dtype, options) -> None:
        super().__init__(unet, vae, prompt_embeds, device, dtype, options)
        # Options win over the checkpoint's trained values, which win over the paper's defaults.
        self.alpha = float(settings["alpha"] if options.alpha is None else options.alpha)
        self.beta = float(settings["beta"] if options.beta is None else options.beta)
        self.timestep = int(settings["timestep"] if options.timestep is None else options.timestep)
        if self.alpha == 0:
            raise ValueError("alpha must not be 0 (the one-step update divides by it)")
        if not 0 <= self.timestep < 1000:
            raise ValueError(f"timestep must be in 0..999, got {self.timestep}")

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: GenDROptions) -> GenDREngine:
        checkpoint_file, bundled_vae = gendr_files(weights["gendr"])
        checkpoint = GenDRCheckpoint.load(checkpoint_file)
        unet = checkpoint.build_unet()
        vae = load_vae16(bundled_vae or weights[checkpoint.vae])
        if checkpoint.vae_state:
            unexpected = vae.load_state_dict(checkpoint.vae_state, strict=False).unexpected_keys
            if unexpected:
                raise WeightsError(f"the checkpoint's VAE tensors do not fit the VAE: {', '.join(unexpected[:3])}")
        check_shapes(unet, vae, checkpoint.prompt_embeds)
        return cls(unet, vae, checkpoint.prompt_embeds, checkpoint.settings, device, dtype, options)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        return prepare_bicubic(batch, self.spec.scale)

    def denoise(self, latents, *, generator=None, noise=None, progress=None):
        # z_g = (z_l − β̄·ε̂(z_l, t_s))/ᾱ, in float32.
        return gendr_update(self.denoiser(progress), latents, self.timestep, self.prompts, self.alpha, self.beta)


def check_shapes(unet, vae, prompt_embeds: torch.Tensor) -> None:
    """The UNet must read and write the VAE's latent channels and accept the stored prompt's width."""
    channels = vae.config.latent_channels
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise WeightsError(
            f"the GenDR UNet has {unet.config.in_channels}/{unet.config.out_channels} in/out channels, "
            f"the VAE {channels} latent channels"
        )
    if prompt_embeds.shape[-1] != unet.config.cross_attention_dim:
        raise WeightsError(
            f"the stored prompt embedding is {prompt_embeds.shape[-1]}-d, the UNet expects "
            f"{unet.config.cross_attention_dim}"
        )


__all__ = [
    "DEFAULT_VAE",
    "EXPORT_CHECKPOINT",
    "EXPORT_VAE",
    "GenDRCheckpoint",
    "GenDREngine",
    "GenDROptions",
    "gendr_files",
    "load_checkpoint",
    "prepare_bicubic",
    "save_checkpoint",
    "save_gendr",
]
