"""The models RFSR tunes, behind the few calls its recipe makes: tag the HR, condition on the LR, the start latent,
a rollout to step k without gradient, x̂0 at step k (of the model or of its frozen reference), decode, export.

- SeeSR: the released SeeSR folders on SD2-base; trainable as released (the whole ControlNet, the UNet's image
  cross-attention); conditioning as its inference: the ×4 control image (pixel ControlNet), RAM/DAPE tokens of the
  LR and the tag prompt; start: the LR latent noised to t = 999; sampler: SD2-base's DDPM over 50 leading steps.
- ConsisSR: the official checkpoint; trainable: its stage-2 set (ControlNet but its text cross-attention, the
  UNet's positional tables, transposed attention and image-branch output, the image-token MLP); conditioning: hint and
  image token of the ×4 LR, the tag prompt; sampler: 50 respaced steps; start: the LR latent noised to t = 999
  (`fast`, as SeeSR's) or x_T ~ N(0, I) (`rollout`, ConsisSR's inference).
Training runs one network pass per step (no guidance), as both papers train.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from srkit.common import atomic_folder
from srkit.diffusion.denoiser import Conditioning
from srkit.diffusion.latents import vae_decode, vae_encode
from srkit.diffusion.samplers.ancestral import AncestralSampler

Resolve = Callable[[str], Path]
START_TIMESTEP = 999


class RFSRModel(Protocol):
    def trainable(self) -> dict[str, nn.Parameter]: ...
    def to(self, device: torch.device) -> RFSRModel: ...
    def tags(self, hr: torch.Tensor) -> list[str]: ...
    def condition(self, lr: torch.Tensor, hr: torch.Tensor, prompts: list[str]) -> Conditioning: ...
    def start(self, cond: Conditioning) -> torch.Tensor: ...
    def rollout(self, x: torch.Tensor, cond: Conditioning, index: int) -> torch.Tensor: ...
    def predict_x0(self, x: torch.Tensor, index: int, cond: Conditioning, reference: bool = False) -> torch.Tensor: ...
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...
    def export(self, folder: Path) -> Path: ...


class ModelBase:
    """What both adapters share: the frozen parts, the sampler, x̂0 at a step, the rollout and the device move."""

    sampler: AncestralSampler
    vae: nn.Module

    def network(self, x: torch.Tensor, t: int, cond: Conditioning, reference: bool) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device):
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        self.device = device
        return self

    def predict_x0(self, x: torch.Tensor, index: int, cond: Conditioning, reference: bool = False) -> torch.Tensor:
        """x̂0 = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t at the sampler's step `index` (with gradient unless `reference`)."""
        t = self.sampler.timesteps[index]
        x0_x, x0_eps, *_ = self.sampler.coefficients(index)
        return x0_x * x.float() - x0_eps * self.network(x, t, cond, reference).float()

    @torch.no_grad()
    def rollout(self, x: torch.Tensor, cond: Conditioning, index: int) -> torch.Tensor:
        """The latent entering step `index`: the sampler's steps 0..index−1 without gradient."""
        for step in range(index):
            eps = self.network(x, self.sampler.timesteps[step], cond, False)
            x = self.sampler.step(step, x, eps, torch.randn_like(x))
        return x.detach()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The image in [0, 1], with gradient through the frozen decoder."""
        return (vae_decode(self.vae, latent).float() / 2 + 0.5).clamp(0, 1)

    def lr_latent_start(self, image: torch.Tensor) -> torch.Tensor:
        """Each element's own LR latent (posterior sample) noised to t = 999 (upstream used element 0 for all)."""
        with torch.no_grad():
            z = vae_encode(self.vae, image * 2 - 1, latent="sample")
        return self.sampler.add_noise(z, torch.randn_like(z), START_TIMESTEP)


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _select(modules: dict[str, nn.Module], keep: Callable[[str, str], bool]) -> dict[str, nn.Parameter]:
    """`prefix.name` -> parameter for the parameters `keep(prefix, name)` selects; they alone require grad."""
    chosen = {}
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            param.requires_grad_(keep(prefix, name))
            if param.requires_grad:
                chosen[f"{prefix}.{name}"] = param
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# SeeSR


class SeeSRModel(ModelBase):
    def __init__(self, nets, vae, text_folder: Path, tagger, base_unet: nn.Module | None, steps: int) -> None:
        from srkit.diffusion.text import TextEncoder
        from srkit.engines.seesr import ddpm_sampler
        from srkit.nn.seesr import SeeSRNets

        self.nets, self.vae, self.tagger = nets, _frozen(vae), tagger
        self.tagger_model = _frozen(tagger.model)
        self.encoder = TextEncoder.from_folder(text_folder)
        self.text_model = self.encoder.model
        self.sampler = ddpm_sampler(text_folder, steps)
        self.unet, self.controlnet = nets.unet.train(), nets.controlnet.train()
        self.base_unet = _frozen(base_unet) if base_unet is not None else None
        self.reference = None
        if base_unet is None:  # srkit's default: a frozen copy of the model being tuned
            self.reference_unet, self.reference_controlnet = (_frozen(copy.deepcopy(m)) for m in (nets.unet, nets.controlnet))
            self.reference = SeeSRNets(self.reference_unet, self.reference_controlnet)
        self.device = torch.device("cpu")

    def trainable(self) -> dict[str, nn.Parameter]:
        """As released: the whole ControlNet and the UNet's `image_attentions`."""
        return _select({"controlnet": self.controlnet, "unet": self.unet},
                       lambda prefix, name: prefix == "controlnet" or "image_attentions" in name)  # fmt: skip

    @torch.no_grad()
    def tags(self, hr: torch.Tensor) -> list[str]:
        return self.tagger.tags(hr)

    def condition(self, lr: torch.Tensor, hr: torch.Tensor, prompts: list[str]) -> Conditioning:
        from srkit.engines.seesr import prepare_batch

        with torch.no_grad():
            control = prepare_batch(lr, process_size=0)
            text = torch.cat([self.encoder(prompt) for prompt in prompts]).to(self.device)
            ram = self.tagger.image_embeds(lr)
        return Conditioning({"text": text.clone(), "ram": ram.clone()}, {"control": control.clone()})

    def start(self, cond: Conditioning) -> torch.Tensor:
        return self.lr_latent_start(cond.maps["control"])

    def network(self, x: torch.Tensor, t: int, cond: Conditioning, reference: bool) -> torch.Tensor:
        text, ram, control = cond.tokens["text"], cond.tokens["ram"], cond.maps["control"]
        if not reference:
            return self.nets.eps(x, t, text, ram, control)
        if self.reference is not None:
            return self.reference.eps(x, t, text, ram, control)
        return self._sd_base_eps(x, t, text, ram, control)

    def _sd_base_eps(self, x, t, text, ram, control) -> torch.Tensor:
        """The released regulariser's network: vanilla SD2-base UNet + the current ControlNet's residuals."""
        from srkit.diffusion.control.diffusers import control_residuals
        from srkit.nn.image_cross_attention import image_token_kwargs

        features = self.nets.embed_control(control)
        residuals = control_residuals(self.controlnet, x, t, text, features, 1.0, image_token_kwargs(ram))
        return self.base_unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=residuals.down,
                              mid_block_additional_residual=residuals.mid).sample  # fmt: skip

    def export(self, folder: Path) -> Path:
        """`unet/` and `controlnet/` as the released folders: `srkit upscale --model seesr --weights EXPORT`."""
        with atomic_folder(folder) as partial:
            self.unet.save_pretrained(partial / "unet")
            self.controlnet.save_pretrained(partial / "controlnet")
        return folder


def load_seesr_model(settings, base: Path | None, resolve: Resolve) -> SeeSRModel:
    from srkit.convert.seesr import load_base_unet, load_seesr
    from srkit.diffusion.loading import load_vae
    from srkit.taggers import TAGGER_WEIGHTS, build_tagger

    seesr = base if base is not None else resolve("seesr")
    text_folder = resolve("sd2-base")
    tagger = build_tagger("dape", {name: resolve(name) for name in TAGGER_WEIGHTS["dape"]}, torch.device("cpu"))
    base_unet = load_base_unet(resolve("sd2-base-unet")) if settings.reference == "sd_base" else None
    return SeeSRModel(load_seesr(seesr), load_vae(text_folder), text_folder, tagger, base_unet, settings.sampler_steps)


# ---------------------------------------------------------------------------------------------------------------
# ConsisSR


class ConsisSRModel(ModelBase):
    def __init__(self, nets, tagger, steps: int, mode: str) -> None:
        from srkit.diffusion.samplers.ancestral import respaced_timesteps

        self.nets, self.tagger, self.mode = nets, tagger, mode
        self.tagger_model = _frozen(tagger.model) if tagger is not None else None
        self.vae = _frozen(nets.vae)
        _frozen(nets.hint_encoder)
        self.sampler = AncestralSampler.build(respaced_timesteps(steps), nets.schedule.alphas_cumprod())
        self.reference = _frozen(copy.deepcopy(nets))
        self.device = torch.device("cpu")

    def trainable(self) -> dict[str, nn.Parameter]:
        """ConsisSR's stage-2 set (`srkit/train/consissr_trainable.py`)."""
        from srkit.train.consissr_trainable import select_trainable, stage2_trainable

        return select_trainable(self.nets, stage2_trainable)

    @torch.no_grad()
    def tags(self, hr: torch.Tensor) -> list[str]:
        return self.tagger.tags(hr) if self.tagger is not None else [""] * hr.shape[0]

    def condition(self, lr: torch.Tensor, hr: torch.Tensor, prompts: list[str]) -> Conditioning:
        from srkit.engines.consissr import pad_zeros, prepare_batch

        with torch.no_grad():
            control = pad_zeros(prepare_batch(lr, process_size=0)) * 2 - 1  # the ×4 LR, no enlargement
            text = self.nets.encode_text(prompts).clone()
            hint = self.nets.hint(control).clone()
        return Conditioning({"text": text}, {"control": control, "hint": hint})

    def start(self, cond: Conditioning) -> torch.Tensor:
        control = cond.maps["control"]
        if self.mode == "fast":
            return self.lr_latent_start(control / 2 + 0.5)
        shape = (control.shape[0], 4, control.shape[-2] // 8, control.shape[-1] // 8)
        return torch.randn(shape, device=control.device)

    def network(self, x: torch.Tensor, t: int, cond: Conditioning, reference: bool) -> torch.Tensor:
        nets = self.reference if reference else self.nets
        control = cond.maps["control"]
        context = nets.context(nets.image_token(control), cond.tokens["text"])
        return nets.eps(x, t, context, nets.embed_hint(cond.maps["hint"]))

    def export(self, folder: Path) -> Path:
        """The official checkpoint layout (+ its model config): `srkit upscale --model consissr --weights EXPORT`."""
        from srkit.engines.consissr import save_export

        return save_export(self.nets, folder)


def load_consissr_model(settings, base: Path | None, resolve: Resolve) -> ConsisSRModel:
    from srkit.engines.consissr import load_export
    from srkit.taggers import TAGGER_WEIGHTS, build_tagger

    path = base if base is not None else resolve("consissr")
    nets = load_export(path, settings.model_config, settings.clip_config)
    tagger = build_tagger("dape", {name: resolve(name) for name in TAGGER_WEIGHTS["dape"]}, torch.device("cpu"))
    return ConsisSRModel(nets, tagger, settings.sampler_steps, settings.mode)


MODELS: dict[str, Callable] = {"seesr": load_seesr_model, "consissr": load_consissr_model}


def load_rfsr_model(settings, base: Path | None, resolve: Resolve) -> RFSRModel:
    return MODELS[settings.model](settings, base, resolve)


__all__ = ["MODELS", "ConsisSRModel", "RFSRModel", "SeeSRModel", "load_rfsr_model"]
