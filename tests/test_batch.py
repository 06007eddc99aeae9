"""Batch planning (srkit/batch.py through api.upscale_paths): no silent data loss, every bad option refused before
a model loads, earlier outputs recognised, the Python API's arrays read by dtype."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import smooth_image
from PIL import Image

from srkit import api
from srkit.api import BatchInterrupted, load_engine, upscale_paths
from srkit.imageio import is_srkit_output

FAST = "realesr-animevideov3"


@pytest.fixture(scope="module")
def engine(tiny_compact_pth):
    return load_engine(FAST, weights=tiny_compact_pth, tile=None)


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model is an error: whatever these tests check must be settled before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api.EngineChoice, "load", refuse)


def picture(path: Path, seed: int = 0, size: tuple[int, int] = (10, 14)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((smooth_image(*size, seed=seed) * 255).astype(np.uint8)).save(path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(report) -> list[str]:
    return [out for result in report.results for out in result.outputs]


def test_same_stem_different_extensions_both_survive(tmp_path, engine):
    """`c/ -o out --ext png` with a.png and a.jpg: both were "ok" while one overwrote the other."""
    picture(tmp_path / "c" / "a.png", seed=0)
    picture(tmp_path / "c" / "a.jpg", seed=1)
    report = upscale_paths([tmp_path / "c"], tmp_path / "out", ext="png", upscaler=engine)
    assert report.counts()["ok"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_jpg.png", "a_png.png"]
    assert sha(tmp_path / "out" / "a_jpg.png") != sha(tmp_path / "out" / "a_png.png")
    beside = upscale_paths([tmp_path / "c" / "a.png", tmp_path / "c" / "a.jpg"], ext="png", upscaler=engine)
    assert sorted(Path(p).name for p in outputs(beside)) == ["a_jpg_x4.png", "a_png_x4.png"]


def test_a_glob_keeps_the_folders_below_its_fixed_part(tmp_path, engine):
    """`'g/d*/x.png' -o out/` for d1/x.png and d2/x.png wrote out/x.png twice."""
    picture(tmp_path / "g" / "d1" / "x.png", seed=0)
    picture(tmp_path / "g" / "d2" / "x.png", seed=1)
    report = upscale_paths([str(tmp_path / "g" / "d*" / "x.png")], tmp_path / "out", upscaler=engine)
    assert report.ok and sorted(outputs(report)) == [str(tmp_path / "out" / d / "x.png") for d in ("d1", "d2")]
    named = upscale_paths([tmp_path / "g" / "d1" / "x.png", tmp_path / "g" / "d2" / "x.png"], tmp_path / "o2",
                          upscaler=engine)  # fmt: skip
    assert sorted(outputs(named)) == [str(tmp_path / "o2" / d / "x.png") for d in ("d1", "d2")]


def test_a_collision_that_cannot_be_told_apart_is_refused_in_one_line(tmp_path, no_model):
    for name in ("a.png", "a.jpg", "a_jpg.png"):  # a.jpg becomes a_jpg.png, which a_jpg.png already writes
        picture(tmp_path / "c" / name)
    with pytest.raises(ValueError, match=r"a_jpg.png.*would all be written to .*a_jpg.png") as info:
        upscale_paths([tmp_path / "c"], tmp_path / "out", ext="png", model=FAST)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_running_twice_on_a_folder_replaces_its_own_outputs(tmp_path, engine):
    """The README's `srkit upscale photos/` twice: no "would overwrite an input", no a_x4_x4.png."""
    photos = tmp_path / "photos"
    picture(photos / "a.png", seed=0)
    picture(photos / "b.jpg", seed=1)
    first = upscale_paths([photos], upscaler=engine)
    assert first.ok and sorted(p.name for p in photos.iterdir()) == ["a.png", "a_x4.png", "b.jpg", "b_x4.jpg"]
    assert is_srkit_output(photos / "a_x4.png") and not is_srkit_output(photos / "a.png")
    second = upscale_paths([photos], upscaler=engine)
    assert second.ok and [r.status for r in second.results] == ["ok", "ok"]
    assert sorted(second.left_out) == [str(photos / "a_x4.png"), str(photos / "b_x4.jpg")]
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_x4.png", "b.jpg", "b_x4.jpg"]
    third = upscale_paths([photos], upscaler=engine, skip_existing=True)
    assert [r.status for r in third.results] == ["skipped", "skipped"]
    sample_outputs = upscale_paths([photos / "a_x4.png"], upscaler=engine)  # named directly: upscaled on purpose
    assert sample_outputs.ok and (photos / "a_x4_x4.png").is_file()


def test_a_users_file_named_like_an_output_stays_an_input_and_is_never_replaced(tmp_path, engine):
    photos = tmp_path / "photos"
    picture(photos / "a.png", seed=0)
    picture(photos / "a_x4.png", seed=1)  # the user's own photo, not written by srkit
    before = sha(photos / "a_x4.png")
    report = upscale_paths([photos], upscaler=engine)
    status = {Path(r.input).name: (r.status, r.error) for r in report.results}
    assert status["a_x4.png"] == ("ok", None) and (photos / "a_x4_x4.png").is_file()
    assert status["a.png"][0] == "failed" and "would overwrite an input" in status["a.png"][1]
    assert sha(photos / "a_x4.png") == before and report.left_out == []


def test_an_existing_file_srkit_did_not_write_is_not_replaced(tmp_path, engine):
    picture(tmp_path / "in" / "a.png", seed=0)
    foreign = picture(tmp_path / "out" / "a.png", seed=5)
    before = sha(foreign)
    report = upscale_paths([tmp_path / "in"], tmp_path / "out", upscaler=engine)
    assert report.results[0].status == "failed" and "not written by srkit" in report.results[0].error
    assert sha(foreign) == before
    skipped = upscale_paths([tmp_path / "in"], tmp_path / "out", upscaler=engine, skip_existing=True)
    assert skipped.results[0].status == "skipped" and sha(foreign) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ext": "bmp"}, "--ext bmp cannot be written"),
        ({"ext": "exr"}, "--ext exr cannot be written"),
        ({"scale": 0}, "--scale must be a positive finite number"),
        ({"scale": float("nan")}, "--scale must be a positive finite number"),
        ({"tile": "abc"}, "--tile must be auto, 0 .no tiling. or a pixel size, got 'abc'"),
        ({"tile": 16}, "--tile 16 must be larger than --tile-overlap 32"),
        ({"alpha": "keep"}, "--alpha must be one of model, resize, drop"),
        ({"resize_filter": "magic"}, "--resize-filter must be one of .*, got 'magic'"),
        ({"quality": 101}, "--quality must be in 1..100"),
        ({"samples": 2}, "--samples needs a stochastic model"),
        ({"denoise_strength": 0.3}, r"option 'denoise_strength' is not known to this model \(realesr-animevideov3\)"),
        ({"model": "realesr-general-x4v3", "denoise_strength": 1.5}, r"--denoise-strength must be in \[0, 1\]"),
        ({"model": "osediff", "tile": 256}, "tiles in latent space"),
    ],
)
def test_every_bad_option_is_refused_before_a_model_loads(tmp_path, no_model, options, message):
    picture(tmp_path / "a.png")
    with pytest.raises(ValueError, match=message) as info:
        upscale_paths([tmp_path / "a.png"], tmp_path / "out", **{"model": FAST, **options})
    assert "\n" not in str(info.value)


def test_an_output_folder_that_cannot_be_created_fails_before_the_model(tmp_path, no_model, monkeypatch):
    picture(tmp_path / "a.png")
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match="cannot write to the output folder .*file/out: Not a directory"):
        upscale_paths([tmp_path / "a.png"], tmp_path / "file" / "out", model=FAST)
    monkeypatch.setenv("SRKIT_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="SRKIT_MAX_PIXELS must be a positive number of pixels"):
        upscale_paths([tmp_path / "a.png"], tmp_path / "out", model=FAST)


def test_a_transparent_input_written_to_jpeg_warns_that_alpha_was_dropped(tmp_path, engine):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[2:8, 3:9, 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "flat.png")
    warnings: list[str] = []
    report = upscale_paths([tmp_path / "logo.png", tmp_path / "flat.png"], tmp_path / "out", ext="jpg",
                           upscaler=engine, warn=warnings.append)  # fmt: skip
    assert report.ok
    dropped = [w for w in warnings if "transparency dropped" in w]
    assert len(dropped) == 1 and "logo.png" in dropped[0] and "--ext png" in dropped[0]
    assert dropped == [w for w in report.warnings if "transparency" in w]


def test_ctrl_c_reports_what_was_written_and_what_was_not(tmp_path, engine, ctrl_c_on_second_image):
    for index in range(3):
        picture(tmp_path / "in" / f"{index}.png", seed=index)
    with pytest.raises(BatchInterrupted) as info:
        upscale_paths([tmp_path / "in"], tmp_path / "out", upscaler=engine)
    report = info.value.report
    assert [r.status for r in report.results] == ["ok", "not run", "not run"] and report.error == "interrupted"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png"]  # atomic: no partial second file


def test_the_total_and_each_file_name_are_known_before_the_work(tmp_path, engine):
    for index in range(3):
        picture(tmp_path / "in" / f"{index}.png", seed=index)
    events: list[tuple] = []
    upscale_paths([tmp_path / "in"], tmp_path / "out", upscaler=engine,
                  on_plan=lambda plan: events.append(("plan", len(plan.to_run()))),
                  on_start=lambda name, done, total: events.append(("start", Path(name).name, done, total)),
                  on_file=lambda result, done, total: events.append(("done", done, total)))  # fmt: skip
    assert events[:3] == [("plan", 3), ("start", "0.png", 0, 3), ("done", 1, 3)]
    assert events[-2:] == [("start", "2.png", 2, 3), ("done", 3, 3)]


@pytest.mark.parametrize("dtype, top", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1.0), (np.float64, 1.0)])
def test_the_python_api_reads_arrays_by_dtype(engine, dtype, top):
    """A uint8 array used to come back all white (read as floats 0..255)."""
    image = smooth_image(10, 12)
    out = engine.upscale((image * top).astype(dtype))
    assert out.dtype == dtype and out.shape == (40, 48, 3)
    reference = engine.upscale(image)
    assert np.abs(out.astype(np.float64) / top - reference).max() < 2 / 255
    assert 0.2 < out.astype(np.float64).mean() / top < 0.8  # not all white
    gray = engine.upscale((image[:, :, 0] * top).astype(dtype))
    assert gray.shape == (40, 48) and gray.dtype == dtype
    rgba = np.concatenate([image, np.ones((10, 12, 1), np.float32)], axis=2)
    assert engine.upscale((rgba * top).astype(dtype)).shape == (40, 48, 4)


@pytest.mark.parametrize(
    ("array", "error", "message"),
    [
        (np.full((8, 8, 3), 200.0, np.float32), ValueError, r"float image arrays must hold values in \[0, 1\], got 200"),
        (np.zeros((8, 8, 3), np.int32), TypeError, "must be uint8, uint16 or float"),
        (np.full((8, 8, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((8, 8, 5), np.uint8), ValueError, "C = 1..4"),
    ],
)
def test_the_python_api_refuses_arrays_it_cannot_read(engine, array, error, message):
    with pytest.raises(error, match=message):
        engine.upscale(array)


def test_ext_auto_keeps_the_format_and_writes_bmp_and_gif_as_png(tmp_path, engine):
    picture(tmp_path / "in" / "a.jpg")
    for name in ("b.bmp", "c.gif"):
        Image.fromarray((smooth_image(10, 14) * 255).astype(np.uint8)).save(tmp_path / "in" / name)
    report = upscale_paths([tmp_path / "in"], tmp_path / "out", upscaler=engine)
    assert report.ok and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg", "b.png", "c.png"]
    assert Image.open(tmp_path / "out" / "a.jpg").format == "JPEG"
