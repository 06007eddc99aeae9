"""Differentiable image rewards for reward-feedback training, behind one interface.

A reward is a callable `(images (B, 3, H, W) in [0, 1], prompts: list of B strings) -> (B,) scores` (higher =
better) with a `name`; gradients flow to the images, never into the reward network, which is frozen.  The
recipe turns scores into a loss with the reward's window (`srkit.train.rfsr.RewardWindow.loss`).

- `clipiqa`: pyiqa's CLIP-IQA (CLIP RN50, five antonym prompt pairs; pyiqa is an optional extra).  It ignores
  the prompts.  RFSR builds it with `create_metric('clipiqa', as_loss=True)`, whose default
  `loss_reduction='mean'` returns the batch mean; srkit asks for 'none' to get per-image scores, which gives
  the same hinge of the mean.
- `image_reward`: THUDM's ImageReward, srkit's own BLIP scorer (`srkit.train.image_reward`), because the
  `image-reward` package does not import with transformers 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from srkit.registry import WeightsError


@runtime_checkable
class RewardModel(Protocol):
    """A frozen, differentiable image scorer."""

    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


class ClipIqaReward(nn.Module):
    """pyiqa's CLIP-IQA metric (built with `as_loss=True, loss_reduction='none'`) as a reward."""

    name = "clipiqa"

    def __init__(self, metric: nn.Module) -> None:
        super().__init__()
        self.metric = metric
        self.metric.requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.metric(images).reshape(images.shape[0])


def load_clipiqa_reward(device: str | torch.device = "cpu") -> ClipIqaReward:
    """CLIP-IQA via pyiqa; refuses with one line naming the missing package or weight file (no download)."""
    from srkit.bench.metrics import get_spec, unavailable_reason

    reason = unavailable_reason(get_spec("clipiqa"))
    if reason:
        raise WeightsError(f"the CLIP-IQA reward cannot be built: {reason}")
    import pyiqa

    metric = pyiqa.create_metric("clipiqa", as_loss=True, loss_reduction="none", device=torch.device(device))
    return ClipIqaReward(metric)


__all__ = ["ClipIqaReward", "RewardModel", "load_clipiqa_reward"]
