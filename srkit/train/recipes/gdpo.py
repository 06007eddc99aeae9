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
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srkit.engines import sd
from srkit.engines.osediff import PROMPT_KEY, compose_prompt
from srkit.train.lora import UNET_PATTERNS, add_lora, merged_copy, target_modules
from srkit.train.losses import GDPO_OMEGA, gdpo_loss, per_sample_error
from srkit.train.recipes.naosd import DEFAULT_PROMPT, noise_injected_x0, upsampled_input
from srkit.train.rewards import arf_rewards, attribute_ratios, group_advantages
from srkit.train.trainer import atomic_folder

RewardMetric = Callable[[np.ndarray, np.ndarray], float]
FIDELITY_METRICS = frozenset({"psnr", "ssim"})
"""Reward metrics that measure fidelity to the HR (weighted by the smooth ratio); the others weigh by texture."""


@dataclass
class GDPOSettings:
    """Hyper-parameters with the paper's / official script's defaults."""

    group_size: int = 6
    t_noise: int = 250
    t_diff: int = 100
    rank_unet: int = 4
    omega: float = GDPO_OMEGA
    reward_metrics: str = "psnr,musiq,maniqa"
    """Comma-separated srkit metric names; psnr/ssim count as fidelity, the rest as detail (ARF)."""
    official_gray: bool = True
    """Smooth/texture split on OpenCV's BGR→gray of RGB data, as upstream (false: BT.601 on RGB)."""
    prompt: str = DEFAULT_PROMPT


class GDPORecipe:
    name = "gdpo"

    def __init__(
        self,
        base: str | Path,
        settings: GDPOSettings | None = None,
        *,
        text_folder: str | Path | None = None,
        prompt_embeds: str | Path | None = None,
        metrics: Mapping[str, RewardMetric] | None = None,
    ) -> None:
        self.base, self.settings = Path(base), settings or GDPOSettings()
        s = self.settings
        if s.group_size < 2:
            raise ValueError("group_size must be at least 2 (advantages compare samples within a group)")
        names = [n.strip() for n in s.reward_metrics.split(",") if n.strip()]
        self.fidelity_names = [n for n in names if n in FIDELITY_METRICS]
        self.detail_names = [n for n in names if n not in FIDELITY_METRICS]
        if not self.fidelity_names or not self.detail_names:
            raise ValueError(f"reward_metrics needs a fidelity metric (psnr, ssim) and a detail one, got {names}")
        self.metrics = dict(metrics) if metrics is not None else _create_metrics(names)
        self.schedule = sd.load_noise_schedule(text_folder or self.base)
        for t in (s.t_noise, s.t_diff):
            self.schedule.alpha_bar(t)
        table = sd.prompt_embeddings({PROMPT_KEY: compose_prompt("", s.prompt)}, folder=text_folder, precomputed=prompt_embeds)
        self.prompt = table[PROMPT_KEY].clone()  # outside inference_mode: it enters the training graph
        self.vae = sd.load_vae(self.base)
        self.reference = sd.load_unet(self.base)
        self.policy = copy.deepcopy(self.reference).train()
        lora = add_lora(self.policy, target_modules(self.policy, UNET_PATTERNS), s.rank_unet)
        self.groups = {"policy": {f"unet.{k}": v for k, v in lora.items()}}

    def parameter_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return self.groups

    def to(self, device: torch.device) -> GDPORecipe:
        for module in (self.vae, self.reference, self.policy):
            module.to(device)
        self.prompt = self.prompt.to(device)
        return self

    @torch.no_grad()
    def sample_group(self, lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B·G, 3, H, W) SR samples in [0, 1] from the frozen reference, b-major (G noises per LR latent)."""
        s = self.settings
        z = sd.vae_encode(self.vae, upsampled_input(lr, size), latent="sample").repeat_interleave(s.group_size, dim=0)
        clean = noise_injected_x0(self.reference, self.schedule, z, self.prompt, s.t_noise, s.t_diff)
        decoded = sd.vae_decode(self.vae, clean)
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
        samples = self.sample_group(batch["lr"], tuple(hr.shape[-2:]))
        rewards, logs = self.rewards(samples, hr)
        advantages = group_advantages(rewards).to(hr.device, torch.float32)
        with torch.no_grad():
            z0 = sd.vae_encode(self.vae, samples * 2 - 1, latent="sample")
            noise = torch.randn_like(z0)
            noisy = self.schedule.add_noise(z0, noise, s.t_noise)
            text = self.prompt.expand(z0.shape[0], -1, -1)
            reference_error = per_sample_error(self.reference(noisy, s.t_diff, encoder_hidden_states=text).sample, noise)
        policy_error = per_sample_error(self.policy(noisy, s.t_diff, encoder_hidden_states=text).sample, noise)
        shape = advantages.shape
        loss = gdpo_loss(policy_error.view(shape), reference_error.view(shape), advantages, s.omega)
        yield "policy", loss, {"gdpo": loss.item(), "reward": float(rewards.mean()), **logs}

    def export(self, folder: Path) -> Path:
        """Merged diffusers `unet/` (policy LoRA folded in) and the base `vae/`."""
        with atomic_folder(folder) as partial:
            merged_copy(copy.deepcopy(self.reference), self.policy, self.settings.rank_unet).save_pretrained(partial / "unet")
            self.vae.save_pretrained(partial / "vae")
            if (self.base / "scheduler").is_dir():
                shutil.copytree(self.base / "scheduler", partial / "scheduler")
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
