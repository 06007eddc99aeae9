"""The S3Diff engine on a tiny random SD-style model in the official formats (built here, seconds on CPU):
checkpoint round trip, seeding, guidance, batching, overrides, option errors and the offline message."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from tiny_sd import tiny_unet, tiny_vae, write_scheduler

from srkit import registry
from srkit.api import load_engine
from srkit.common import build_options
from srkit.diffusion.loading import SDLoadError, load_noise_schedule
from srkit.diffusion.text import save_prompt_embeddings
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.s3diff import (
    UNET_TARGETS,
    VAE_TARGETS,
    S3DiffEngine,
    S3DiffNetworks,
    attach_dg_lora,
    load_networks,
    read_checkpoint,
    save_checkpoint,
)
from srkit.nn.de_net import DegradationEstimator


def randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Non-zero values everywhere (a fresh LoRA has B = 0, which would hide its branch)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture(scope="session")
def tiny_s3diff(tmp_path_factory) -> dict[str, Path]:
    """Base folder (unet, vae, scheduler), official-layout s3diff.pkl, de_net.pth and prompt embeddings."""
    root = tmp_path_factory.mktemp("s3diff_tiny")
    torch.manual_seed(0)
    unet, vae = tiny_unet(), tiny_vae()
    unet.save_pretrained(root / "base" / "unet")
    vae.save_pretrained(root / "base" / "vae")
    write_scheduler(root / "base")
    guidance, unet_mod, vae_mod = attach_dg_lora(unet, vae, rank_unet=4, rank_vae=2)
    for index, layer in enumerate(m for m in [*unet.modules(), *vae.modules()] if hasattr(m, "lora_B")):
        randomise(layer.lora_B, seed=index, scale=0.1)
    randomise(guidance, seed=99, scale=0.05)
    schedule = load_noise_schedule(root / "base")
    nets = S3DiffNetworks(
        unet, vae, guidance, DegradationEstimator(), schedule, unet_mod, vae_mod, UNET_TARGETS, VAE_TARGETS
    )
    save_checkpoint(nets, root / "s3diff.pkl")
    torch.save(DegradationEstimator().state_dict(), root / "de_net.pth")
    gen = torch.Generator().manual_seed(1)
    save_prompt_embeddings(
        root / "embeds.safetensors",
        {"pos": torch.randn(1, 77, 8, generator=gen), "neg": torch.randn(1, 77, 8, generator=gen)},
    )
    return {"root": root, "base": root / "base", "pkl": root / "s3diff.pkl", "de_net": root / "de_net.pth"}


def make_engine(paths: dict[str, Path], pkl: Path | None = None, **options) -> S3DiffEngine:
    engine_class, _ = get_engine("s3diff")
    weights = WeightsSet(
        {"sd-turbo": paths["base"], "s3diff": pkl or paths["pkl"], "s3diff-de-net": paths["de_net"]}
    )
    values = {"prompt_embeds": str(paths["root"] / "embeds.safetensors"), **options}
    opts = build_options(engine_class.options_class, values)
    return engine_class.from_weights(weights, torch.device("cpu"), torch.float32, opts)


def lr_batch(count: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_s3diff_engine_output_shape_range_and_float_mode(tiny_s3diff) -> None:
    out = make_engine(tiny_s3diff, latent="mode", official_8bit=False, color_fix="none").upscale(
        lr_batch(size=12)
    )
    assert out.shape == (1, 3, 48, 48) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    official = make_engine(tiny_s3diff, latent="mode", color_fix="none").upscale(lr_batch(size=12))
    torch.testing.assert_close(official, torch.floor(out * 255) / 255, atol=1e-6, rtol=0)


def test_s3diff_checkpoint_round_trip(tiny_s3diff, tmp_path) -> None:
    """Loaded → saved by srkit in the official layout → loaded again: identical tensors and outputs."""
    first = load_networks(tiny_s3diff["base"], tiny_s3diff["pkl"], tiny_s3diff["de_net"])
    saved = save_checkpoint(first, tmp_path / "again.pkl")
    original, again = read_checkpoint(tiny_s3diff["pkl"]), read_checkpoint(saved)
    assert original.keys() == again.keys()
    for key in ("state_dict_unet", "state_dict_vae", "state_dict_unet_fuse_mlp", "state_dict_vae_de_mlp"):
        assert original[key].keys() == again[key].keys()
        assert all(torch.equal(original[key][k], again[key][k]) for k in original[key])
    assert isinstance(again["w"], torch.nn.Parameter) and again["rank_unet"] == 4 and again["rank_vae"] == 2
    a = make_engine(tiny_s3diff, latent="mode").upscale(lr_batch())
    b = make_engine(tiny_s3diff, pkl=saved, latent="mode").upscale(lr_batch())
    assert torch.equal(a, b)


def test_s3diff_checkpoint_keys_follow_the_official_layout(tiny_s3diff) -> None:
    state = read_checkpoint(tiny_s3diff["pkl"])
    assert {"conv_in.weight", "conv_in.bias"} <= state["state_dict_unet"].keys()
    assert all(
        ".lora_A.default." in k or ".lora_B.default." in k or k.startswith("conv_in.")
        for k in state["state_dict_unet"]
    )
    assert all(k.startswith("encoder.") and ".vae_skip." in k for k in state["state_dict_vae"])
    assert state["state_dict_unet_fuse_mlp"]["weight"].shape == (16, 320)
    assert state["state_embeddings"]["state_dict_unet_block"]["weight"].shape == (10, 64)


def test_s3diff_checkpoint_rejects_foreign_files(tmp_path) -> None:
    torch.save({"params": {}}, tmp_path / "other.pkl")
    with pytest.raises(ValueError, match="not an S3Diff checkpoint"):
        read_checkpoint(tmp_path / "other.pkl")

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"w": Payload()}, fh, protocol=2)
    with pytest.raises(ValueError, match="not a loadable S3Diff checkpoint") as caught:
        read_checkpoint(tmp_path / "evil.pkl")
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)  # refused, never executed
    (tmp_path / "truncated.pkl").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a loadable S3Diff checkpoint"):
        read_checkpoint(tmp_path / "truncated.pkl")


def test_s3diff_seeded_sample_and_mode(tiny_s3diff) -> None:
    engine = make_engine(tiny_s3diff, official_8bit=False)

    def run(seed: int) -> torch.Tensor:
        return engine.upscale(lr_batch(), generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    mode = make_engine(tiny_s3diff, latent="mode", official_8bit=False)
    assert torch.equal(
        mode.upscale(lr_batch()), mode.upscale(lr_batch(), generator=torch.Generator().manual_seed(5))
    )


def test_s3diff_guidance_one_is_the_positive_prompt_alone(tiny_s3diff) -> None:
    engine = make_engine(tiny_s3diff, latent="mode", official_8bit=False, color_fix="none", guidance="1.0")
    z = torch.randn(1, 4, 8, 8)
    engine.networks.set_degradation(torch.tensor([[0.3, 0.6]]))
    with torch.inference_mode():
        direct = engine.networks.unet(
            z, torch.tensor([999]), encoder_hidden_states=engine.prompt_embeds
        ).sample
        torch.testing.assert_close(engine.denoiser()(z, 999, engine.prompts), direct)
        engine.guidance = 1.5
        eps = engine.denoiser()(z, 999, engine.prompts)
        neg = engine.networks.unet(
            z, torch.tensor([999]), encoder_hidden_states=engine.negative_embeds
        ).sample
    torch.testing.assert_close(eps, neg + 1.5 * (direct - neg), rtol=1e-4, atol=1e-5)


def test_s3diff_lora_merge_off_gives_the_same_image_without_the_cache(tiny_s3diff) -> None:
    merged = make_engine(tiny_s3diff, latent="mode", official_8bit=False, color_fix="none")
    unmerged = make_engine(tiny_s3diff, latent="mode", official_8bit=False, color_fix="none", lora_merge="false")
    image = lr_batch(1)
    torch.testing.assert_close(unmerged.upscale(image), merged.upscale(image), rtol=1e-4, atol=2e-5)
    assert merged.networks.merged_cache_bytes() > 0 and unmerged.networks.merged_cache_bytes() == 0


def test_s3diff_batch_equals_images_one_by_one(tiny_s3diff) -> None:
    """Two images in one batch take the unmerged per-sample path; each must equal its own single run."""
    engine = make_engine(tiny_s3diff, latent="mode", official_8bit=False, color_fix="none")
    batch = lr_batch(2)
    together = engine.upscale(batch)
    for n in range(2):
        torch.testing.assert_close(
            together[n : n + 1], engine.upscale(batch[n : n + 1]), rtol=1e-4, atol=2e-5
        )


def test_s3diff_degradation_override(tiny_s3diff) -> None:
    estimated = make_engine(tiny_s3diff, latent="mode")
    scores = estimated.degradation_scores(lr_batch())
    half = make_engine(tiny_s3diff, latent="mode", noise="0.25")
    assert torch.equal(
        half.degradation_scores(lr_batch()), torch.stack([scores[:, 0], torch.full((1,), 0.25)], 1)
    )
    both = make_engine(tiny_s3diff, latent="mode", blur="0", noise="1")
    assert both.degradation_scores(lr_batch()).tolist() == [[0.0, 1.0]]
    assert not torch.equal(both.upscale(lr_batch()), estimated.upscale(lr_batch()))


def test_s3diff_latent_tiles_and_tiled_vae_run_end_to_end(tiny_s3diff) -> None:
    """A latent larger than the tile goes through latent tiles and both tiled VAE halves; the result stays close
    to the untiled one (tiling is an approximation upstream too)."""
    lr = lr_batch(size=48)
    whole = make_engine(tiny_s3diff, latent="mode", official_8bit=False, color_fix="none").upscale(lr)
    tiled = make_engine(
        tiny_s3diff, latent="mode", official_8bit=False, color_fix="none",
        latent_tile="16", latent_overlap="8", tile_batch="3", vae_encoder_tile="64", vae_decoder_tile="8",
    ).upscale(lr)  # fmt: skip
    assert tiled.shape == whole.shape == (1, 3, 192, 192)
    assert (tiled - whole).abs().mean() < 0.05


@pytest.mark.slow
def test_s3diff_compile_keeps_outputs_and_serves_new_images_without_recompiling(tiny_s3diff) -> None:
    """torch.compile on CPU (inductor; minutes to compile): same output, and a second image of the same size
    with other modulation matrices reuses the compiled graph."""
    import time

    reference = make_engine(tiny_s3diff, latent="mode", official_8bit=False).upscale(lr_batch())
    engine = make_engine(tiny_s3diff, latent="mode", official_8bit=False, compile="true")
    torch.testing.assert_close(engine.upscale(lr_batch()), reference, atol=1e-5, rtol=0)
    started = time.perf_counter()
    engine.upscale(torch.rand(1, 3, 16, 16))
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "options,message",
    [
        ({"color_fix": "sepia"}, "color_fix must be one of"),
        ({"latent": "mean"}, "latent"),
        ({"blur": "1.5"}, "--blur"),
        ({"latent_overlap": "96"}, "latent_overlap"),
        ({"attention": "xformers"}, "CUDA"),
    ],
)
def test_s3diff_option_errors(tiny_s3diff, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_engine(tiny_s3diff, **options)


def test_s3diff_missing_text_encoder_and_embeddings(tiny_s3diff) -> None:
    engine_class, _ = get_engine("s3diff")
    weights = WeightsSet(
        {
            "sd-turbo": tiny_s3diff["base"],
            "s3diff": tiny_s3diff["pkl"],
            "s3diff-de-net": tiny_s3diff["de_net"],
        }
    )
    with pytest.raises(SDLoadError, match="prompt_embeds"):
        engine_class.from_weights(weights, torch.device("cpu"), torch.float32, engine_class.options_class())


def test_s3diff_cli_upscale_from_the_weights_cache(tiny_s3diff, tmp_path, monkeypatch) -> None:
    """`srkit upscale in.png --model s3diff` offline, with the three entries in the cache (the text-encoder
    files of the sd-turbo folder are empty placeholders: precomputed prompt embeddings replace them)."""
    import shutil

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from srkit.cli import app

    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    reg = registry.load_registry()
    base = registry.entry_dir(reg.entry("sd-turbo"))
    for file in reg.entry("sd-turbo").files:
        target = base / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tiny_s3diff["base"] / file.path
        shutil.copyfile(source, target) if source.is_file() else target.write_bytes(b"")
    registry.import_file("s3diff", tiny_s3diff["pkl"])
    registry.import_file("s3diff-de-net", tiny_s3diff["de_net"])
    source = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)).save(source)
    embeds = tiny_s3diff["root"] / "embeds.safetensors"
    result = CliRunner().invoke(
        app,
        ["upscale", str(source), "-o", str(tmp_path / "out.png"), "--model", "s3diff", "--color-fix", "adain",
         "--guidance", "1.2", "-O", f"prompt_embeds={embeds}", "--latent", "mode", "--noise", "0.5", "--blur", "0.1"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (40, 48)
    bad = CliRunner().invoke(app, ["upscale", str(source), "-o", str(tmp_path / "bad.png"), "--model", "s3diff",
                                   "-O", f"prompt_embeds={embeds}", "--blur", "1.5"])  # fmt: skip
    assert bad.exit_code != 0 and "--blur must be a degree in [0, 1]" in bad.output
    assert not (tmp_path / "bad.png").exists()
    missing = CliRunner().invoke(app, ["upscale", str(source), "-o", str(tmp_path / "bad.png"), "--model", "s3diff",
                                       "-O", f"prompt_embeds={tmp_path / 'none.safetensors'}"])  # fmt: skip
    assert missing.exit_code != 0 and "none.safetensors does not exist" in missing.output
    assert missing.exception is None or isinstance(missing.exception, SystemExit)  # an error line, no traceback


def test_s3diff_spec_and_offline_message() -> None:
    _, spec = get_engine("s3diff")
    assert spec.tiling == "latent" and spec.stochastic and spec.scale == 4
    assert spec.weights == ("s3diff", "s3diff-de-net", "sd-turbo")
    reg = registry.load_registry()
    assert reg.entry("sd-turbo").is_folder and reg.entry("s3diff").base == "sd-turbo"
    assert {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
    } <= {f.path for f in reg.entry("sd-turbo").files}
    with pytest.raises(
        registry.WeightsError, match=r"Run `srkit weights pull s3diff s3diff-de-net sd-turbo` on a machine with internet"
    ):
        load_engine("s3diff", device="cpu")
