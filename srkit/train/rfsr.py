"""RFSR's timestep-aware loss schedule and reward losses, as the released code runs them.

RFSR (Sun et al., "Improving ISR Diffusion Models via Reward Feedback Learning", arXiv 2412.03268)
fine-tunes a multi-step SR diffusion model with one denoising step k of its 50-step sampler per training step
(index 0 = the noisiest).  Which losses apply depends on k: early (noisy) steps are held to the ground
truth's low frequencies (the structure loss, `srkit.train.wavelet_losses`), late steps are pushed by rewards
(CLIP-IQA, ImageReward; `srkit.train.reward_models`) and kept near a frozen reference by the Gram regulariser
(`srkit.train.gram_regulariser`).

Every default below is the released script's value (sxpro/RFSR at a9932fa: `SeeSR/train_seesr_kl_ema.sh`,
which overrides the parser defaults of `train_seesr_kl_ema.py`); the docstring of each names its flag.  With
these windows indices 20–39 never train: the draw is effectively uniform over the 30 covered indices.

The reward losses are ReFL's hinge relu(2 − r) (THUDM ImageReward, `ReFL.py`), reduced over the batch
differently per reward in the released script; both forms are kept: CLIP-IQA `w · relu(2 − mean_b s_b)` (the
hinge of the batch mean, L1167) and ImageReward `w · mean_b relu(2 − r_b)` (the mean of the hinges,
`ImageRewardLoss`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

REWARD_MARGIN = 2.0
"""The hinge of ReFL: rewards above 2 (CLIP-IQA's scores lie in [0, 1], so never) stop pushing."""

STRUCTURE = "structure"
CLIPIQA = "clipiqa"
IMAGE_REWARD = "image_reward"
GRAM_REGULARISER = "gram_regulariser"
"""Loss names; the released flags: --dwt_loss, --clipiqa_loss, --image_reward_loss, --kl_loss."""

GRAM_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
"""VGG19 taps of the Gram regulariser and their weights (`--kl_s_weight` default [0.1, 0.1, 1, 1, 1])."""


@dataclass(frozen=True)
class LossWindow:
    """A loss's weight and the inclusive range of sampler-step indices where it fires (weight 0: off)."""

    weight: float
    first: int
    last: int

    def covers(self, index: int) -> bool:
        return self.weight > 0 and self.first <= index <= self.last

    @classmethod
    def from_text(cls, text: str, default: LossWindow) -> LossWindow:
        """`-O structure=5e-4@0-19` (weight@first-last; `0` turns the loss off), other fields as `default`'s."""
        weight, _, span = text.partition("@")
        first, _, last = span.partition("-")
        try:
            return replace(default, weight=float(weight), first=int(first or default.first),
                           last=int(last or default.last))  # fmt: skip
        except ValueError:
            raise ValueError(f"a loss window is weight@first-last (e.g. 5e-4@0-19), got '{text}'") from None


@dataclass(frozen=True)
class RewardWindow(LossWindow):
    """A reward's window plus how its hinge is reduced over the batch (the two released rewards differ)."""

    hinge_per_sample: bool = False

    def loss(self, scores: torch.Tensor) -> torch.Tensor:
        """The weighted hinge loss of (B,) or (B, 1) scores, higher = better."""
        return reward_hinge_loss(scores, self.weight, per_sample=self.hinge_per_sample)


def reward_hinge_loss(scores: torch.Tensor, weight: float, *, per_sample: bool) -> torch.Tensor:
    """`w · mean(relu(2 − s))` when `per_sample` (ImageReward), else `w · relu(2 − mean(s))` (CLIP-IQA)."""
    if per_sample:
        return weight * F.relu(REWARD_MARGIN - scores).mean()
    return weight * F.relu(REWARD_MARGIN - scores.mean())


def sampler_timesteps(steps: int, train_timesteps: int = 1000, offset: int = 1) -> torch.Tensor:
    """The sampler's timesteps, noisiest first: diffusers' `DDPMScheduler.set_timesteps` with SD2-base's
    config ("leading" spacing, `steps_offset` 1), i.e. [981, 961, …, 1] for 50 of 1000 (the script's
    `timesteps_list`)."""
    ratio = train_timesteps // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + offset


@dataclass
class RFSRLossSettings:
    """The loss-side hyper-parameters of RFSR's released run (train_seesr_kl_ema.sh); recipes extend it."""

    sampler_steps: int = 50
    """`--timesteps 50`: the DDPM sampler whose step indices the windows refer to."""
    index_range: tuple[int, int] = (0, 49)
    """`--timestep_sample 0 49`: the inclusive range the step index is drawn from."""
    structure: LossWindow = LossWindow(weight=5e-4, first=0, last=19)
    """`--dwt_loss_weight 0.0005 --dwt_loss_step 0 19`."""
    clipiqa: RewardWindow = RewardWindow(weight=5e-5, first=40, last=49, hinge_per_sample=False)
    """`--clipiqa_loss_weight 0.00005 --clipiqa_loss_step 40 49`."""
    image_reward: RewardWindow = RewardWindow(weight=5e-6, first=40, last=49, hinge_per_sample=True)
    """`--image_reward_loss_weight 0.000005 --image_reward_loss_step 40 49`."""
    gram_regulariser: LossWindow = LossWindow(weight=5e-7, first=40, last=49)
    """`--kl_loss_weight 0.0000005 --kl_loss_step 40 49`."""
    structure_transform: str = "dtcwt"
    """"dtcwt" as released (`DWTLoss`); "haar" is the paper's Haar-LL reading (see `wavelet_losses`)."""
    gram_layer_weights: dict[str, float] = field(default_factory=lambda: dict(GRAM_LAYER_WEIGHTS))
    gram_normalise: bool = True
    """`--kl_norm 1`: LayerNorm each feature map before its Gram matrix (`gram_norm`)."""
    gram_fp16: bool = True
    """The released `_gram_mat` casts every Gram matrix to float16, and the weighted sum stays in float16,
    so with weight 5e-7 the term underflows to exactly 0 unless Σ_k w_k·L1_k exceeds ~0.12 (the golden
    fixture: 3.8e-4).  False keeps float32 and makes the regulariser act."""
    image_reward_antialias: bool = False
    """RFSR's stack (torch 2.0.1, torchvision 0.15) resized tensors for ImageReward without antialiasing;
    newer torchvision antialiases by default.  False reproduces the released training."""
    null_text_ratio: float = 0.5
    """`--null_text_ratio 0.5`: the fraction of samples whose prompt (and ImageReward prompt) is ''.
    (The released optimisation, lr 5e-6 × batch 1 × accumulation 2 and EMA 0.999, is the recipe's trainer default.)"""

    def __post_init__(self) -> None:
        lo, hi = self.index_range
        if not 0 <= lo <= hi < self.sampler_steps:
            raise ValueError(f"index_range {self.index_range} must lie within 0..{self.sampler_steps - 1}")
        for name, window in self.windows().items():
            if not 0 <= window.first <= window.last < self.sampler_steps:
                raise ValueError(
                    f"the {name} window {window.first}..{window.last} is not within the sampler steps"
                )

    def windows(self) -> dict[str, LossWindow]:
        return {
            STRUCTURE: self.structure,
            CLIPIQA: self.clipiqa,
            IMAGE_REWARD: self.image_reward,
            GRAM_REGULARISER: self.gram_regulariser,
        }

    def timesteps(self) -> torch.Tensor:
        return sampler_timesteps(self.sampler_steps)

    def losses_at(self, index: int) -> tuple[str, ...]:
        """The enabled losses whose windows cover sampler-step `index`."""
        return tuple(name for name, window in self.windows().items() if window.covers(index))

    def draw_step_index(self, rng: random.Random | Any) -> int:
        """A step index in `index_range`, re-drawn until some enabled loss fires at it.

        The released loop (train_seesr_kl_ema.py) draws with Python's `random.randint`; an index no loss
        covers is followed by a second draw at the end of the loop body, which the next iteration's draw
        overwrites.  That discarded draw is kept, so a generator seeded like the script's yields its indices.
        """
        lo, hi = self.index_range
        if not any(self.losses_at(index) for index in range(lo, hi + 1)):
            raise ValueError(f"no enabled loss fires at any step index in {lo}..{hi}")
        while True:
            index = rng.randint(lo, hi)
            if self.losses_at(index):
                return index
            rng.randint(lo, hi)


__all__ = [
    "CLIPIQA",
    "GRAM_LAYER_WEIGHTS",
    "GRAM_REGULARISER",
    "IMAGE_REWARD",
    "REWARD_MARGIN",
    "STRUCTURE",
    "LossWindow",
    "RFSRLossSettings",
    "RewardWindow",
    "reward_hinge_loss",
    "sampler_timesteps",
]
