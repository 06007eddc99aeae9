"""Image files in and out: bit depth by dtype, gray stays gray, alpha kept, EXIF orientation applied, ICC/EXIF
copied, atomic writes, and a marker in every file srkit writes.

Pixels are decoded by OpenCV because Pillow silently truncates 16-bit RGB to 8 bits; the header, metadata and
the size check come from Pillow, which reads them without decoding.  Inside srkit an image is float32 in [0, 1]
(H×W×1 or H×W×3) plus an optional H×W alpha plane.

`SRKIT_MAX_PIXELS` is the only size limit a user meets: Pillow's own decompression-bomb limit is set from it
(so it can be raised past Pillow's default, and Pillow's raw warning never reaches the user).  OpenCV's console
logging, and the libpng/libtiff warnings its codecs print straight to the stderr file descriptor ("iCCP: known
incorrect sRGB profile"), are silenced while it decodes: srkit reports every unreadable file itself, in one line.

Every output carries the EXIF Software tag `srkit <version>` (`is_srkit_output`): batch planning uses it to tell
srkit's earlier outputs from a user's photos, so a re-run replaces or skips them and never treats them as inputs.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, ImageFile, TiffImagePlugin, UnidentifiedImageError

from srkit import __version__
from srkit.common import atomic_path

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # srkit reports unreadable files itself

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
HIGH_DEPTH_FORMATS = {"PNG", "TIFF"}
ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
DEFAULT_MAX_PIXELS = 150_000_000
"""Inputs above this are refused before decoding (decompression bombs); SRKIT_MAX_PIXELS overrides."""
EXIF_ORIENTATION = 0x0112
EXIF_SOFTWARE = 0x0131
MARKER = f"srkit {__version__}"
"""The EXIF Software value of every file srkit writes (`is_srkit_output` matches its `srkit` prefix)."""
EXIF_SUB_IFDS = (0x8769, 0x8825)
"""Exif and GPS sub-directories: in a TIFF they hang off the image's own directory."""
TIFF_ICC_PROFILE = 34675
TIFF_STRIP_OFFSETS, TIFF_STRIP_BYTE_COUNTS, TIFF_EXTRA_SAMPLES = 273, 279, 338
TIFF_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 290, 291, 317, 320, 322, 323,
     324, 325, 338, 339, 340, 341, 347, 513, 514, 529, 530, 531, 532, TIFF_ICC_PROFILE}
)  # fmt: skip
"""How a TIFF stores its pixels (sizes, strips, tiles, compression): what `getexif()` of a TIFF input returns
besides metadata; never copied into an output's EXIF (the ICC profile travels on its own)."""


class ImageReadError(ValueError):
    """A file that cannot be used as an input image; the message is one line for the user."""


@dataclass(frozen=True)
class ImageData:
    pixels: np.ndarray
    """float32, H×W×C in [0, 1]; C is 1 (gray) or 3 (RGB)."""
    alpha: np.ndarray | None = None
    """float32 H×W in [0, 1], or None."""
    bit_depth: int = 8
    icc_profile: bytes | None = None
    exif: bytes | None = None
    """EXIF block with the orientation reset to 1 (pixels are already upright)."""
    format: str = "PNG"

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def is_gray(self) -> bool:
        return self.pixels.shape[2] == 1

    def rgb(self) -> np.ndarray:
        """H×W×3 view for the networks (gray replicated)."""
        return np.repeat(self.pixels, 3, axis=2) if self.is_gray else self.pixels

    def with_pixels(self, pixels: np.ndarray, alpha: np.ndarray | None) -> ImageData:
        return replace(self, pixels=pixels, alpha=alpha)


def max_pixels() -> int:
    """The pixel limit for inputs: SRKIT_MAX_PIXELS (an integer, `2e8` allowed), else 150 MP."""
    text = os.environ.get("SRKIT_MAX_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 1 and value < float("inf")):
        raise ValueError(f"SRKIT_MAX_PIXELS must be a positive number of pixels (e.g. 200000000), got '{text}'")
    return int(value)


def _pixels(count: int) -> str:
    return f"{count / 1e6:.0f} MP" if count >= 1e6 else f"{count} pixels"


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """Pillow's lazy open under srkit's one size limit; Pillow's own bomb warning is never shown."""
    Image.MAX_IMAGE_PIXELS = max_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                yield image
        except Image.DecompressionBombError:
            raise ImageReadError(
                f"{path} is above the {_pixels(max_pixels())} safety limit; set SRKIT_MAX_PIXELS to allow it"
            ) from None


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_image(path: str | Path) -> ImageData:
    """Decode an image file into srkit's float form, upright, with its metadata."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not raw:
        raise ImageReadError(f"{path} is empty (0 bytes)")
    header = _read_header(path)
    width, height = header.size
    exif = header.exif
    orientation = exif.get(EXIF_ORIENTATION, 1)
    pixels, alpha, depth = _decode(raw, header, path)
    if pixels.shape[:2] != (height, width):
        raise ImageReadError(f"{path} decodes to {pixels.shape[1]}x{pixels.shape[0]}, not its header's size")
    if header.mode in GRAY_MODES and pixels.shape[2] == 3:
        pixels = pixels[:, :, :1]
    pixels, alpha = _apply_orientation(pixels, orientation), _apply_orientation(alpha, orientation)
    if orientation != 1:
        exif[EXIF_ORIENTATION] = 1
    return ImageData(
        pixels=np.ascontiguousarray(pixels),
        alpha=None if alpha is None else np.ascontiguousarray(alpha[:, :, 0]),
        bit_depth=depth,
        icc_profile=header.icc_profile,
        exif=exif.tobytes() if len(exif) else None,
        format=header.format,
    )


@dataclass(frozen=True)
class _Header:
    format: str
    mode: str
    size: tuple[int, int]
    exif: Image.Exif
    icc_profile: bytes | None


def _read_header(path: Path) -> _Header:
    """Format, size and metadata without decoding pixels (Pillow opens lazily); refuses oversized images."""
    try:
        with _open(path) as image:
            width, height = image.size
            if width * height > max_pixels():
                raise ImageReadError(
                    f"{path} is {width}x{height} ({_pixels(width * height)}), above the "
                    f"{_pixels(max_pixels())} safety limit; set SRKIT_MAX_PIXELS to allow it"
                )
            return _Header(image.format or "?", image.mode, image.size, _exif(path, image), image.info.get("icc_profile"))
    except UnidentifiedImageError:
        raise ImageReadError(f"{path} is not an image or its format is not supported") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(f"{path} has a corrupt header: {exc}") from None


def _exif(path: Path, image: Image.Image) -> Image.Exif:
    """EXIF metadata without a TIFF input's pixel-layout tags; sub-directories read while the file is open."""
    exif = _png_exif(path) if image.format == "PNG" else image.getexif()
    for tag in TIFF_LAYOUT_TAGS & set(exif):
        del exif[tag]
    for tag in EXIF_SUB_IFDS:
        exif.get_ifd(tag)  # Pillow reads these lazily, from a file closed by then
    return exif


def is_srkit_output(path: str | Path) -> bool:
    """Whether srkit wrote this file (its EXIF Software tag starts with `srkit`); False for anything unreadable."""
    try:
        with _open(Path(path)) as image:
            return str(_exif(Path(path), image).get(EXIF_SOFTWARE, "")).startswith("srkit")
    except (OSError, SyntaxError, ValueError, struct.error, UnidentifiedImageError):
        return False


def _png_exif(path: Path) -> Image.Exif:
    """The eXIf chunk of a PNG, found by walking chunk headers (Pillow would decode the whole image for it)."""
    exif = Image.Exif()
    with open(path, "rb") as fh:
        fh.seek(8)
        while header := fh.read(8):
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header)
            if kind == b"eXIf":
                exif.load(b"Exif\x00\x00" + fh.read(length))
                break
            if kind == b"IEND":
                break
            fh.seek(length + 4, os.SEEK_CUR)
    return exif


def _decode(raw: bytes, header: _Header, path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(float pixels H×W×C, alpha H×W×1 or None, bit depth)."""
    array = None
    if header.format != "GIF":
        with _codec_messages_hidden():
            array = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        array = _decode_with_pillow(path)
    elif array.ndim == 3 and array.shape[2] >= 3:
        array = array[:, :, [2, 1, 0, 3][: array.shape[2]]]  # OpenCV is BGR(A)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype == np.uint8:
        depth, scale = 8, 255.0
    elif array.dtype == np.uint16:
        depth, scale = 16, 65535.0
    elif array.dtype == np.float32:
        depth, scale = 16, 1.0
    else:
        raise ImageReadError(f"{path} has an unsupported sample type ({array.dtype})")
    floats = array.astype(np.float32) / np.float32(scale)
    channels = floats.shape[2]
    if channels in (2, 4):
        return floats[:, :, : channels - 1], floats[:, :, channels - 1 :], depth
    return np.clip(floats, 0, 1), None, depth


@contextmanager
def _codec_messages_hidden() -> Iterator[None]:
    """Point the stderr file descriptor at /dev/null for one OpenCV call (C libraries write to it directly)."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to hide
        yield
        return
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _decode_with_pillow(path: Path) -> np.ndarray:
    """Formats OpenCV cannot decode (GIF); Pillow raises on truncated data instead of guessing."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with _open(path) as image:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path} is corrupt or truncated: {exc}") from None


_ORIENT_OPS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a, k=1)[::-1, :],
    8: lambda a: np.rot90(a, k=1),
}


def _apply_orientation(array: np.ndarray | None, orientation: int) -> np.ndarray | None:
    """Make the pixels upright as a viewer shows them (EXIF orientation tag 1..8)."""
    if array is None or orientation not in _ORIENT_OPS:
        return array
    return _ORIENT_OPS[orientation](array)


# ---------------------------------------------------------------------------------------------------------------
# Arrays (the Python API)

FLOAT_SLACK = 1 / 512
"""Float arrays may stray half an 8-bit level outside [0, 1] (rounding upstream); they are clipped."""


def from_array(array: np.ndarray) -> ImageData:
    """An H×W or H×W×C array (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) as srkit's image, read by its dtype:
    uint8 is 0..255, uint16 is 0..65535, floats are 0..1.  Anything else is refused rather than guessed."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape[:2]:
        raise ValueError(f"expected an H×W or H×W×C image array with C = 1..4 channels, got shape {array.shape}")
    if array.dtype == np.uint8:
        depth, floats = 8, array.astype(np.float32) / np.float32(255)
    elif array.dtype == np.uint16:
        depth, floats = 16, array.astype(np.float32) / np.float32(65535)
    elif np.issubdtype(array.dtype, np.floating):
        depth, floats = 16, array.astype(np.float32)
        if not np.isfinite(floats).all():
            raise ValueError("the image array holds NaN or infinite values")
        low, high = float(floats.min()), float(floats.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise ValueError(
                f"float image arrays must hold values in [0, 1], got {low:g}..{high:g}; "
                "divide 8-bit values by 255 (or pass the uint8 array itself)"
            )
        np.clip(floats, 0, 1, out=floats)
    else:
        raise TypeError(f"image arrays must be uint8, uint16 or float (values in [0, 1]), got {array.dtype}")
    if floats.shape[2] in (2, 4):
        return ImageData(floats[:, :, :-1], floats[:, :, -1], depth)
    return ImageData(floats, None, depth)


def to_array(image: ImageData, dtype: np.dtype, two_dimensional: bool = False) -> np.ndarray:
    """srkit's image as an array of `dtype` (the input's), alpha as the last channel; H×W when asked and gray."""
    planes = [image.pixels] + ([image.alpha[:, :, None]] if image.alpha is not None else [])
    values = np.concatenate(planes, axis=2)
    if dtype == np.uint8 or dtype == np.uint16:
        values = to_integer(values, 8 if dtype == np.uint8 else 16)
    else:
        values = values.astype(dtype)
    return values[:, :, 0] if two_dimensional and values.shape[2] == 1 else values


# ---------------------------------------------------------------------------------------------------------------
# Writing


def output_format(path: Path) -> str:
    try:
        return WRITE_FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"cannot write '{path.suffix}' files; use one of: {', '.join(sorted(WRITE_FORMATS))}"
        ) from None


def to_integer(values: np.ndarray, bit_depth: int, rows_per_block: int = 256) -> np.ndarray:
    """Round to 8 or 16 bits a block of rows at a time: outputs can be gigabytes, temporaries stay small."""
    top = 65535 if bit_depth == 16 else 255
    result = np.empty(values.shape, np.uint16 if bit_depth == 16 else np.uint8)
    for start in range(0, values.shape[0], rows_per_block):
        block = np.multiply(values[start : start + rows_per_block], top, dtype=np.float32)
        np.clip(block, 0, top, out=block)
        result[start : start + rows_per_block] = np.rint(block, out=block)
    return result


def keeps_alpha(fmt: str) -> bool:
    return fmt in ALPHA_FORMATS


def marked_exif(exif: bytes | None) -> bytes:
    """The image's EXIF block (or a new one) with Software set to srkit's marker."""
    block = Image.Exif()
    if exif:
        block.load(exif)
    block[EXIF_SOFTWARE] = MARKER
    return block.tobytes()


def encode_image(image: ImageData, fmt: str, sink: BinaryIO, quality: int = 95) -> None:
    """Write `image` as `fmt` to `sink`; 16-bit only where the format holds it, alpha only where it fits.

    ICC profile and EXIF are carried in every format and depth; the EXIF gets srkit's marker."""
    depth = image.bit_depth if fmt in HIGH_DEPTH_FORMATS else 8
    alpha = image.alpha if keeps_alpha(fmt) else None
    planes = [image.pixels] + ([alpha[:, :, None]] if alpha is not None else [])
    array = np.concatenate([to_integer(plane, depth) for plane in planes], axis=2)
    exif = marked_exif(image.exif)
    if depth == 16:
        sink.write(_encode_16bit(array, fmt, image.icc_profile, exif))
        return
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    pil = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)
    options: dict = {"exif": exif}
    if image.icc_profile:
        options["icc_profile"] = image.icc_profile
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = quality
    del array  # Pillow holds its own copy; free ours before encoding
    pil.save(sink, format=fmt, **options)


def _encode_16bit(array: np.ndarray, fmt: str, icc_profile: bytes | None, exif: bytes) -> bytes:
    if array.shape[2] >= 3:
        array = array[:, :, [2, 1, 0, 3][: array.shape[2]]]  # OpenCV wants BGR(A)
    with _codec_messages_hidden():
        ok, encoded = cv2.imencode(".png" if fmt == "PNG" else ".tiff", array)
    if not ok:
        raise OSError(f"OpenCV could not encode a 16-bit {fmt}")
    data = encoded.tobytes()
    if fmt == "PNG":
        return add_png_metadata(data, icc_profile, exif)
    return add_tiff_metadata(data, icc_profile, exif, alpha=array.shape[2] in (2, 4))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def add_png_metadata(png: bytes, icc_profile: bytes | None, exif: bytes | None) -> bytes:
    """Insert iCCP and eXIf chunks right after IHDR (OpenCV's PNG writer cannot carry them)."""
    ihdr_end = 8 + 4 + 4 + 13 + 4
    extra = b""
    if icc_profile:
        extra += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile))
    if exif:
        extra += _png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    return png[:ihdr_end] + extra + png[ihdr_end:]


def add_tiff_metadata(tiff: bytes, icc_profile: bytes | None, exif: bytes | None, alpha: bool) -> bytes:
    """A single-image TIFF (OpenCV's 16-bit output) rebuilt with an ICC profile, EXIF and ExtraSamples.

    OpenCV's TIFF writer can carry none of them.  The image directory is re-serialised by Pillow right after the
    header, the EXIF tags join it (its Exif/GPS sub-directories as nested directories, as a camera TIFF holds
    them), and the strips follow unchanged.
    """
    endian = "<" if tiff[:2] == b"II" else ">"
    (first,) = struct.unpack(endian + "I", tiff[4:8])
    directory = TiffImagePlugin.ImageFileDirectory_v2(tiff[:4] + struct.pack(endian + "I", 8))
    stream = io.BytesIO(tiff)
    stream.seek(first)
    directory.load(stream)
    dict(directory)  # decode every loaded tag: Pillow writes only decoded ones
    starts, counts = directory[TIFF_STRIP_OFFSETS], directory[TIFF_STRIP_BYTE_COUNTS]
    strips = b"".join(tiff[start : start + count] for start, count in zip(starts, counts, strict=True))
    directory[TIFF_STRIP_OFFSETS] = tuple(int(sum(counts[:index])) for index in range(len(counts)))  # Pillow adds the base
    if alpha:
        directory[TIFF_EXTRA_SAMPLES] = (2,)  # unassociated alpha: srkit's colours are not premultiplied
    if icc_profile:
        directory[TIFF_ICC_PROFILE] = icc_profile
    if exif:
        block = Image.Exif()
        block.load(exif)
        for tag, value in block.items():
            if tag not in directory and tag not in EXIF_SUB_IFDS:
                directory[tag] = value
        for tag in EXIF_SUB_IFDS:
            if sub := block.get_ifd(tag):
                directory[tag] = dict(sub)
    return directory._get_ifh() + directory.tobytes(8) + strips


def write_image(path: str | Path, image: ImageData, quality: int = 95) -> Path:
    """Encode into a temporary file beside `path`, then rename it into place: readers never see half a file."""
    path = Path(path)
    fmt = output_format(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        encode_image(image, fmt, fh, quality)
    return path
