"""Write LR/HR pairs from a folder of HR images: how synthetic test sets (e.g. div2k-val) are built.

Each image file in the folder (sorted by name) is sample i of the run, so `--seed` alone fixes every LR; the
index counts unreadable files too, so one corrupt file does not change the other pairs.  The HR is
optionally cropped (centre, or at a position from the sample's own crop stream), then cut to a multiple of
the scale so that LR × scale == HR exactly, and written next to its LR as OUT/HR/<stem>.png and
OUT/LR/<stem>.png (atomic writes: an interrupted run never leaves half a PNG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srkit.common import check_choice
from srkit.degrade.config import CROP_MODES
from srkit.degrade.pipeline import DegradationPipeline
from srkit.degrade.sampling import CROP_STREAM, sample_generator
from srkit.imageio import ImageData, is_image_path, read_image, write_image


@dataclass
class PairCounts:
    written: int = 0
    failed: int = 0


def list_hr_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) directly inside `folder`, sorted by name."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    return [p for p in files if is_image_path(p)], [p for p in files if not is_image_path(p)]


def crop_hr(pixels: np.ndarray, scale: int, crop: int | None, mode: str, seed: int, index: int) -> np.ndarray:
    """Crop an H×W×C image to crop×crop (if asked), then to a multiple of `scale`."""
    height, width = pixels.shape[:2]
    if crop is not None:
        if crop > min(height, width):
            raise ValueError(f"image is {width}x{height}, smaller than --crop {crop}")
        if mode == "random":
            generator = sample_generator(seed, index, CROP_STREAM)
            top = int(torch.randint(0, height - crop + 1, (), generator=generator))
            left = int(torch.randint(0, width - crop + 1, (), generator=generator))
        else:
            top, left = (height - crop) // 2, (width - crop) // 2
        pixels = pixels[top : top + crop, left : left + crop]
        height, width = crop, crop
    if min(height, width) < scale:
        raise ValueError(f"image is {width}x{height}, smaller than the scale {scale}")
    return pixels[: height - height % scale, : width - width % scale]


def write_pairs(hr_dir: Path, out_dir: Path, pipeline: DegradationPipeline, seed: int, *,
                crop: int | None = None, crop_mode: str = "center", device: torch.device | str = "cpu",
                warn: Callable[[str], None] = print) -> PairCounts:
    """Degrade every image of `hr_dir`; a file that cannot be used is reported through `warn` and skipped."""
    check_choice(crop_mode, CROP_MODES, "crop_mode")
    images, others = list_hr_images(hr_dir)
    for path in others:
        warn(f"skipped {path.name}: not an image file")
    counts = PairCounts()
    claimed: dict[str, str] = {}
    for index, path in enumerate(images):
        name = f"{path.stem}.png"
        if name in claimed:
            warn(f"skipped {path.name}: its output name {name} is already taken by {claimed[name]}")
            counts.failed += 1
            continue
        claimed[name] = path.name
        try:
            image = read_image(path)
            hr = crop_hr(image.rgb(), pipeline.scale, crop, crop_mode, seed, index)
        except ValueError as exc:  # ImageReadError included: its message already names the file
            warn(f"skipped {path.name}: {exc}")
            counts.failed += 1
            continue
        batch = torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1)))[None].to(device)
        lr = pipeline(batch, seed, [index])[0].permute(1, 2, 0).cpu().numpy()
        write_image(out_dir / "HR" / name, ImageData(pixels=np.ascontiguousarray(hr), bit_depth=image.bit_depth))
        write_image(out_dir / "LR" / name, ImageData(pixels=lr, bit_depth=8))
        counts.written += 1
    return counts
