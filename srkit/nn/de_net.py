"""The degradation estimator S3Diff uses (MM-RealSR's DEResNet): LR image -> (blur, noise) degrees in (0, 1).

Two fully independent branches, one per degradation: conv 3→64, six residual blocks at 64 channels, a strided
conv to 128, two residual blocks, global average pooling and an MLP 128→512→1 with a sigmoid.  Parameter names
follow the official state dict (`conv_first.i`, `body.i.j`, `fc_degree.i`) so `de_net.pth` loads strictly.
Input: RGB in [0, 1] at LR resolution, no normalisation, any size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), 3×3 convolutions with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def _branch_body() -> nn.Sequential:
    """Indices 0-5: residual blocks at 64 channels; 6: stride-2 conv to 128; 7-8: residual blocks at 128."""
    return nn.Sequential(
        *(ResidualBlockNoBN(64) for _ in range(6)),
        nn.Conv2d(64, 128, 3, 2, 1),
        *(ResidualBlockNoBN(128) for _ in range(2)),
    )


class DegradationEstimator(nn.Module):
    """DEResNet with MM-RealSR's configuration (feats 64,64,64,128; 2 blocks per stage; stride 2 after stage 3)."""

    def __init__(self, num_degradation: int = 2) -> None:
        super().__init__()
        self.conv_first = nn.ModuleList(nn.Conv2d(3, 64, 3, 1, 1) for _ in range(num_degradation))
        self.body = nn.ModuleList(_branch_body() for _ in range(num_degradation))
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(128, 512), nn.ReLU(inplace=True), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(num_degradation)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """(B,3,h,w) in [0,1] -> (B, num_degradation): column 0 = blur degree, column 1 = noise degree."""
        degrees = []
        for conv, body, head in zip(self.conv_first, self.body, self.fc_degree):
            features = self.pool(body(conv(lr))).flatten(1)
            degrees.append(head(features).squeeze(1))
        return torch.stack(degrees, dim=1)


def load_degradation_estimator(path: str | Path) -> DegradationEstimator:
    """The official `de_net.pth` (a plain state dict), read with `weights_only=True`, loaded strictly."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "params" in state and isinstance(state["params"], dict):
        state = state["params"]
    net = DegradationEstimator()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not an S3Diff/MM-RealSR degradation estimator checkpoint: {exc}") from None
    return net.eval().requires_grad_(False)


__all__ = ["DegradationEstimator", "ResidualBlockNoBN", "load_degradation_estimator"]
