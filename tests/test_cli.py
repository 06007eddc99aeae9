"""The `srkit` command line through Typer's runner, plus one real subprocess run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
    assert summary["counts"] == {"ok": 3, "skipped": 0, "failed": 0, "not run": 0}
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
    assert json.loads(again.stdout)["counts"]["skipped"] == 1 and again.exit_code == 0


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
    assert models.exit_code == 0 and "realesrgan-x4plus" in models.stdout
    detail = invoke("models", "realesr-general-x4v3")
    assert detail.exit_code == 0 and "--denoise-strength" in detail.stdout and "BSD-3-Clause" in detail.stdout
    weights = invoke("weights", "list")
    assert weights.exit_code == 0 and "realesrgan-x4plus" in weights.stdout


def test_weights_path_pull_verify_offline(srkit_home):
    assert invoke("weights", "path", "realesrgan-x4plus").stdout.strip().startswith(str(srkit_home))
    pulled = invoke("weights", "pull", "realesr-animevideov3")
    assert pulled.exit_code == 0
    assert "unverified" in invoke("weights", "verify", "realesr-animevideov3").stdout
    failed = invoke("weights", "pull", "realesrnet-x4plus")
    assert failed.exit_code == 1 and "srkit weights import realesrnet-x4plus" in failed.stderr


def test_planned_misplaced_and_unknown_recipes_are_refused(tmp_path):
    from srkit.train.recipes import RECIPES

    for name, spec in RECIPES.items():
        if not spec.module:
            result = invoke(spec.command, "--recipe", name, "--data", str(tmp_path), "--out", str(tmp_path / "run"))
            assert result.exit_code == 2 and f"recipe '{name}' is not built yet" in result.stderr
    result = invoke("distill", "--recipe", "naosd", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "run by `srkit finetune`" in result.stderr
    unknown = invoke("finetune", "--recipe", "magic", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert unknown.exit_code == 2 and "unknown recipe 'magic'" in unknown.stderr


NETWORK_TRIPWIRE = """
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["SRKIT_TEST_NETWORK_LOG"], "a") as log:
        log.write(f"network attempt: {args}\\n")
    raise OSError("this test forbids the network")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""


def test_make_demo_makes_no_network_attempt(tmp_path):
    """The README's first command on a fresh clone: `make demo` (its install step aside) upscales the example
    with the embedded default, and any socket it opened would be logged and refused."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    tripwire = tmp_path / "tripwire"
    tripwire.mkdir()
    (tripwire / "sitecustomize.py").write_text(NETWORK_TRIPWIRE)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srkit").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m srkit "$@"\n')
    (bin_dir / "srkit").chmod(0o755)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    log = tmp_path / "network.log"
    env = {key: value for key, value in os.environ.items() if key not in ("SRKIT_OFFLINE", "HF_HUB_OFFLINE")}
    env.update(SRKIT_HOME=str(tmp_path / "fresh-home"), PYTHONPATH=f"{tripwire}{os.pathsep}{REPO}",
               SRKIT_TEST_NETWORK_LOG=str(log))  # fmt: skip
    done = subprocess.run(  # `-o install`: the venv step is not what is tested; BIN: this checkout's srkit
        [make, "-f", str(REPO / "Makefile"), "-o", "install", "demo", f"BIN={bin_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not log.exists(), log.read_text()
    assert Image.open(tmp_path / "out" / "photo_x4.png").size == (512, 512)
    assert "built RealESRGAN_x4plus.converted.safetensors from the installed wheel" in done.stderr


def test_model_options_are_flags_after_the_inputs(photos, tmp_path, tiny_compact_pth):
    """Any option of the chosen model is `--name value` (or `--name=value`), wherever it stands."""
    from srkit.cli import CliError, split_engine_flags

    tokens = ["a.png", "--blur", "0.3", "b.png", "--steps=20", "--guidance", "-1.5"]
    assert split_engine_flags(tokens) == (["a.png", "b.png"], ["--blur", "0.3", "--steps", "20", "--guidance", "-1.5"])
    for dangling in (["a.png", "--blur"], ["a.png", "--blur", "--noise", "1"]):
        with pytest.raises(CliError, match="--blur expects a value"):
            split_engine_flags(dangling)
    result = invoke("upscale", str(photos / "a.png"), "--model", "realesr-animevideov3", "--weights",
                    str(tiny_compact_pth), "-o", str(tmp_path / "a.png"), "--seed", "1")
    assert result.exit_code == 0, result.output
    checked = invoke("upscale", str(photos / "a.png"), "--model", "realesr-general-x4v3", "--denoise-strength=2")
    assert checked.exit_code == 2 and "--denoise-strength must be in [0, 1], got 2.0" in checked.stderr
    unknown = runner.invoke(app, ["upscale", str(photos / "a.png"), "--model", "realesr-animevideov3", "--weights",
                                  str(tiny_compact_pth), "-o", str(tmp_path / "b.png"), "--strength", "2"])
    assert unknown.exit_code == 2 and "option 'strength' is not known to this model" in unknown.stderr
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--ext", "bmp"], ["--ext", "gif"], ["--ext", "exr"], ["--scale", "0"], ["--scale", "-1"], ["--scale", "nan"],
        ["--scale", "inf"], ["--tile", "abc"], ["--tile", "-3"], ["--tile-overlap", "-1"], ["--alpha", "keep"],
        ["--resize-filter", "magic"], ["--quality", "0"], ["-o", "out.bmp"], ["-o", "file/out"],
        ["--denoise-strength", "0.3"], ["--samples", "2"], ["--suffix", "a/b"], ["--device", "tpu"],
    ],
    ids=lambda args: " ".join(args),
)
def test_every_bad_option_is_one_line_exit_2_in_under_a_second_before_any_model(tmp_path, monkeypatch, args):
    from srkit import api

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(api.EngineChoice, "load", refuse)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    result = runner.invoke(app, ["upscale", "x.png", "--model", "realesr-animevideov3", *args])
    assert time.perf_counter() - started < 1.0
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "invalid literal" not in result.output and "Errno" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "x.png"]  # nothing written


def test_json_always_prints_one_object(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    missing = invoke("upscale", str(tmp_path / "x.png"), "--model", "realesrgan-x2plus", "--json")
    assert missing.exit_code == 2
    document = json.loads(missing.stdout)
    assert "srkit weights pull realesrgan-x2plus" in document["error"] and document["files"] == []
    bad = invoke("upscale", str(tmp_path / "x.png"), "--scale", "0", "--json")
    assert bad.exit_code == 2 and "--scale" in json.loads(bad.stdout)["error"]
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = invoke("upscale", str(empty), "--json")
    assert nothing.exit_code == 1 and json.loads(nothing.stdout)["error"] == "no input images found"


def test_version_and_models_fit_a_terminal():
    from srkit import __version__

    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"srkit {__version__}"
    listing = invoke("models")
    lines = listing.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("realesrgan-x4plus-anime-6b", "osediff", "s3diff"):
        assert sum(line.split()[0] == name for line in lines if line.strip()) == 1  # one whole line per model


def test_ctrl_c_during_a_batch_says_what_was_written_and_what_was_not(photos, tmp_path, tiny_compact_pth,
                                                                      ctrl_c_on_second_image):
    common = [str(photos), "-r", "--model", "realesr-animevideov3", "--weights", str(tiny_compact_pth)]
    result = invoke("upscale", *common, "-o", str(tmp_path / "out"))
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "interrupted: 1 file(s) written (a.png); 2 not written (b.jpg, c.png)" in result.stderr
    ctrl_c_on_second_image.clear()
    as_json = invoke("upscale", *common, "-o", str(tmp_path / "out2"), "--json")
    document = json.loads(as_json.stdout)
    assert as_json.exit_code == 130 and document["error"] == "interrupted"
    assert [f["status"] for f in document["files"]] == ["ok", "not run", "not run"]


def test_ctrl_c_while_srkit_is_still_importing_exits_quietly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module in ("srkit", "srkit.cli"):
        process = subprocess.Popen([sys.executable, "-m", module, "upscale", "x.png"], env=env, cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(0.4)  # the interpreter is up; srkit, then torch (after the option checks), are importing
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        # "interrupted" during srkit's imports and option parsing; "... before any file was written" during PyTorch's
        assert err in ("interrupted\n", "interrupted before any file was written\n") and out == ""


def test_the_progress_shows_the_file_the_total_and_an_eta():
    from rich.progress import TimeRemainingColumn

    from srkit.batch import BatchPlan, PlannedFile
    from srkit.cli import _FileProgress

    bar = _FileProgress(enabled=False)
    plan = BatchPlan([PlannedFile(Path(f"{n}.png"), [], "run") for n in "abc"])
    bar.plan(plan)
    task = bar.progress.tasks[0]
    assert task.total == 3 and task.completed == 0  # known before the model loads
    bar.start("photos/b.png", 1, 3)
    assert task.description == "b.png" and task.completed == 1
    assert any(isinstance(column, TimeRemainingColumn) for column in bar.progress.columns)


def test_library_warnings_become_one_srkit_line(tmp_path, monkeypatch):
    import warnings

    from srkit import api

    def warn_like_a_library(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated.\nIt will be removed in the future.", UserWarning, stacklevel=1)
        return api.BatchReport("m", [api.FileResult("a.png", "ok")])

    monkeypatch.setattr(api, "run_upscale", warn_like_a_library)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = invoke("upscale", "a.png")
    assert result.exit_code == 0
    assert "warning: TypedStorage is deprecated.\n" in result.stderr
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr and "removed" not in result.stderr
