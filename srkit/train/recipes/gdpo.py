"""GDPO-SR fine-tuning (GDPO-SR paper, stage 2): group preference optimisation of a NAOSD model (notes §4).

Per LR image: one VAE posterior latent, G noises at t_noise = 250, the frozen reference UNet told t = 100 → G SR
samples; each is scored (PSNR-Y against the HR for fidelity, MUSIQ and MANIQA for detail), the scores are min-max
normalised within the group and mixed by the HR's smooth/texture ratios (ARF) → group-relative advantages.  The
policy (reference + a fresh rank-4 LoRA, so policy = reference at step 0) and the reference then predict the noise
of the same re-noised samples, and the GDPO loss pushes above-average samples to a lower denoising error than the
reference's (ω = 5000).

Reward metrics are pluggable: any `srkit.bench.metrics` image metric name (`reward_metrics`), or callables
`(sr, hr) -> float` on H×W×3 float arrays in [0, 1] passed to the recipe (tests use randomly initialised networks
this way; MUSIQ/MANIQA need pyiqa and their weights).  Prompts: the fixed positive prompt (no tagger yet; upstream
tags each HR with RAM).  Export: merged diffusers `unet/` + the base `vae/`, for `--model gdpo --weights DIR`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srkit.diffusion.denoiser import Conditioning, UNetDenoiser
from srkit.diffusion.latents import vae_decode, vae_encode
from srkit.diffusion.loading import load_unet, load_vae
from srkit.diffusion.samplers.one_step import noise_injected_x0
from srkit.diffusion.text import PROMPT_KEY, QUALITY_PROMPT, compose_prompt
from srkit.engines.osediff import training_input
from srkit.nn.lora_sites import UNET_LORA_TARGETS
from srkit.train.lora import add_lora, merged_copy, target_modules
from srkit.train.losses import GDPO_OMEGA, gdpo_loss, per_sample_error
from srkit.train.recipes import RecipeInputs, TextSide
from srkit.train.recipes.sd_recipe import SDRecipe
from srkit.train.rewards import arf_rewards, attribute_ratios, group_advantages

RewardMetric = Callable[[np.ndarray, np.ndarray], float]
FIDELITY_METRICS = frozenset({"psnr", "ssim"})
"""Reward metrics that measure fidelity to the HR (weighted by the smooth ratio); the others weigh by texture."""


@dataclass
class GDPOSettings:
    """Hyper-parameters with the paper's / official script's defaults (notes §4)."""

    group_size: int = 6
    """Samples G per LR image from the frozen reference [paper and script: --groupsize=6]."""
    t_noise: int = 250
    """Noise-injection timestep of the samples and of the preference loss [paper and script: 250]."""
    t_diff: int = 100
    """Timestep the UNet is told [paper and script: --time_step=100]."""
    rank_unet: int = 4
    """Rank of the policy's fresh LoRA [script: --lora_rank_unet=4]."""
    omega: float = GDPO_OMEGA
    """ω of the Diffusion-DPO-style loss [script: 5000, hard-coded]."""
    reward_metrics: str = "psnr,musiq,maniqa"
    """Comma-separated srkit metric names; psnr/ssim count as fidelity, the rest as detail (ARF) [paper]."""
    official_gray: bool = True
    """Smooth/texture split on OpenCV's BGR→gray of RGB data, as upstream (false: BT.601 on RGB)."""
    prompt: str = QUALITY_PROMPT
    """Fixed positive prompt of every image [srkit: upstream uses RAM tags of the HR]."""


SETTINGS = GDPOSettings


def build(settings: GDPOSettings, inputs: RecipeInputs) -> GDPORecipe:
    """The NAOSD model to tune (`--base`, required) and SD2.1's text side (`sd21-text`) from the registry unless given."""
    if inputs.base is None:
        raise ValueError("gdpo starts from a NAOSD model: pass --base DIR (the export of `srkit finetune "
                         "--recipe naosd`, or a merged NAOSD/GDPO diffusers folder)")
    metrics = inputs.extras.get("reward_metrics")
    return GDPORecipe(inputs.base, settings, text=inputs.text_side("sd21-text"), metrics=metrics)


class GDPORecipe(SDRecipe):
    name = "gdpo"
    engine = "gdpo"
    licence = "CreativeML-OpenRAIL++-M (tuned from a NAOSD model on SD2.1-base, whose terms apply)"

    def __init__(
        self,
        base: str | Path,
        settings: GDPOSettings | None = None,
        *,
        text: TextSide = TextSide(),
        metrics: Mapping[str, RewardMetric] | None = None,
    ) -> None:
        s = self.settings = settings or GDPOSettings()
        if s.group_size < 2:
            raise ValueError("group_size must be at least 2 (advantages compare samples within a group)")
        names = [n.strip() for n in s.reward_metrics.split(",") if n.strip()]
        self.fidelity_names = [n for n in names if n in FIDELITY_METRICS]
        self.detail_names = [n for n in names if n not in FIDELITY_METRICS]
        if not self.fidelity_names or not self.detail_names:
            raise ValueError(f"reward_metrics needs a fidelity metric (psnr, ssim) and a detail one, got {names}")
        self.metrics = dict(metrics) if metrics is not None else _create_metrics(names)
        super().__init__(
            base, text=text,
            prompts={PROMPT_KEY: compose_prompt("", s.prompt)}, timesteps=(s.t_noise, s.t_diff),
        )  # fmt: skip
        self.vae = load_vae(self.base)
        self.reference = load_unet(self.base)
        self.policy = copy.deepcopy(self.reference).train()
        lora = add_lora(self.policy, target_modules(self.policy, UNET_LORA_TARGETS), s.rank_unet)
        self.groups = {"policy": {f"unet.{k}": v for k, v in lora.items()}}

    @property
    def text(self) -> Conditioning:
        return self.condition(PROMPT_KEY)

    @torch.no_grad()
    def sample_group(self, lr: torch.Tensor) -> torch.Tensor:
        """(B·G, 3, H, W) SR samples in [0, 1] from the frozen reference, b-major (G noises per LR latent)."""
        s = self.settings
        z = vae_encode(self.vae, training_input(lr), latent="sample").repeat_interleave(s.group_size, dim=0)
        reference = UNetDenoiser(self.reference)
        clean = noise_injected_x0(reference, self.schedule, z, torch.randn_like(z), s.t_noise, s.t_diff, self.text)
        decoded = vae_decode(self.vae, clean)
        return (decoded.float().clamp(-1, 1) + 1) / 2

    def rewards(self, samples: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(B, G) ARF rewards of the samples and the mean raw score of every metric (for the log)."""
        s = self.settings
        batch = hr.shape[0]
        sr_np = samples.permute(0, 2, 3, 1).cpu().numpy()
        hr_np = hr.permute(0, 2, 3, 1).float().cpu().numpy()
        scores = {
            name: torch.tensor(
                [metric(sr_np[i], hr_np[i // s.group_size]) for i in range(len(sr_np))], dtype=torch.float64
            ).view(batch, s.group_size)
            for name, metric in self.metrics.items()
        }
        ratios = [attribute_ratios(image, official_gray=s.official_gray) for image in hr_np]
        fidelity = torch.tensor([f for f, _ in ratios], dtype=torch.float64)
        detail = torch.tensor([d for _, d in ratios], dtype=torch.float64)
        rewards = arf_rewards(scores, fidelity, detail, fidelity_metrics=self.fidelity_names,
                              detail_metrics=self.detail_names)  # fmt: skip
        return rewards, {name: float(v.mean()) for name, v in scores.items()}

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        hr = batch["hr"]
        samples = self.sample_group(batch["lr"])
        rewards, logs = self.rewards(samples, hr)
        advantages = group_advantages(rewards).to(hr.device, torch.float32)
        with torch.no_grad():
            z0 = vae_encode(self.vae, samples * 2 - 1, latent="sample")
            noise = torch.randn_like(z0)
            noisy = self.schedule.add_noise(z0, noise, s.t_noise)
            reference_error = per_sample_error(UNetDenoiser(self.reference)(noisy, s.t_diff, self.text), noise)
        policy_error = per_sample_error(UNetDenoiser(self.policy)(noisy, s.t_diff, self.text), noise)
        shape = advantages.shape
        loss = gdpo_loss(policy_error.view(shape), reference_error.view(shape), advantages, s.omega)
        yield "policy", loss, {"gdpo": loss.item(), "reward": float(rewards.mean()), **logs}

    def export(self, folder: Path) -> Path:
        """Merged diffusers `unet/` (policy LoRA folded in) and the base `vae/`."""
        with self.export_folder(folder) as partial:
            merged_copy(copy.deepcopy(self.reference), self.policy, self.settings.rank_unet).save_pretrained(partial / "unet")
            self.vae.save_pretrained(partial / "vae")
        return folder


def _create_metrics(names: list[str]) -> dict[str, RewardMetric]:
    """srkit's metric implementations by name (MUSIQ/MANIQA through pyiqa: clear error when unavailable)."""
    from srkit.bench.metrics import MetricUnavailable, create_metric

    metrics = {}
    for name in names:
        try:
            metrics[name] = create_metric(name)
        except MetricUnavailable as exc:
            raise ValueError(f"reward metric {exc}; install 'srkit[train]' and its weights, or pass "
                             "-O reward_metrics=... with available metrics") from exc
    return metrics
