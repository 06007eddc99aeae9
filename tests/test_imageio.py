"""Image I/O: bit depth, gray, alpha, EXIF orientation, ICC/EXIF copy, bad files, atomic writes."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from srkit.imageio import ImageData, ImageReadError, read_image, write_image


def test_16bit_png_round_trip(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (9, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "in.png"), values[:, :, ::-1])
    image = read_image(tmp_path / "in.png")
    assert image.bit_depth == 16 and image.pixels.shape == (9, 7, 3)
    write_image(tmp_path / "out.png", image)
    back = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    assert back.dtype == np.uint16 and np.array_equal(back, values)


def test_16bit_values_below_256_stay_16bit(tmp_path):
    """Real-ESRGAN guesses depth from max > 256; a dark 16-bit file must not become 8-bit."""
    dark = np.full((4, 4), 200, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "dark.png"), dark)
    image = read_image(tmp_path / "dark.png")
    assert image.bit_depth == 16 and image.is_gray
    assert np.allclose(image.pixels, 200 / 65535)


def test_gray_stays_gray(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.is_gray and image.pixels.shape == (8, 8, 1)
    write_image(tmp_path / "o.png", image)
    assert Image.open(tmp_path / "o.png").mode == "L"


def test_rgba_alpha_is_separate(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.linspace(0, 255, 6, dtype=np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.pixels.shape == (6, 6, 3) and image.alpha.shape == (6, 6)
    assert image.alpha[0, -1] == 1.0 and image.alpha[0, 0] == 0.0
    write_image(tmp_path / "o.png", image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), rgba)


@pytest.mark.parametrize("orientation, shape", [(1, (10, 20)), (3, (10, 20)), (6, (20, 10)), (8, (20, 10))])
def test_exif_orientation_is_applied(tmp_path, orientation, shape):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:5, :10] = 255  # a white top-left quadrant, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    image = read_image(tmp_path / "r.jpg")
    assert image.pixels.shape[:2] == shape
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "r.jpg")))
    assert np.abs(image.pixels * 255 - upright).max() <= 1
    write_image(tmp_path / "o.jpg", image)
    written = Image.open(tmp_path / "o.jpg")
    assert written.getexif().get(0x0112, 1) == 1  # upright pixels, orientation reset


def test_icc_and_exif_are_copied(tmp_path):
    icc = b"\0" * 128 + b"fake-icc-profile"
    exif = Image.Exif()
    exif[0x010F] = "srkit-test-camera"
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "m.png", icc_profile=icc, exif=exif.tobytes())
    image = read_image(tmp_path / "m.png")
    for name in ("o.png", "o.jpg", "o.webp"):
        write_image(tmp_path / name, image)
        written = Image.open(tmp_path / name)
        assert written.info.get("icc_profile") == icc, name
        assert written.getexif().get(0x010F) == "srkit-test-camera", name


def test_16bit_png_keeps_metadata(tmp_path):
    icc = b"\0" * 128 + b"deep-profile"
    image = ImageData(np.full((4, 4, 3), 0.5, np.float32), bit_depth=16, icc_profile=icc)
    write_image(tmp_path / "d.png", image)
    assert Image.open(tmp_path / "d.png").info.get("icc_profile") == icc
    assert read_image(tmp_path / "d.png").bit_depth == 16


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def _noise_file(fmt: str) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("empty.png", b"", "empty"),
        ("text.png", b"this is not an image", "not an image"),
        ("cut-header.png", _noise_file("PNG")[:60], "corrupt|truncated"),
        ("truncated.png", _noise_file("PNG")[:6000], "corrupt|truncated"),
        ("truncated.jpg", _noise_file("JPEG")[:3000], "corrupt|truncated"),
        ("huge.png", _png_header_only(100_000, 100_000), "safety limit"),
        ("large.png", _png_header_only(16_000, 10_000), "safety limit"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, name, payload, message):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(ImageReadError, match=message) as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    image = ImageData(np.zeros((4, 4, 3), np.float32))
    write_image(tmp_path / "sub" / "o.png", image)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["o.png"]
    assert (tmp_path / "sub" / "o.png").stat().st_mode & 0o044  # readable by others under a normal umask
    with pytest.raises(ValueError, match="cannot write"):
        write_image(tmp_path / "o.xyz", image)
    assert not list(tmp_path.glob(".*srkit-tmp"))
