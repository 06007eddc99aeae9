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
    for name in ("o.png", "o.jpg", "o.webp", "o.tif"):
        write_image(tmp_path / name, image)
        written = Image.open(tmp_path / name)
        assert written.info.get("icc_profile") == icc, name
        assert written.getexif().get(0x010F) == "srkit-test-camera", name


def test_16bit_png_keeps_metadata(tmp_path):
    icc = b"\0" * 128 + b"deep-profile"
    exif = Image.Exif()
    exif[0x010F] = "srkit-test-camera"
    image = ImageData(np.full((4, 4, 3), 0.5, np.float32), bit_depth=16, icc_profile=icc, exif=exif.tobytes())
    write_image(tmp_path / "d.png", image)
    assert Image.open(tmp_path / "d.png").info.get("icc_profile") == icc
    assert read_image(tmp_path / "d.png").bit_depth == 16
    assert Image.open(tmp_path / "d.png").getexif().get(0x010F) == "srkit-test-camera"


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


def test_every_output_carries_srkits_marker(tmp_path):
    """The EXIF Software tag `srkit ...` tells srkit's outputs from a user's photos (batch re-runs)."""
    from srkit.imageio import is_srkit_output

    Image.new("RGB", (4, 4)).save(tmp_path / "user.png")
    assert not is_srkit_output(tmp_path / "user.png") and not is_srkit_output(tmp_path / "missing.png")
    for depth in (8, 16):
        for name in ("o.png", "o.jpg", "o.webp", "o.tif"):
            path = tmp_path / f"{depth}{name}"
            write_image(path, ImageData(np.full((4, 4, 3), 0.5, np.float32), bit_depth=depth))
            assert is_srkit_output(path), path.name
            assert Image.open(path).getexif().get(0x0131, "").startswith("srkit"), path.name


def test_16bit_tiff_keeps_icc_exif_and_alpha(tmp_path):
    from srkit.imageio import add_png_metadata

    icc = b"\0" * 128 + b"deep-tiff-profile"
    exif = Image.Exif()
    exif[0x010F] = "srkit-test-camera"
    exif.get_ifd(0x8769)[0x829A] = 0.01  # exposure time, in the Exif sub-directory
    values = np.random.default_rng(0).integers(0, 65536, (9, 7, 4), dtype=np.uint16)
    png = cv2.imencode(".png", values[:, :, [2, 1, 0, 3]])[1]
    (tmp_path / "in.png").write_bytes(add_png_metadata(png.tobytes(), icc, exif.tobytes()))
    image = read_image(tmp_path / "in.png")
    assert image.bit_depth == 16 and image.icc_profile == icc
    write_image(tmp_path / "out.tif", image)
    written = Image.open(tmp_path / "out.tif")
    assert written.info.get("icc_profile") == icc
    assert written.getexif().get(0x010F) == "srkit-test-camera"
    assert written.getexif().get_ifd(0x8769).get(0x829A) == pytest.approx(0.01)
    back = cv2.imread(str(tmp_path / "out.tif"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back[:, :, [2, 1, 0, 3]], values)
    again = read_image(tmp_path / "out.tif")  # srkit reads its own 16-bit TIFF back, metadata included
    assert again.bit_depth == 16 and again.icc_profile == icc and again.alpha is not None


def test_srkit_max_pixels_is_the_one_limit(tmp_path, monkeypatch):
    """Pillow's own bomb limit (89 MP warning, 179 MP error) used to refuse a 196 MP image SRKIT_MAX_PIXELS
    allowed, and to print its raw warning for 89-150 MP inputs."""
    import warnings

    from srkit.imageio import _read_header

    (tmp_path / "196mp.png").write_bytes(_png_header_only(14_000, 14_000))
    (tmp_path / "100mp.png").write_bytes(_png_header_only(10_000, 10_000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _read_header(tmp_path / "100mp.png").size == (10_000, 10_000)  # below 150 MP: accepted, silently
        with pytest.raises(ImageReadError, match="196 MP.*above the 150 MP safety limit; set SRKIT_MAX_PIXELS"):
            _read_header(tmp_path / "196mp.png")
        monkeypatch.setenv("SRKIT_MAX_PIXELS", "2e8")
        assert _read_header(tmp_path / "196mp.png").size == (14_000, 14_000)
    assert [str(w.message) for w in caught] == []
    monkeypatch.setenv("SRKIT_MAX_PIXELS", "100")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    with pytest.raises(ImageReadError, match="above the 100 pixels safety limit"):
        read_image(tmp_path / "small.png")


def test_unreadable_files_print_nothing_but_srkits_line(tmp_path, capfd):
    """OpenCV's own "[ WARN ...]" / "[ERROR ...]" console lines never reach the user."""
    (tmp_path / "bad.png").write_bytes(_noise_file("PNG")[:6000])
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "bad.png")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
