"""Golden parity with the official GDPO-SR inference (NAOSD noise injection; fixture ../shared/golden/naosd_tiny).

The `gdpo` engine is built through `from_weights` on the fixture's merged diffusers folder and scheduler, then
replays upstream's recorded noise at (t_diff, t_add) = (100, 250) (the paper's setting) and (250, 250).  The
`naosd` model name runs the same engine on other weights; each name runs one of the two cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from golden import fixture_dir, needs, tensors_fixture
from PIL import Image

from srkit.common import build_options
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.osediff import prepare_official

GOLDEN = fixture_dir("naosd_tiny")
TOLERANCE = 1e-4

pytestmark = needs(GOLDEN)


def read_rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


expected = tensors_fixture(GOLDEN / "expected.safetensors")


def test_golden_naosd_input_preparation() -> None:
    prepared = prepare_official(read_rgb(GOLDEN / "input_small.png"))
    np.testing.assert_array_equal(prepared, read_rgb(GOLDEN / "prepared_small.png"))


@pytest.mark.parametrize(("model", "t_diff", "t_add"), [("gdpo", 100, 250), ("naosd", 250, 250)])
def test_golden_naosd_recorded_noise(model: str, t_diff: int, t_add: int, expected) -> None:
    engine_class, spec = get_engine(model)
    options = build_options(
        engine_class.options_class,
        {
            "latent": "mode",
            "t_diff": t_diff,
            "t_add": t_add,
            "prompt_embeds": str(GOLDEN / "prompt_embeds.safetensors"),
        },
    )
    weights = WeightsSet({spec.weights[0]: GOLDEN / "merged", "sd21-text": GOLDEN / "base"})
    engine = engine_class.from_weights(weights, torch.device("cpu"), torch.float32, options)
    prepared = torch.from_numpy(read_rgb(GOLDEN / "prepared_small.png")).permute(2, 0, 1)[None].float() / 255
    case = f"small.t{t_diff}_{t_add}"
    restored = engine.restore(prepared * 2 - 1, noise=expected[f"{case}.noise"])
    error = (restored - expected[f"{case}.sr"]).abs().max().item()
    assert error <= TOLERANCE, f"max abs error {error:.2e}"
