"""S3Diff (Zhang et al., 2024, arXiv:2409.17058): one-step SR on SD-Turbo with degradation-guided LoRA.

The official inference (ArcticHare105/S3Diff, `src/inference_s3diff.py` + `src/s3diff_tile.py`), step by step:
estimate (blur, noise) degrees of the LR with a small CNN, turn them into per-layer r×r matrices that modulate the
LoRA of the VAE encoder and the UNet, upsample ×4 bilinearly, encode, run the UNet once at t = 999 with the fixed
positive and negative prompts (guidance 1.07), take x0, decode, then colour-correct against the upsampled input.
srkit does the same with the same numbers; what differs is speed and reach: prompts are embedded once, the two
guidance passes are one batched UNet call, the LoRA is merged per image, the posterior sample is seeded, and any
image size runs through latent tiles and a tiled VAE.  The procedure is the one-step base's
(`srkit/engines/one_step.py`); S3Diff adds its per-image conditioning (degradation → DG-LoRA), its bilinear
preparation, padding to 64 and the negative-prompt guidance.

Checkpoints: the official `s3diff.pkl` layout is read (with `weights_only=True`) and written, so weights trained
elsewhere or by srkit move both ways.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from srkit.common import atomic_path, one_line
from srkit.diffusion.loading import load_noise_schedule, load_unet, load_vae
from srkit.diffusion.runtime import fp32_region, prepare_module
from srkit.diffusion.samplers.one_step import x0_at
from srkit.diffusion.schedule import NoiseSchedule
from srkit.diffusion.text import NEGATIVE_KEY, prompt_embeddings
from srkit.engines.base import WeightsSet, register
from srkit.engines.one_step import OneStepEngine
from srkit.engines.options import S3DIFF_NEGATIVE_PROMPT as NEGATIVE_PROMPT
from srkit.engines.options import S3DIFF_POSITIVE_PROMPT as POSITIVE_PROMPT
from srkit.engines.options import S3DiffOptions
from srkit.nn.de_net import DegradationEstimator, load_degradation_estimator
from srkit.nn.dg_lora import DegradationGuidance, DGLoRALayer, Modulation, inject, unet_block, vae_block
from srkit.nn.lora_sites import UNET_LORA_TARGETS, encoder_regex

SCALE = 4
TIMESTEP = 999
PAD_MULTIPLE = 64
UNET_TARGETS = list(UNET_LORA_TARGETS)
VAE_TARGETS = encoder_regex()
UNET_ADAPTER, VAE_ADAPTER = "default", "vae_skip"
POSITIVE_KEY = "pos"
"""Key of the positive prompt in a precomputed S3Diff embeddings file (the negative one is `neg`)."""


# ---------------------------------------------------------------------------------------------------------------
# Networks and checkpoints


@dataclass
class S3DiffNetworks:
    """Everything S3Diff runs: SD-Turbo's UNet/VAE with DG-LoRA attached, the guidance MLPs, the estimator."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    guidance: DegradationGuidance
    estimator: DegradationEstimator
    schedule: NoiseSchedule
    unet_modulation: Modulation
    vae_modulation: Modulation
    unet_targets: list[str]
    vae_targets: str

    def set_degradation(self, scores: torch.Tensor) -> None:
        """Per-image modulation matrices for every DG-LoRA layer, from (B, 2) degradation scores (float32)."""
        with fp32_region(scores.device):
            vae_c, unet_c = self.guidance(scores.float())
        self.vae_modulation.matrices = vae_c
        self.unet_modulation.matrices = unet_c

    def set_merge(self, merge: bool) -> None:
        """Merged (one cached merge per image) or unmerged (peft-style) DG-LoRA forward; outputs agree to float
        rounding.  Switching merging off frees the merged-weight buffers."""
        self.unet_modulation.merge = self.vae_modulation.merge = merge
        if not merge:
            for layer in self.lora_layers():
                layer.release_merged()

    def lora_layers(self) -> list[DGLoRALayer]:
        return [m for net in (self.unet, self.vae) for m in net.modules() if isinstance(m, DGLoRALayer)]

    def merged_cache_bytes(self) -> int:
        """Memory held by the per-image merged weights (the price of `lora_merge`)."""
        return sum(layer.merged_bytes for layer in self.lora_layers())


def attach_dg_lora(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    *,
    rank_unet: int = 32,
    rank_vae: int = 16,
    unet_targets: list[str] | None = None,
    vae_targets: str | None = None,
) -> tuple[DegradationGuidance, Modulation, Modulation]:
    """Wrap the S3Diff LoRA sites of a UNet and a VAE encoder (freshly initialised); returns the guidance network
    and the two shared modulations."""
    unet_mod, vae_mod = Modulation(), Modulation()
    inject(unet, unet_targets or UNET_TARGETS, rank_unet, UNET_ADAPTER, unet_block, unet_mod)
    inject(vae, vae_targets or VAE_TARGETS, rank_vae, VAE_ADAPTER, vae_block, vae_mod)
    return DegradationGuidance(rank_vae, rank_unet), unet_mod, vae_mod


_HEAD_PARTS = ("de_mlp", "block_mlp", "fuse_mlp")
"""MLPs of a ModulationHead, stored as `state_dict_{vae,unet}_{part}`."""
_REQUIRED_KEYS = (
    "unet_lora_target_modules", "vae_lora_target_modules", "rank_unet", "rank_vae", "state_dict_unet",
    "state_dict_vae", "w", "state_embeddings",
    *(f"state_dict_{net}_{part}" for net in ("vae", "unet") for part in _HEAD_PARTS),
)  # fmt: skip


def read_checkpoint(path: str | Path) -> dict:
    """An official-layout `s3diff.pkl`, read with `weights_only=True` (tensors, Parameters, lists, str, int)."""
    try:
        checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # weights_only refuses arbitrary objects
        raise ValueError(f"{path} is not a loadable S3Diff checkpoint ({one_line(exc)})") from exc
    missing = [k for k in _REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not an S3Diff checkpoint (missing {', '.join(missing)})")
    return checkpoint


def load_checkpoint_into(unet: torch.nn.Module, vae: torch.nn.Module, checkpoint: dict):
    """Attach DG-LoRA with the checkpoint's ranks and targets and load every stored tensor, strictly."""
    guidance, unet_mod, vae_mod = attach_dg_lora(
        unet,
        vae,
        rank_unet=int(checkpoint["rank_unet"]),
        rank_vae=int(checkpoint["rank_vae"]),
        unet_targets=list(checkpoint["unet_lora_target_modules"]),
        vae_targets=str(checkpoint["vae_lora_target_modules"]),
    )
    _load_partial(unet, checkpoint["state_dict_unet"], "UNet")
    _load_partial(vae, checkpoint["state_dict_vae"], "VAE")
    # The official class sizes the fuse layers from its constructor ranks; the checkpoint's own shapes decide here.
    for net in ("vae", "unet"):
        head = getattr(guidance, net)
        for part in _HEAD_PARTS:
            getattr(head, part).load_state_dict(checkpoint[f"state_dict_{net}_{part}"])
        head.block_embeddings.load_state_dict(checkpoint["state_embeddings"][f"state_dict_{net}_block"])
    guidance.w.data.copy_(checkpoint["w"].detach())
    return guidance, unet_mod, vae_mod


def _load_partial(model: torch.nn.Module, state: dict, label: str) -> None:
    """Load a subset of parameters; every stored key must land, and every LoRA factor must be stored."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the checkpoint's {label} entries do not fit this model: {result.unexpected_keys[:3]}")
    lora_missing = [k for k in result.missing_keys if ".lora_" in k]
    if lora_missing:
        raise ValueError(f"the checkpoint lacks {len(lora_missing)} {label} LoRA tensors, e.g. {lora_missing[0]}")


def checkpoint_state(networks: S3DiffNetworks) -> dict:
    """The official `s3diff.pkl` dictionary for these networks (what `S3Diff.save_model` writes)."""

    def cpu(state: dict) -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    state = {
        "unet_lora_target_modules": list(networks.unet_targets),
        "vae_lora_target_modules": networks.vae_targets,
        "rank_unet": networks.guidance.unet.rank,
        "rank_vae": networks.guidance.vae.rank,
        "state_dict_unet": cpu({k: v for k, v in networks.unet.state_dict().items() if "lora" in k or "conv_in" in k}),
        "state_dict_vae": cpu({k: v for k, v in networks.vae.state_dict().items() if "lora" in k}),
        "w": torch.nn.Parameter(networks.guidance.w.detach().float().cpu().clone(), requires_grad=False),
        "state_embeddings": {
            f"state_dict_{net}_block": cpu(getattr(networks.guidance, net).block_embeddings.state_dict())
            for net in ("vae", "unet")
        },
    }
    for net in ("vae", "unet"):
        head = getattr(networks.guidance, net)
        for part in _HEAD_PARTS:
            state[f"state_dict_{net}_{part}"] = cpu(getattr(head, part).state_dict())
    return state


def save_checkpoint(networks: S3DiffNetworks, path: str | Path) -> Path:
    """Write an official-layout `s3diff.pkl` (loadable by the official code and by srkit)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint_state(networks), tmp)
    return path


def load_networks(base: str | Path, checkpoint: str | Path, de_net: str | Path) -> S3DiffNetworks:
    """SD-Turbo folder + `s3diff.pkl` + `de_net.pth` -> networks in float32 on the CPU."""
    unet, vae = load_unet(base), load_vae(base)
    state = read_checkpoint(checkpoint)
    guidance, unet_mod, vae_mod = load_checkpoint_into(unet, vae, state)
    return S3DiffNetworks(
        unet=unet,
        vae=vae,
        guidance=guidance.eval().requires_grad_(False),
        estimator=load_degradation_estimator(de_net),
        schedule=load_noise_schedule(base),
        unet_modulation=unet_mod,
        vae_modulation=vae_mod,
        unet_targets=list(state["unet_lora_target_modules"]),
        vae_targets=str(state["vae_lora_target_modules"]),
    )


# ---------------------------------------------------------------------------------------------------------------
# The engine


@register("s3diff")
class S3DiffEngine(OneStepEngine):
    pad_multiple = PAD_MULTIPLE

    def __init__(
        self,
        networks: S3DiffNetworks,
        embeddings: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        options: S3DiffOptions,
    ) -> None:
        self.networks = networks
        networks.set_merge(options.lora_merge)
        networks.guidance.to(device)  # float32 always: it computes the modulation matrices
        prepare_module(networks.estimator, device, dtype, part="estimator")
        super().__init__(
            networks.unet, networks.vae, embeddings[POSITIVE_KEY], device, dtype, options, networks.schedule,
            negative_embeds=embeddings[NEGATIVE_KEY], guidance=options.guidance,
        )  # fmt: skip

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: S3DiffOptions) -> S3DiffEngine:
        base = weights["sd-turbo"]
        networks = load_networks(base, weights["s3diff"], weights["s3diff-de-net"])
        embeddings = prompt_embeddings(
            {POSITIVE_KEY: options.prompt, NEGATIVE_KEY: options.negative_prompt},
            folder=base,
            precomputed=options.prompt_embeds,
        )
        return cls(networks, embeddings, torch.device(device), dtype, options)

    def condition(self, batch: torch.Tensor, prepared: torch.Tensor) -> None:
        # Degradation scores of the raw LR (or the user's override) -> modulation of every DG-LoRA layer.
        with torch.inference_mode():
            self.networks.set_degradation(self.degradation_scores(batch.to(self.device, torch.float32)))

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # Bilinear ×4 in float (the base then maps to [-1, 1] and reflect-pads to a multiple of 64).
        lr = batch.to(self.device, torch.float32)
        return F.interpolate(lr, size=(lr.shape[2] * SCALE, lr.shape[3] * SCALE), mode="bilinear")

    def denoise(self, latents, *, generator=None, noise=None, progress=None):
        # Guided ε at t = 999 (positive and negative prompt in one UNet call, latent tiles if large), x0 in fp32.
        return x0_at(self.denoiser(progress), self.schedule, latents, TIMESTEP, self.prompts)

    def degradation_scores(self, lr: torch.Tensor) -> torch.Tensor:
        """(B, 2) = (blur, noise) degrees from the estimator, with --blur/--noise overriding their column."""
        override = (self.options.blur, self.options.noise)
        if None in override:
            with fp32_region(self.device):
                scores = self.networks.estimator(lr.float())
        else:
            scores = lr.new_zeros((lr.shape[0], 2))
        for column, value in enumerate(override):
            if value is not None:
                scores[:, column] = value
        return scores


__all__ = [
    "NEGATIVE_PROMPT",
    "POSITIVE_PROMPT",
    "S3DiffEngine",
    "S3DiffNetworks",
    "S3DiffOptions",
    "attach_dg_lora",
    "checkpoint_state",
    "load_checkpoint_into",
    "load_networks",
    "read_checkpoint",
    "save_checkpoint",
]
