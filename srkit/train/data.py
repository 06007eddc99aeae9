"""Training data: HR images → random crops → Real-ESRGAN degradation on the fly → (LR, HR) pairs.

Every draw (crop position, flip, degradation parameters, noise) is seeded by (seed, epoch, image index), so a run
is reproducible and a resumed run sees the same data as an uninterrupted one; every sample of a batch has its own
degradation (S3Diff issue #27: upstream drew resize, noise and JPEG choices once per batch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from srkit import imageio
from srkit.degrade.config import DegradationConfig
from srkit.degrade.pipeline import DegradationPipeline


class DegradedHRDataset(torch.utils.data.Dataset):
    """Item i: {"hr": 3×crop×crop, "lr": 3×(crop/scale)×(crop/scale)}, both in [0, 1] float32; only "hr" with
    `degrade` False (recipes that train on HR images alone, e.g. a text-to-image base)."""

    def __init__(
        self,
        folder: str | Path,
        crop: int = 512,
        scale: int = 4,
        seed: int = 0,
        config: DegradationConfig | None = None,
        degrade: bool = True,
        hflip: bool = False,
    ) -> None:
        """`hflip`: mirror half of the crops (left-right) before degrading, as BasicSR's `use_hflip`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"training data folder {folder} does not exist")
        self.files = sorted(p for p in folder.iterdir() if imageio.is_image_path(p))
        if not self.files:
            raise ValueError(f"no HR images in {folder}")
        if crop % scale:
            raise ValueError(f"crop {crop} must be a multiple of the scale {scale}")
        self.crop, self.scale, self.seed, self.epoch, self.hflip = crop, scale, seed, 0, hflip
        self.pipeline = DegradationPipeline(config, scale) if degrade else None

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rgb = imageio.read_image(self.files[index]).rgb()
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        height, width = image.shape[-2:]
        if min(height, width) < self.crop:
            raise ValueError(f"{self.files[index].name} is {width}x{height}, smaller than the crop {self.crop}")
        seed = self.seed * 1_000_003 + self.epoch
        gen = torch.Generator().manual_seed(seed * 7919 + index)
        top = int(torch.randint(0, height - self.crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - self.crop + 1, (1,), generator=gen))
        hr = image[:, top : top + self.crop, left : left + self.crop]
        if self.hflip and bool(torch.rand(1, generator=gen) < 0.5):
            hr = hr.flip(-1)
        hr = hr.contiguous()
        if self.pipeline is None:
            return {"hr": hr}
        return {"hr": hr, "lr": self.pipeline(hr[None], seed=seed, indices=[index])[0]}
