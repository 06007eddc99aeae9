"""Perceptual losses for the recipes: LPIPS-VGG as the papers use it, through pyiqa (srkit[train]).

Inputs are in [-1, 1] (the recipes' image range); pyiqa's LPIPS takes [0, 1].  The VGG and LPIPS weights come
from pyiqa's cache; without them (or without pyiqa) the loader says what to install instead of failing later.
"""

from __future__ import annotations

import torch
from torch import nn

from srkit.common import one_line


class LPIPSLoss(nn.Module):
    """pyiqa's LPIPS metric as a loss on images in [-1, 1] (mean over the batch); a module so recipes move it."""

    def __init__(self, metric: nn.Module) -> None:
        super().__init__()
        self.metric = metric

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.metric((prediction * 0.5 + 0.5).clamp(0, 1), (target * 0.5 + 0.5).clamp(0, 1)).mean()


def lpips_vgg() -> LPIPSLoss:
    """LPIPS with the VGG backbone as a differentiable loss, on the CPU until the recipe moves it."""
    try:
        import pyiqa
    except ImportError:
        raise ValueError("the LPIPS-VGG loss needs pyiqa: pip install 'srkit[train]' (or set -O lambda_lpips=0)") from None
    try:
        metric = pyiqa.create_metric("lpips-vgg", as_loss=True, device=torch.device("cpu"))
    except Exception as exc:  # pyiqa raises many kinds when its weights cannot be fetched
        raise ValueError(
            f"LPIPS-VGG weights are not available ({one_line(exc)}); put them in the torch hub cache "
            "or set -O lambda_lpips=0"
        ) from exc
    return LPIPSLoss(metric)
