"""`srkit degrade` through Typer's runner, on an app that registers it the way srkit/cli.py does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import smooth_image
from PIL import Image
from typer.testing import CliRunner

from srkit.degrade.cli import degrade

app = typer.Typer()
app.command()(degrade)


@app.callback()
def main() -> None:
    """Stand-in for the srkit app (a callback makes `degrade` a sub-command, as it is there)."""


runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["degrade", *args], catch_exceptions=False)


def save(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)


@pytest.fixture()
def hr_dir(tmp_path) -> Path:
    folder = tmp_path / "hr"
    folder.mkdir()
    save(folder / "a.png", smooth_image(64, 48, seed=1))
    save(folder / "b.jpg", smooth_image(50, 70, seed=2))  # 50x70: cut to 48x68 for scale 4
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_writes_pairs_and_survives_a_corrupt_file(hr_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(str(hr_dir), "-o", str(out), "--scale", "4", "--seed", "0")
    assert result.exit_code == 1  # a file failed: reported, the batch went on
    assert sorted(p.name for p in (out / "HR").iterdir()) == ["a.png", "b.png"]
    assert sorted(p.name for p in (out / "LR").iterdir()) == ["a.png", "b.png"]
    assert Image.open(out / "HR" / "b.png").size == (68, 48)
    assert Image.open(out / "LR" / "b.png").size == (17, 12)
    assert Image.open(out / "LR" / "a.png").size == (12, 16)
    broken = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert len(broken) == 1 and broken[0].startswith("warning:")
    assert any("notes.txt" in line for line in result.stderr.splitlines())
    assert "wrote 2 pairs" in result.stderr


def test_same_seed_same_files_other_seed_other_lr(hr_dir, tmp_path):
    (hr_dir / "broken.png").unlink()
    runs = {}
    for name, seed in (("one", "3"), ("two", "3"), ("three", "4")):
        assert invoke(str(hr_dir), "-o", str(tmp_path / name), "--seed", seed).exit_code == 0
        runs[name] = np.asarray(Image.open(tmp_path / name / "LR" / "a.png"))
    assert np.array_equal(runs["one"], runs["two"])
    assert not np.array_equal(runs["one"], runs["three"])


def test_crop_center_and_random_with_scale_2(hr_dir, tmp_path):
    (hr_dir / "broken.png").unlink()
    for mode in ("center", "random"):
        out = tmp_path / mode
        result = invoke(str(hr_dir), "-o", str(out), "--scale", "2", "--crop", "40", "--crop-mode", mode,
                        "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert Image.open(out / "HR" / "a.png").size == (40, 40)
        assert Image.open(out / "LR" / "a.png").size == (20, 20)
    source = np.asarray(Image.open(hr_dir / "a.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "center" / "HR" / "a.png")), source[12:52, 4:44])
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "random" / "HR" / "a.png")), source[12:52, 4:44])


def test_config_file_is_used(hr_dir, tmp_path):
    (hr_dir / "broken.png").unlink()
    config = tmp_path / "gentle.toml"
    config.write_text("usm_sharpen = false\nfinal_sinc_prob = 0.0\n"
                      "[stage1]\nblur_prob = 0.0\nresize_prob = [0, 0, 1]\nnoise_range = [0, 0]\n"
                      "gaussian_noise_prob = 1.0\njpeg_range = [100, 100]\n"
                      "[stage2]\nblur_prob = 0.0\nresize_prob = [0, 0, 1]\nnoise_range = [0, 0]\n"
                      "gaussian_noise_prob = 1.0\njpeg_range = [100, 100]\n")
    for name, extra in (("gentle", ["--config", str(config)]), ("default", [])):
        assert invoke(str(hr_dir), "-o", str(tmp_path / name), *extra).exit_code == 0
    hr = np.asarray(Image.open(tmp_path / "gentle" / "HR" / "a.png").resize((12, 16), Image.BOX), np.float32)

    def error(name: str) -> float:
        return float(np.abs(np.asarray(Image.open(tmp_path / name / "LR" / "a.png"), np.float32) - hr).mean())

    assert error("gentle") < 6 < error("default")


@pytest.mark.parametrize(("args", "message"), [
    (["missing-folder"], "is not a folder"),
    (["{hr}", "--crop-mode", "middle"], "--crop-mode"),
    (["{hr}", "--config", "{tmp}/nope.toml"], "cannot read config"),
    (["{empty}"], "no images"),
    (["{hr}", "--device", "tpu:0"], "unknown device"),
])
def test_bad_input_exits_nonzero_with_one_line(hr_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    filled = [a.format(hr=hr_dir, tmp=tmp_path, empty=tmp_path / "empty") for a in args]
    result = invoke(*filled, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_refuses_to_write_into_the_input_folder(tmp_path):
    hr = tmp_path / "set" / "HR"
    hr.mkdir(parents=True)
    save(hr / "a.png", smooth_image(16, 16))
    result = invoke(str(hr), "-o", str(tmp_path / "set"))
    assert result.exit_code == 2 and "input folder" in result.stderr
