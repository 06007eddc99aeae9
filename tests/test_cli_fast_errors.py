"""Every bad option of `srkit upscale` is refused before PyTorch loads: one line, exit code 2.

Importing PyTorch takes seconds (1.7–2.7 s on the project's machines), so an error that needs no model must not
wait for it.  Each case runs the real console entry point in a fresh interpreter in which `import torch` fails:
the expected one-line error proves that the check ran without PyTorch, hence before any model could load.  How
long the refusal takes is measured by benchmarks/bench_cli_errors.py, not asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WITHOUT_TORCH = (
    "import sys; sys.modules['torch'] = None; "  # `import torch` now raises ImportError
    "from srkit.__main__ import main; sys.argv = ['srkit', *sys.argv[1:]]; main()"
)


def run_without_torch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], check=False, capture_output=True, text=True, cwd=cwd,
                          timeout=60)  # fmt: skip


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path


BAD_OPTIONS = {
    "unknown --ext": (["--ext", "bmp"], "--ext bmp cannot be written"),
    "zero --scale": (["--scale", "0"], "--scale must be a positive finite number"),
    "non-finite --scale": (["--scale", "nan"], "--scale must be a positive finite number"),
    "--tile not a number": (["--tile", "abc"], "--tile must be auto, 0 (no tiling) or a pixel size"),
    "--tile below the overlap": (["--tile", "16"], "--tile 16 must be larger than --tile-overlap 32"),
    "unknown --alpha": (["--alpha", "keep"], "--alpha must be one of"),
    "unknown --resize-filter": (["--resize-filter", "sinc"], "--resize-filter must be one of lanczos"),
    "--quality out of range": (["--quality", "0"], "--quality must be in 1..100"),
    "--quality not a number": (["--quality", "high"], "Invalid value for '--quality'"),
    "--samples below 1": (["--samples", "0"], "--samples must be at least 1"),
    "--samples on a deterministic model": (["--samples", "2"], "--samples needs a stochastic model"),
    "unknown --dtype": (["--dtype", "fp64"], "unknown dtype 'fp64'"),
    "unknown model": (["--model", "nosuch"], "unknown model 'nosuch'; known models:"),
    "an option the model does not take": (["--denoise-strength", "0.3"], "option 'denoise_strength' is not known"),
    "a diffusion model's option on another": (["-m", "osediff", "--blur", "0.3"], "option 'blur' is not known"),
    "a bad value of a model option": (["-m", "osediff", "--color-fix", "sharp"], "color_fix must be one of"),
    "an unknown tagger": (["-m", "seesr", "--tagger", "clip"], "tagger must be one of"),
    "--tile on a latent-tiled model": (["-m", "s3diff", "--tile", "256"], "tiles in latent space"),
    "an option without its value": (["--blur"], "--blur expects a value"),
    "an output folder that cannot be created": (["-o", "/proc/srkit-nope/out"], "cannot write to the output folder"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_a_bad_option_is_one_line_and_exit_2_without_pytorch(case, image, tmp_path):
    args, expected = BAD_OPTIONS[case]
    result = run_without_torch("upscale", str(image), *args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "torch" not in result.stderr
    assert not list(tmp_path.glob("in_x*")), "nothing may be written"


@pytest.mark.parametrize("args", [("--quality", "high"), ("--samples",)], ids=["a value of the wrong type", "a missing value"])
def test_a_parser_error_points_to_the_commands_help(args, image, tmp_path):
    """The parser's own errors end with where to read the options, also when the parser gives no context (a
    missing value)."""
    result = run_without_torch("upscale", str(image), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("(see `srkit upscale --help`)"), result.stderr


def test_json_answers_a_bad_option_with_one_object_without_pytorch(image, tmp_path):
    result = run_without_torch("upscale", str(image), "--json", "--ext", "bmp", cwd=tmp_path)
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert "--ext bmp cannot be written" in document["error"] and document["files"] == []


def test_a_good_request_gets_past_the_checks_to_pytorch(image, tmp_path):
    """The control: the same entry point with valid options does reach PyTorch (here: the import that fails), so
    the cases above were refused by the checks, not by a broken start-up."""
    result = run_without_torch("upscale", str(image), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0 and "torch" in result.stderr


def test_the_command_line_starts_without_pytorch():
    """What `srkit` imports to parse and check options (the CLI, the catalogue of models, their options, the
    request planner) imports no PyTorch; only running a model does."""
    code = ("import sys, srkit.cli, srkit.request, srkit.engines.base, srkit.engines.catalogue; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [("models",), ("models", "seesr")], ids=["list", "one model"])
def test_models_are_listed_from_the_catalogue_without_pytorch(args, tmp_path):
    result = run_without_torch(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "seesr" in result.stdout and "torch" not in result.stderr


def test_srkit_tag_refuses_an_unknown_tagger_without_pytorch(image, tmp_path):
    result = run_without_torch("tag", str(image), "--tagger", "clip", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "error: --tagger must be one of dape, ram, got 'clip'"


@pytest.mark.parametrize(("command", "recipe", "expected"), [
    ("finetune", "nosuch", "unknown recipe 'nosuch'"),
    ("finetune", "cid", "recipe 'cid' is run by `srkit distill`, not `srkit finetune`"),
])  # fmt: skip
def test_a_wrong_recipe_is_refused_without_pytorch(command, recipe, expected, tmp_path):
    result = run_without_torch(command, "--recipe", recipe, "--data", str(tmp_path), "-o", str(tmp_path / "run"),
                               cwd=tmp_path)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
