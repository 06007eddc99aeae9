"""The ConsisSR engine on tiny random models in the official checkpoint layout (built here): any input size, seamless
64×64 latent tiles, the GAN-Embedding start, the registry (manual download, import, verify) and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_engine, check_seeded_upscale, tiny_consissr
from typer.testing import CliRunner

from srkit import registry
from srkit.api import load_engine
from srkit.cli import app
from srkit.common import build_options
from srkit.diffusion.denoiser import Conditioning, guided
from srkit.diffusion.samplers.ancestral import sample
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.consissr import pad_zeros, prepare_batch
from srkit.tiling import plan_latent_tiles


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The released model's latent size (64): 512² crops, 64×64 latent tiles."""
    return tiny_consissr(tmp_path_factory.mktemp("consissr"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A model trained (here: built) for 16×16 latents, 128² images: the same procedure, cheaper."""
    paths, options = tiny_consissr(tmp_path_factory.mktemp("consissr16"), latent_size=16)
    return paths, {**options, "latent_tile": 16, "latent_overlap": 8}


def build(tiny, **options):
    return build_engine("consissr", tiny, **options)


def picture(height: int, width: int, seed: int = 0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.stack([x, y, (x + y) / 2])[None]
    return (smooth + 0.05 * torch.rand(1, 3, height, width, generator=gen)).clamp(0, 1)


def test_consissr_output_is_exactly_4x_seeded_and_in_range(small) -> None:
    """A small non-square input is enlarged to the trained size upstream; srkit returns exactly 4× the input."""
    engine = build(small, steps=1)
    image = picture(20, 28)
    check_seeded_upscale(engine, image, (1, 3, 80, 112))


def test_consissr_trained_size_runs_as_one_tile_equal_to_the_plain_sampler(tiny) -> None:
    """A 512² model input is exactly one 64×64 latent tile: the tiled path equals the plain network call."""
    engine = build(tiny, steps=2)
    control = pad_zeros(prepare_batch(picture(128, 128), engine.process_size)) * 2 - 1
    start = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3))
    noises = [torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    tiled_latent = engine.generate(control, draw=lambda i, like: noises[i], start_noise=start)
    nets = engine.nets
    with torch.inference_mode():
        whole = Conditioning(
            {"text": engine.text_positive, "image": nets.image_token(control)},
            {"hint": nets.embed_hint(nets.hint(control))},
        )
        plain = guided(engine.network, lambda c: c.with_tokens(text=engine.text_negative), 5.0)
        reference = sample(plain, engine.sampler, start, whole, lambda i, like: noises[i])
    torch.testing.assert_close(tiled_latent, reference, rtol=0, atol=1e-5)


def seam_score(image: np.ndarray, rows: list[int], axis: int) -> float:
    """Mean |second difference| across the given rows/columns (over the mean elsewhere)."""
    second = np.abs(np.diff(image.astype(np.float64), n=2, axis=axis)).mean(axis=tuple(i for i in (0, 1, 2) if i != axis))
    return float(np.mean([second[r - 1] for r in rows]) / second.mean())


def test_consissr_1024_output_through_latent_tiles_has_no_seam(tiny) -> None:
    """256² LR -> 1024² output -> a 128² latent on 3×3 tiles of the model's 64×64: no visible seam where tiles
    meet (the tiling tests' second-difference metric)."""
    engine = build(tiny, steps=1, official_8bit="false", color_fix="none")
    out = engine.upscale(picture(256, 256), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 1024, 1024)
    grid = plan_latent_tiles(128, 128, 64, engine.options.latent_overlap)
    assert len(grid) == 9
    crossings = [8 * (b + (a + 64 - b) // 2) for a, b in zip(grid.ys, grid.ys[1:])]
    image = out[0].permute(1, 2, 0).numpy()
    for axis in (0, 1):
        assert seam_score(image, crossings, axis) < 1.5


def test_consissr_gan_embedding_start(small, tiny_compact_pth, tmp_path) -> None:
    """--start gan runs the start model, q-samples its hint latent at t_max and runs the truncated schedule."""
    paths, defaults = small
    engine_class, _ = get_engine("consissr")
    options = build_options(engine_class.options_class,
                            {**defaults, "start": "gan", "start_model": "realesr-animevideov3", "steps": 2})  # fmt: skip
    assert engine_class.weights_for(options) == ("consissr", "realesr-animevideov3")
    weights = WeightsSet({**paths, "realesr-animevideov3": tiny_compact_pth})
    engine = engine_class.from_weights(weights, torch.device("cpu"), torch.float32, options)
    assert list(engine.sampler.timesteps) == [599, 0]
    out = engine.upscale(picture(16, 16), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="x4 GAN model"):
        bad = build_options(engine_class.options_class, {**defaults, "start": "gan", "start_model": "osediff"})
        engine_class.from_weights(weights, torch.device("cpu"), torch.float32, bad)


def test_consissr_options_are_checked_before_loading() -> None:
    engine_class, _ = get_engine("consissr")
    for values, message in (({"start": "vae"}, "start must be"), ({"start_t": 1.5}, "start_t"), ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=message):
            build_options(engine_class.options_class, values)


def test_consissr_without_weights_says_what_to_run_and_is_listed(tmp_path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    result = CliRunner().invoke(app, ["upscale", str(tmp_path / "x.png"), "--model", "consissr"])
    assert result.exit_code == 2
    assert "srkit weights import consissr ConsisSR.ckpt" in result.stderr and "drive.google.com" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    listing = CliRunner().invoke(app, ["models"])
    row = next(line for line in listing.stdout.splitlines() if "consissr" in line)
    assert row.split()[1:4] == ["x4", "50", "manual"]
    assert "Apache-2.0" in CliRunner().invoke(app, ["models", "consissr"]).stdout  # licences: in the details


def test_consissr_import_verify_and_upscale_by_name(small, tmp_path, monkeypatch) -> None:
    """The manual-download path: `srkit weights import consissr FILE` records the file's sha256, `verify` checks
    it, and `--model consissr` then runs from the cache."""
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    paths, defaults = small
    registry.import_file("consissr", paths["consissr"])
    assert registry.verify("consissr") == [("ConsisSR.ckpt", "ok")]
    upscaler = load_engine("consissr", **{**defaults, "steps": 1})
    out = upscaler.upscale(np.random.default_rng(0).random((16, 12, 3)).astype(np.float32))
    assert out.shape == (64, 48, 3)
    cached = registry.entry_path(registry.load_registry().entry("consissr"))
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    assert registry.verify("consissr") == [("ConsisSR.ckpt", "mismatch")]
