"""Regenerate the sample inputs in this folder (procedural scenes, so they carry no third-party licence).

Run: .venv/bin/python examples/make_samples.py
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent
SIZE = 128


def scene(seed: int = 0) -> Image.Image:
    """A small outdoor-like scene: sky gradient, hills, a house, foliage texture, text; slightly blurred."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, SIZE)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 235]) + y * np.array([215, 230, 250])
    image = Image.fromarray(np.broadcast_to(sky, (SIZE, SIZE, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((-40, 70, 90, 170), fill=(70, 120, 60))
    draw.ellipse((50, 80, 190, 180), fill=(95, 140, 70))
    draw.rectangle((70, 62, 108, 96), fill=(180, 70, 50))
    draw.polygon([(64, 64), (89, 42), (114, 64)], fill=(110, 60, 45))
    draw.rectangle((84, 76, 94, 96), fill=(60, 40, 30))
    draw.rectangle((74, 68, 81, 75), fill=(230, 220, 150))
    draw.text((6, 6), "srkit", fill=(255, 255, 255))
    pixels = np.asarray(image).astype(np.float32)
    foliage = rng.normal(0, 18, (SIZE, SIZE, 1)) * (np.asarray(image)[:, :, 1:2] > 110)
    pixels = np.clip(pixels + foliage, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6))


def main() -> None:
    photo = scene()
    photo.save(HERE / "photo.png")
    photo.convert("L").save(HERE / "gray.png")
    rgba = photo.convert("RGBA")
    mask = Image.new("L", photo.size, 0)
    ImageDraw.Draw(mask).ellipse((16, 16, 112, 112), fill=255)
    rgba.putalpha(mask.filter(ImageFilter.GaussianBlur(2)))
    rgba.save(HERE / "badge_rgba.png")
    deep = (np.asarray(photo).astype(np.uint16) * 257)[:, :, ::-1]
    cv2.imwrite(str(HERE / "photo_16bit.png"), deep)


if __name__ == "__main__":
    main()
