"""The SeeSR engine on a tiny random model in the released folder layout with a tiny RAM + DAPE: the prompt of each
image's tags, latent tiles, seeding, turbo, and the errors without weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_engine, check_seeded_upscale, tiny_seesr
from typer.testing import CliRunner

from srkit.cli import app
from srkit.common import build_options
from srkit.diffusion.text import QUALITY_PROMPT
from srkit.engines.base import WeightsSet, get_engine
from srkit.tiling import plan_latent_tiles


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_seesr(tmp_path_factory.mktemp("seesr"))


def build(tiny, **options):
    return build_engine("seesr", tiny, **options)


def lr(height: int = 20, width: int = 24) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_seesr_upscales_4x_seeded_with_the_tags_of_the_raw_lr(tiny) -> None:
    engine = build(tiny)
    image = lr()
    tags = engine.tagger.tags(image)
    assert engine.prompter.texts(tags) == [f"{tags[0]}, ,{QUALITY_PROMPT}"]
    check_seeded_upscale(engine, image, (1, 3, 80, 96))


def test_seesr_latent_tiles_report_progress_and_tagger_none_keeps_the_image_tokens(tiny) -> None:
    """A 64×64 LR is enlarged to 128 first (upstream), so its 64×64 latent runs on 16×16 tiles; every step and
    tile is reported."""
    engine = build(tiny, tagger="none")
    assert engine.prompter.tagger is None and engine.tagger is not None
    reports: list[tuple[str, int, int]] = []
    out = engine.upscale(lr(64, 64), generator=torch.Generator().manual_seed(0), progress=lambda *r: reports.append(r))
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()
    tiles = len(plan_latent_tiles(64, 64, 16, 4))
    assert ("steps", 2, 2) in reports and {total for what, _, total in reports if what == "tiles"} == {tiles}


def test_seesr_turbo_and_option_checks(tiny) -> None:
    engine_class, _ = get_engine("seesr")
    turbo = build_options(engine_class.options_class, {"turbo": "true"})
    assert "sd-turbo" in engine_class.weights_for(turbo) and "sd2-base" not in engine_class.weights_for(turbo)
    paths, defaults = tiny
    weights = {**paths, "sd-turbo": paths["sd2-base"]}
    engine = engine_class.from_weights(WeightsSet(weights), torch.device("cpu"), torch.float32,
                                       build_options(engine_class.options_class, {**defaults, "turbo": "true", "steps": None}))  # fmt: skip
    assert len(engine.sampler) == 2 and engine.guidance_scale == 1.0
    with pytest.raises(ValueError, match="start must be"):
        build_options(engine_class.options_class, {"start": "gan"})


def test_seesr_and_dape_without_weights_say_what_to_run(tmp_path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    seesr = CliRunner().invoke(app, ["upscale", str(tmp_path / "x.png"), "--model", "seesr"])
    assert seesr.exit_code == 2 and len(seesr.stderr.strip().splitlines()) == 1
    assert "srkit weights import seesr" in seesr.stderr
    dape = CliRunner().invoke(app, ["upscale", str(tmp_path / "x.png"), "--model", "osediff", "--tagger", "dape"])
    assert dape.exit_code == 2 and len(dape.stderr.strip().splitlines()) == 1
    assert "srkit weights pull" in dape.stderr
