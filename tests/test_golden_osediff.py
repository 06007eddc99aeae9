"""Golden parity with the official OSEDiff code (fixture: ../shared/golden/osediff_tiny, see its README).

The engine is built through its normal loading path (`from_weights`: osediff.pkl read with weights_only, LoRA
merged into the tiny SD2 base, scheduler from the folder) and must reproduce upstream's input preparation, its
untiled and latent-tiled outputs (≤ 1e-4) and its colour fixes (8-bit, within 1 level).  The fixture encodes
with the posterior mode, so the engine runs with `latent="mode"`, and without a colour fix or 8-bit truncation
so that its float output can be compared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from golden import fixture_dir, needs, tensors_fixture
from PIL import Image

from srkit.colorfix import color_fix
from srkit.common import build_options
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.osediff import prepare_official
from srkit.tiling import plan_latent_tiles

GOLDEN = fixture_dir("osediff_tiny")
FLOAT_TOLERANCE = 1e-4
PNG_NAMES = {"none": "nofix", "adain": "adain", "wavelet": "wavelet"}

pytestmark = needs(GOLDEN)


def read_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


expected = tensors_fixture(GOLDEN / "expected.safetensors")


@pytest.fixture(scope="module")
def engine():
    engine_class, _ = get_engine("osediff")
    options = build_options(
        engine_class.options_class,
        {
            "latent": "mode",
            "color_fix": "none",
            "official_8bit": False,
            "prompt_embeds": str(GOLDEN / "prompt_embeds.safetensors"),
        },
    )
    base = GOLDEN / "base"  # unet, vae, scheduler; no text encoder (the prompt embedding is precomputed)
    weights = WeightsSet({"osediff": GOLDEN / "osediff.pkl", "sd21-base": base, "sd21-text": base})
    return engine_class.from_weights(weights, torch.device("cpu"), torch.float32, options)


@pytest.mark.parametrize("case", ["small", "tiled"])
def test_golden_osediff_input_preparation(case: str) -> None:
    prepared = prepare_official(read_rgb(GOLDEN / f"input_{case}.png"))
    np.testing.assert_array_equal(prepared, read_rgb(GOLDEN / f"prepared_{case}.png"))


@pytest.mark.parametrize("case", ["small", "tiled"])
@pytest.mark.parametrize("method", sorted(PNG_NAMES))
def test_golden_osediff_colour_fixes(case: str, method: str, expected) -> None:
    """The engine's colour-fix step (official 8-bit mode, its default) on upstream's float output.

    Checked on upstream's own float output because AdaIN on this tiny random model multiplies contrast by
    10-20×: a 1e-5 difference that flips one 8-bit truncation would become a 20-level difference.
    """
    prepared = to_tensor(read_rgb(GOLDEN / f"prepared_{case}.png"))
    fixed = color_fix(expected[f"{case}.sr"] * 0.5 + 0.5, prepared, method, official_8bit=True)
    reference = read_rgb(GOLDEN / f"sr_{case}_{PNG_NAMES[method]}.png").astype(int)
    assert np.abs(to_uint8(fixed).astype(int) - reference).max() <= 1


def test_golden_osediff_untiled(engine, expected) -> None:
    """32×32 input: enlarged to 128, ×4 = 512², latent 64² (one piece)."""
    prepared = to_tensor(read_rgb(GOLDEN / "prepared_small.png"))
    restored = engine.restore(prepared * 2 - 1)
    error = (restored - expected["small.sr"]).abs().max().item()
    assert error <= FLOAT_TOLERANCE, f"max abs error {error:.2e}"


def test_golden_osediff_latent_tiled_end_to_end(engine, expected) -> None:
    """200×200 input through `upscale` (800², exactly 4×): latent 100² is tiled (96, overlap 32, Gaussian)."""
    assert plan_latent_tiles(100, 100, engine.options.latent_tile, engine.options.latent_overlap) is not None
    lr = to_tensor(read_rgb(GOLDEN / "input_tiled.png"))
    output = engine.upscale(lr)
    assert output.shape == (1, 3, 800, 800)
    restored = output * 2 - 1
    error = (restored - expected["tiled.sr"]).abs().max().item()
    assert error <= FLOAT_TOLERANCE, f"max abs error {error:.2e}"
