"""GenDR on a tiny srkit-format checkpoint and a tiny 16-channel VAE folder (CPU, seconds).

GenDR's authors publish no weights, so these tests pin what srkit defines: the checkpoint format (safetensors with
a JSON config in its header), the 16-channel VAE loaded from a diffusers folder with its own scaling factor, the
one-step update z_g = (z_l − β̄·ε̂)/ᾱ, the error that says how to get weights, and the CLI path end to end.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import TWO_LEVELS, tiny_unet
from typer.testing import CliRunner

from srkit import registry
from srkit.cli import app
from srkit.common import build_options
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.gendr import GenDRCheckpoint, load_vae16, save_checkpoint, save_gendr
from srkit.registry import WeightsError

VAE16_SCALE = 0.24447420268654824
CROSS_DIM = 16


def tiny_unet16(seed: int = 0, channels: int = 16):
    return tiny_unet(seed, **TWO_LEVELS, in_channels=channels, out_channels=channels, cross_attention_dim=CROSS_DIM)


def tiny_vae16(seed: int = 1):
    """The ostris f8-d16 layout in miniature: 16 latent channels, its scaling factor, force_upcast."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        latent_channels=16, block_out_channels=(4, 4, 8, 8), mid_block_add_attention=False, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=2,
        scaling_factor=VAE16_SCALE, force_upcast=True,
    ).eval()


@pytest.fixture(scope="module")
def gendr_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gendr")
    tiny_vae16().save_pretrained(root / "vae16")
    unet = tiny_unet16()
    prompt = torch.randn(1, 77, CROSS_DIM, generator=torch.Generator().manual_seed(5))
    save_gendr(root / "gendr.safetensors", unet, prompt)
    return {"ckpt": root / "gendr.safetensors", "vae": root / "vae16", "unet": unet, "root": root}


def build(weights: dict, **options):
    engine_class, _ = get_engine("gendr")
    opts = build_options(engine_class.options_class, options)
    return engine_class.from_weights(WeightsSet(weights), torch.device("cpu"), torch.float32, opts)


def test_vae16_config_loads_from_a_diffusers_folder(gendr_files, tmp_path):
    vae = load_vae16(gendr_files["vae"])
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == VAE16_SCALE
    tiny_vae16().save_pretrained(tmp_path / "full" / "vae")  # a whole-model folder with vae/ works too
    assert load_vae16(tmp_path / "full").config.latent_channels == 16


def test_checkpoint_round_trip_keeps_architecture_weights_and_settings(gendr_files, tmp_path):
    loaded = GenDRCheckpoint.load(gendr_files["ckpt"])
    assert loaded.settings == {"alpha": 0.5, "beta": 0.5, "timestep": 500}
    assert loaded.prompt_embeds.shape == (1, 77, CROSS_DIM) and not loaded.vae_state
    unet = loaded.build_unet()
    latents, text = torch.randn(1, 16, 8, 8), loaded.prompt_embeds
    with torch.no_grad():
        expected = gendr_files["unet"](latents, 500, encoder_hidden_states=text).sample
        assert torch.equal(unet(latents, 500, encoder_hidden_states=text).sample, expected)
    path = save_gendr(tmp_path / "t300.safetensors", gendr_files["unet"], text, timestep=300, alpha=0.7)
    assert GenDRCheckpoint.load(path).settings == {"alpha": 0.7, "beta": 0.5, "timestep": 300}


def test_one_step_update_and_its_options(gendr_files):
    weights = {"gendr": gendr_files["ckpt"], "vae-kl-f8-d16": gendr_files["vae"]}
    engine = build(weights)
    assert (engine.alpha, engine.beta, engine.timestep) == (0.5, 0.5, 500)
    latents = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        eps = gendr_files["unet"](latents, 500, encoder_hidden_states=engine.prompt_embeds).sample
        expected = (latents - 0.5 * eps) / 0.5
        assert torch.allclose(engine.denoise(latents, generator=None, noise=None), expected, atol=1e-5)
    custom = build(weights, alpha=0.25, beta=1.0, timestep=700)
    assert (custom.alpha, custom.beta, custom.timestep) == (0.25, 1.0, 700)


def test_missing_or_foreign_weights_say_how_to_get_them(gendr_files, tmp_path):
    with pytest.raises(WeightsError, match="srkit distill --recipe cida"):
        registry.resolve("gendr", offline=True)
    vae = {"vae-kl-f8-d16": gendr_files["vae"]}
    with pytest.raises(WeightsError, match="srkit distill --recipe cida"):
        build({"gendr": tmp_path / "absent.safetensors", **vae})
    (tmp_path / "model.pth").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightsError, match="not a safetensors file.*srkit distill --recipe cida"):
        build({"gendr": tmp_path / "model.pth", **vae})
    save_checkpoint(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"format": "srkit-s3diff"})
    with pytest.raises(WeightsError, match="not GenDR"):
        build({"gendr": tmp_path / "other.safetensors", **vae})
    save_gendr(tmp_path / "c4.safetensors", tiny_unet16(channels=4), torch.zeros(1, 77, CROSS_DIM))
    with pytest.raises(WeightsError, match="16 latent channels"):
        build({"gendr": tmp_path / "c4.safetensors", **vae})


def test_cli_upscale_end_to_end(gendr_files, tmp_path, monkeypatch):
    """`srkit upscale --model gendr --weights FILE` with the VAE imported into an isolated cache."""
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    registry.import_file("vae-kl-f8-d16", gendr_files["vae"])
    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (14, 18, 3), dtype=np.uint8)).save(source)
    runner = CliRunner()
    missing = runner.invoke(app, ["upscale", str(source), "-o", str(tmp_path / "x.png"), "--model", "gendr", "-q"])
    assert missing.exit_code == 2 and "srkit distill --recipe cida" in missing.stderr
    result = runner.invoke(
        app,
        ["upscale", str(source), "-o", str(tmp_path / "out.png"), "--model", "gendr",
         "--weights", str(gendr_files["ckpt"]), "--seed", "3", "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (72, 56)
