"""The `srkit` command line through Typer's runner, plus one real subprocess run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from srkit.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_upscale_a_folder_recursively_with_json(photos, tmp_path, tiny_compact_pth):
    result = invoke("upscale", str(photos), "-o", str(tmp_path / "out"), "-r", "--json",
                    "--model", "realesr-animevideov3", "--weights", str(tiny_compact_pth))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"] == {"ok": 3, "skipped": 0, "failed": 0}
    assert Image.open(tmp_path / "out" / "sub" / "c.png").size == (56, 40)
    assert (tmp_path / "out" / "b.jpg").exists()


def test_exit_code_is_nonzero_when_any_file_fails(photos, tmp_path, tiny_compact_pth):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    result = invoke("upscale", str(photos), "-o", str(tmp_path / "out"), "--weights", str(tiny_compact_pth),
                    "--model", "realesr-animevideov3", "-q")
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.jpg"]


def test_scale_ext_suffix_and_skip_existing(photos, tmp_path, tiny_compact_pth):
    common = ["--model", "realesr-animevideov3", "--weights", str(tiny_compact_pth), "-q"]
    result = invoke("upscale", str(photos / "a.png"), "-o", str(tmp_path / "o"), "--scale", "1.5",
                    "--ext", "webp", "--suffix", "_big", *common)
    assert result.exit_code == 0
    assert Image.open(tmp_path / "o" / "a_big.webp").size == (21, 15)
    again = invoke("upscale", str(photos / "a.png"), "-o", str(tmp_path / "o"), "--ext", "webp",
                   "--suffix", "_big", "--skip-existing", "--json", *common)
    assert json.loads(again.stdout)["counts"]["skipped"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["upscale", "x.png", "--model", "nope"], "unknown model 'nope'"),
        (["upscale", "x.png", "--model", "realesrgan-x2plus", "--offline"], "srkit weights pull realesrgan-x2plus"),
        (["upscale", "x.png", "--option", "guidance"], "key=value"),
        (["upscale", "x.png", "--guidance", "2"], "not known to this model"),
    ],
)
def test_bad_usage_is_one_clear_line(tmp_path, args, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    os.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_missing_input_fails(tmp_path):
    result = invoke("upscale", str(tmp_path / "missing.png"))
    assert result.exit_code == 1
    assert "no such file" in result.stderr or "no input" in result.stderr


def test_models_and_weights_listings():
    models = invoke("models")
    assert models.exit_code == 0 and "realesrgan-x4plus" in models.stdout and "BSD-3-Clause" in models.stdout
    detail = invoke("models", "realesr-general-x4v3")
    assert detail.exit_code == 0 and "denoise_strength" in detail.stdout
    weights = invoke("weights", "list")
    assert weights.exit_code == 0 and "realesrgan-x4plus" in weights.stdout


def test_weights_path_pull_verify_offline(srkit_home):
    assert invoke("weights", "path", "realesrgan-x4plus").stdout.strip().startswith(str(srkit_home))
    pulled = invoke("weights", "pull", "realesr-animevideov3")
    assert pulled.exit_code == 0
    assert "unverified" in invoke("weights", "verify", "realesr-animevideov3").stdout
    failed = invoke("weights", "pull", "realesrnet-x4plus")
    assert failed.exit_code == 1 and "srkit weights import realesrnet-x4plus" in failed.stderr


def test_planned_recipes_say_they_are_not_built_and_unknown_ones_are_refused(tmp_path):
    from srkit.train.recipes import RECIPES

    for name in [name for name, spec in RECIPES.items() if not spec.module]:
        result = invoke("finetune", "--recipe", name, "--data", str(tmp_path), "--out", str(tmp_path / "run"))
        assert result.exit_code == 2 and f"recipe '{name}' is not built yet" in result.stderr
    unknown = invoke("finetune", "--recipe", "magic", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert unknown.exit_code == 2 and "unknown recipe 'magic'" in unknown.stderr


def test_real_subprocess_upscale_of_the_example(tmp_path):
    """The README's promise: the embedded default upscales the example photo offline."""
    env = {**os.environ, "SRKIT_OFFLINE": "1"}
    out = tmp_path / "photo_x4.png"
    done = subprocess.run(
        [sys.executable, "-m", "srkit.cli", "upscale", str(REPO / "examples" / "photo.png"), "-o", str(out), "-q"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (512, 512)


def test_model_options_are_flags_after_the_inputs(photos, tmp_path, tiny_compact_pth):
    """Any option of the chosen model is `--name value` (or `--name=value`), wherever it stands."""
    from srkit.cli import CliError, split_engine_flags

    tokens = ["a.png", "--blur", "0.3", "b.png", "--steps=20", "--guidance", "-1.5"]
    assert split_engine_flags(tokens) == (["a.png", "b.png"], ["--blur", "0.3", "--steps", "20", "--guidance", "-1.5"])
    for dangling in (["a.png", "--blur"], ["a.png", "--blur", "--noise", "1"]):
        with pytest.raises(CliError, match="--blur expects a value"):
            split_engine_flags(dangling)
    result = invoke("upscale", str(photos / "a.png"), "--model", "realesr-animevideov3", "--weights",
                    str(tiny_compact_pth), "-o", str(tmp_path / "a.png"), "--seed", "1", "--denoise-strength", "0.2")
    assert result.exit_code == 0, result.output
    unknown = runner.invoke(app, ["upscale", str(photos / "a.png"), "--model", "realesr-animevideov3", "--weights",
                                  str(tiny_compact_pth), "-o", str(tmp_path / "b.png"), "--strength", "2"])
    assert unknown.exit_code == 2 and "option 'strength' is not known to this model" in unknown.stderr
    assert not (tmp_path / "b.png").exists()
