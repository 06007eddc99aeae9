"""The engine contract, checked for every registered engine (as pyiqa's tests loop over every metric): built from a
tiny model in its official weights layout through `from_weights`, an engine upscales a 16² image to exactly
scale× its size, in [0, 1], float32, on the CPU; a stochastic engine is seeded.  A new engine without a tiny model
in tests/tiny_models.py (or a reason in NEEDS_WEIGHTS) fails here."""

from __future__ import annotations

import pytest
import torch
from tiny_models import NEEDS_WEIGHTS, TINY_MODELS

from srkit.common import build_options
from srkit.engines.base import WeightsSet, get_engine, model_names


def test_contract_every_engine_has_a_tiny_model_or_a_reason() -> None:
    missing = [name for name in model_names() if name not in TINY_MODELS and name not in NEEDS_WEIGHTS]
    assert not missing, f"no tiny model for {missing}: add one to tests/tiny_models.py"


@pytest.mark.parametrize("name", model_names())
def test_contract_engine_upscales_a_small_image(name: str, tmp_path) -> None:
    if name in NEEDS_WEIGHTS:
        pytest.skip(NEEDS_WEIGHTS[name])
    engine_class, spec = get_engine(name)
    paths, options = TINY_MODELS[name](tmp_path)
    values = build_options(engine_class.options_class, options)
    assert set(paths) == set(engine_class.weights_for(values)), "the tiny model must provide what the engine asks"
    assert set(spec.weights) <= set(paths)
    engine = engine_class.from_weights(WeightsSet(paths), torch.device("cpu"), torch.float32, values)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reports: list[tuple[str, int, int]] = []

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed) if spec.stochastic else None
        return engine.upscale(image, generator=generator, progress=lambda *report: reports.append(report))

    out = run(0)
    assert out.shape == (1, 3, 16 * spec.scale, 16 * spec.scale)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if spec.stochastic:
        assert torch.equal(run(0), out), "the same seed must give the same output"
    assert all(done <= total for _, done, total in reports)
