"""Differentiable augmentation (DiffAugment, Zhao et al., NeurIPS 2020) as the vision-aided GAN discriminator
applies it to every image it judges, real or generated: policy "color,translation,cutout" on images in [-1, 1].

Per image (draws from the global generator of the images' device, so the trainer's checkpointed RNG state makes
them reproducible):
- color: + U(−½, ½) brightness; saturation × U(0, 2) around the per-pixel channel mean; contrast × U(½, 3/2)
  around the image mean;
- translation: an integer shift of up to ⅛ of each side (rounded) in each axis, zeros shifted in;
- cutout: a zeroed rectangle of half each side (rounded), its centre anywhere in the image (clipped at borders).
Everything is a differentiable function of the pixels, so the generator's gradient passes through.
"""

from __future__ import annotations

import torch

from srkit.common import check_choice

POLICY = "color,translation,cutout"


def color(x: torch.Tensor) -> torch.Tensor:
    def draw() -> torch.Tensor:
        return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)

    x = x + (draw() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (draw() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (draw() + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    batch, _, height, width = x.shape
    shifts = []
    for size in (height, width):
        most = int(size * ratio + 0.5)
        shifts.append(torch.randint(-most, most + 1, (batch, 1, 1), device=x.device))
    rows = torch.arange(height, device=x.device)[None, :, None] + shifts[0]  # source row of each output pixel
    cols = torch.arange(width, device=x.device)[None, None, :] + shifts[1]
    inside = ((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)).to(x.dtype)
    index = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).flatten(1)  # (B, H·W)
    gathered = x.flatten(2).gather(2, index[:, None, :].expand(-1, x.shape[1], -1)).view_as(x)
    return gathered * inside[:, None]


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    batch, _, height, width = x.shape
    mask = torch.ones(batch, height, width, dtype=x.dtype, device=x.device)
    ranges = []
    for size in (height, width):
        cut = int(size * ratio + 0.5)
        offset = torch.randint(0, size + (1 - cut % 2), (batch, 1), device=x.device)
        positions = torch.arange(size, device=x.device)[None, :]
        ranges.append((positions >= offset - cut // 2) & (positions < offset - cut // 2 + cut))
    mask = mask * ~(ranges[0][:, :, None] & ranges[1][:, None, :])
    return x * mask[:, None]


AUGMENTATIONS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(images: torch.Tensor, policy: str = POLICY) -> torch.Tensor:
    """Apply the comma-separated augmentations of `policy` in order ("" = none)."""
    for name in filter(None, (part.strip() for part in policy.split(","))):
        check_choice(name, AUGMENTATIONS, "DiffAugment policy entry")
        images = AUGMENTATIONS[name](images)
    return images.contiguous()


__all__ = ["AUGMENTATIONS", "POLICY", "diff_augment"]
