"""The vision-aided GAN discriminator S3Diff trains with (Kumari et al., CVPR 2022; `vision_aided_loss`
`Discriminator(cv_type='dino', output_type='conv_multi_level', loss_type='multilevel_sigmoid_s')`).

A frozen DINO ViT-B/16 (`srkit/nn/vit.py`, weights from the registry entry `dino-vitb16`) looks at the image;
small trained heads judge three of its feature levels:
1. the image in [-1, 1] is augmented (DiffAugment color, translation, cutout), mapped to [0, 1], area-resized to
   224² and normalised with the library's mean (0.48145466, 0.4578275, 0.40821073) and std (0.229, 0.224, 0.225);
2. of the normed outputs of the ViT's last 8 blocks, the 1st and 5th (blocks 4 and 8 of ViT-B) become 768×14×14
   maps (patch tokens) and the last block's class token a 768-vector;
3. each map: BlurPool (zero pad 2, stride 1) → spectral-norm 3×3 conv to 128 channels, stride 2 → LeakyReLU(0.2)
   → BlurPool (zero pad 1, stride 1) → spectral-norm 1×1 conv to 1 channel, stride 2: a 3×3 map of logits;
   the class token: spectral-norm Linear to 128 → LeakyReLU(0.2) → spectral-norm Linear to 1;
4. loss per image: Σ over the three levels of the mean binary cross-entropy of its logits against the label —
   1-sided label smoothing: 0.8 for real images (and for the generator's loss), 0 for fakes.
The BlurPool filter is the binomial [1, 3, 3, 1]ᵀ[1, 3, 3, 1]/64.  Spectral norm keeps one power-iteration vector
pair per layer (`power_vectors`, checkpointed by the recipe so a resumed run continues exactly).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from srkit.nn.vit import VisionTransformer
from srkit.train.diffaugment import POLICY, diff_augment

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.229, 0.224, 0.225)
LAST_BLOCKS = 8
LEVELS = (0, 4, -1)
"""Indices into the outputs of the last `LAST_BLOCKS` blocks: two token maps and the class token."""
REAL_LABEL = 0.8


class BlurPool(nn.Module):
    """Depth-wise binomial [1, 3, 3, 1] blur with zero padding (anti-aliased sub-sampling of Zhang, ICML 2019)."""

    def __init__(self, channels: int, pad: int, stride: int = 1) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", (kernel / kernel.sum()).expand(channels, 1, 4, 4).clone(), persistent=False)
        self.pad, self.stride = pad, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [self.pad] * 4), self.kernel, stride=self.stride, groups=x.shape[1])


def _map_head(width: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        BlurPool(width, pad=2),
        spectral_norm(nn.Conv2d(width, channels, kernel_size=3, stride=2)),
        nn.LeakyReLU(0.2),
        BlurPool(channels, pad=1),
        spectral_norm(nn.Conv2d(channels, 1, kernel_size=1, stride=2)),
    )


class MultiLevelHeads(nn.Module):
    """The trained part: one conv head per token map and an MLP on the class token; logits per level."""

    def __init__(self, width: int = 768, channels: int = 128) -> None:
        super().__init__()
        self.maps = nn.ModuleList(_map_head(width, channels) for _ in LEVELS[:-1])
        self.token = nn.Sequential(spectral_norm(nn.Linear(width, channels)), nn.LeakyReLU(0.2))
        self.out = spectral_norm(nn.Linear(channels, 1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """[(B, width, g, g) maps…, (B, width) class token] → [(B, h, w) logits…, (B, 1) logits]."""
        logits = [head(level).squeeze(1) for head, level in zip(self.maps, features[:-1], strict=True)]
        return [*logits, self.out(self.token(features[-1].float()))]


class VisionAidedDiscriminator(nn.Module):
    """Frozen ViT backbone + trained multi-level heads; `forward` gives the logits of every level."""

    def __init__(self, backbone: VisionTransformer, channels: int = 128, augment: str = POLICY) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.heads = MultiLevelHeads(backbone.norm.normalized_shape[0], channels)
        self.augment = augment
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VisionAidedDiscriminator:
        super().train(mode)
        self.backbone.eval()  # the backbone is a fixed feature extractor, always in eval mode
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] → [token map, token map, class token] of the frozen backbone (after augmentation)."""
        x = diff_augment(images, self.augment) * 0.5 + 0.5
        size = self.backbone.image_size
        x = (F.interpolate(x, size=(size, size), mode="area") - self.mean) / self.std
        outputs = self.backbone.intermediate(x, LAST_BLOCKS)
        chosen = [outputs[index] for index in LEVELS]
        grid = self.backbone.grid
        maps = [tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid) for tokens in chosen[:-1]]
        return [*maps, chosen[-1][:, 0]]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.heads(self.features(images))

    def power_vectors(self) -> dict[str, torch.Tensor]:
        """The spectral-norm power-iteration vectors, which every training-mode forward updates in place."""
        return {name: buffer for name, buffer in self.heads.named_buffers() if name.endswith(("._u", "._v"))}

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The heads out of autograd inside (the generator's adversarial loss must leave no gradient in them:
        S3Diff issue #25)."""
        params = [p for p in self.heads.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def multilevel_bce(logits: list[torch.Tensor], real: bool, real_label: float = REAL_LABEL) -> torch.Tensor:
    """(B,) loss: Σ over levels of the per-image mean BCE-with-logits against `real_label` (real) or 0 (fake)."""
    total = 0
    for level in logits:
        target = torch.full_like(level, real_label if real else 0.0)
        total = total + F.binary_cross_entropy_with_logits(level, target, reduction="none").flatten(1).mean(dim=1)
    return total


__all__ = [
    "REAL_LABEL",
    "BlurPool",
    "MultiLevelHeads",
    "VisionAidedDiscriminator",
    "multilevel_bce",
]
