"""OSEDiff / NAOSD / GDPO-SR engines on tiny random models in the official layouts (CPU, seconds).

What the golden tests cannot show: the LoRA merge equals upstream's unmerged peft forward on a freshly made
checkpoint, bad checkpoints and options fail clearly, outputs are exactly 4× for any input size, the text-encoder
path works, and `--samples` gives distinct, reproducible outputs through the CLI.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import SD2_SCHEDULER, TWO_LEVELS, write_scheduler, write_text_side
from tiny_sd import tiny_unet as two_level
from typer.testing import CliRunner

from srkit import registry
from srkit.cli import app
from srkit.common import build_options
from srkit.diffusion.text import compose_prompt
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.osediff import prepare_official
from srkit.nn.lora_merge import merge_peft_state
from srkit.registry import WeightsError

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
CROSS_DIM = 16
UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


# ---------------------------------------------------------------------------------------------------------------
# Tiny models in SD2 layouts (cheap: attention only at the low resolution, no VAE mid-block attention)


def tiny_unet(seed: int = 0):
    return two_level(seed, **TWO_LEVELS, cross_attention_dim=CROSS_DIM)


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        latent_channels=4, block_out_channels=(4, 4, 8, 8), mid_block_add_attention=False, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=2,
        scaling_factor=0.18215,
    ).eval()


def lora_targets(model, patterns: tuple[str, ...], keep) -> list[str]:
    """Module names chosen as upstream does: a pattern in the parameter name, no bias/norm, `keep(name)`."""
    names = []
    for name, _ in model.named_parameters():
        if "bias" in name or "norm" in name or not keep(name):
            continue
        if any(pattern in name for pattern in patterns):
            module = name.rsplit(".", 1)[0]
            if module not in names:
                names.append(module)
    return names


def add_random_adapter(model, name: str, targets: list[str], seed: int) -> None:
    """A peft adapter (rank 4, default alpha 8 → scaling 2) with random A and B, as after training."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=targets), adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key and "lora_" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def make_osediff_checkpoint(unet, vae) -> tuple[dict, object, object]:
    """An `osediff.pkl` dict made like `OSEDiff_gen.save_model`, plus the peft-adapted UNet and VAE it came from."""
    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    groups = {
        "default_encoder": lora_targets(unet, UNET_PATTERNS, lambda n: "down_blocks" in n or n.startswith("conv_in")),
        "default_decoder": lora_targets(unet, UNET_PATTERNS, lambda n: "up_blocks" in n or n.startswith("conv_out")),
        "default_others": lora_targets(unet, UNET_PATTERNS, lambda n: "mid_block" in n),
    }
    for index, (name, targets) in enumerate(groups.items()):
        add_random_adapter(unet, name, targets, seed=10 + index)
    unet.set_adapter(list(groups))
    with torch.no_grad():
        unet.conv_in.base_layer.weight.add_(0.05)  # the retrained conv_in
    vae_targets = lora_targets(vae, VAE_PATTERNS, lambda n: "encoder" in n and "decoder" not in n) + ["quant_conv"]
    add_random_adapter(vae, "default_encoder", vae_targets, seed=20)
    checkpoint = {
        "unet_lora_encoder_modules": groups["default_encoder"],
        "unet_lora_decoder_modules": groups["default_decoder"],
        "unet_lora_others_modules": groups["default_others"],
        "vae_lora_encoder_modules": vae_targets + vae_targets,  # upstream's list has duplicates
        "rank_unet": 4,
        "rank_vae": 4,
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
    }
    return checkpoint, unet, vae


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Folders and files: sd21-base (unet, vae, scheduler), sd21-text, a merged GDPO folder, osediff.pkl."""
    root = tmp_path_factory.mktemp("onestep")
    unet, vae = tiny_unet(), tiny_vae()
    unet.save_pretrained(root / "base" / "unet")
    vae.save_pretrained(root / "base" / "vae")
    write_scheduler(root / "base", SD2_SCHEDULER)
    tiny_unet(seed=3).save_pretrained(root / "merged" / "unet")
    tiny_vae(seed=4).save_pretrained(root / "merged" / "vae")
    write_text_side(root / "text", CROSS_DIM)
    checkpoint, _, _ = make_osediff_checkpoint(unet, vae)
    torch.save(checkpoint, root / "osediff.pkl")
    return {"base": root / "base", "merged": root / "merged", "text": root / "text", "pkl": root / "osediff.pkl"}


def build(model: str, weights: dict[str, Path], **options):
    engine_class, _ = get_engine(model)
    opts = build_options(engine_class.options_class, options)
    return engine_class.from_weights(WeightsSet(weights), torch.device("cpu"), torch.float32, opts)


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (1, 3, height, width)).astype(np.float32) / 255)


# ---------------------------------------------------------------------------------------------------------------
# LoRA merge and the official checkpoint


def test_lora_merge_matches_the_unmerged_peft_forward():
    unet, vae = tiny_unet(), tiny_vae()
    checkpoint, peft_unet, peft_vae = make_osediff_checkpoint(unet, vae)
    merge_peft_state(unet, checkpoint["state_dict_unet"], 2.0)
    merge_peft_state(vae, checkpoint["state_dict_vae"], 2.0)
    latents, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, CROSS_DIM)
    with torch.no_grad():
        expected = peft_unet(latents, 999, encoder_hidden_states=text).sample
        assert torch.allclose(unet(latents, 999, encoder_hidden_states=text).sample, expected, atol=1e-5)
        pixels = torch.rand(1, 3, 32, 32) * 2 - 1
        expected = peft_vae.encode(pixels).latent_dist.mean
        assert torch.allclose(vae.encode(pixels).latent_dist.mean, expected, atol=1e-5)


def test_osediff_checkpoint_errors_are_clear(tmp_path, tiny):
    weights = {"osediff": tmp_path / "x.pkl", "sd21-base": tiny["base"], "sd21-text": tiny["text"]}
    (tmp_path / "x.pkl").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="not a readable OSEDiff checkpoint"):
        build("osediff", weights)
    torch.save({"state_dict_unet": {}}, tmp_path / "x.pkl")
    with pytest.raises(WeightsError, match="missing state_dict_vae"):
        build("osediff", weights)
    checkpoint = torch.load(tiny["pkl"], weights_only=True)
    checkpoint["state_dict_unet"] = {k: v for k, v in checkpoint["state_dict_unet"].items() if "mid_block" not in k}
    torch.save(checkpoint, tmp_path / "x.pkl")
    with pytest.raises(WeightsError, match="UNet LoRA modules without weights"):
        build("osediff", weights)


# ---------------------------------------------------------------------------------------------------------------
# Input preparation, options, output size


@pytest.mark.parametrize(
    ("size", "prepared"),
    [((32, 32), (512, 512)), ((20, 30), (512, 768)), ((200, 130), (800, 520)), ((131, 150), (520, 600))],
)
def test_official_preparation_sizes(size, prepared):
    """Min side 128 first (int of the scaled sides), then ×4, then down to a multiple of 8."""
    height, width = size
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert prepare_official(pixels).shape[:2] == prepared


def test_prompt_text_and_options_are_checked(tiny):
    assert compose_prompt("", "clean, high-resolution, 8k") == ", clean, high-resolution, 8k,"
    assert compose_prompt("sky, tree", "") == "sky, tree, ,"
    weights = {"gdpo": tiny["merged"], "sd21-text": tiny["text"]}
    with pytest.raises(ValueError, match="tagger must be one of auto, dape, ram, none"):
        build("gdpo", weights, tagger="blip")
    with pytest.raises(ValueError, match="color_fix must be one of"):
        build("gdpo", weights, color_fix="histogram")
    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        build("gdpo", weights, t_add=1000)
    with pytest.raises(WeightsError, match="needs a merged diffusers folder"):
        build("gdpo", {"gdpo": tiny["pkl"], "sd21-text": tiny["text"]})


def test_osediff_output_is_exactly_four_times_any_input(tiny):
    """A 21×33 input is enlarged to 128×201, ×4 and cut to 512×800 upstream; srkit returns 84×132."""
    engine = build("osediff", {"osediff": tiny["pkl"], "sd21-base": tiny["base"], "sd21-text": tiny["text"]})
    out = engine.upscale(image(21, 33), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 84, 132)
    assert out.min() >= 0 and out.max() <= 1


def test_an_engine_built_from_networks_and_a_prompt_embedding_upscales(tiny):
    """The Python API without `from_weights` (as the benchmarks build engines): no tagger, the fixed prompt."""
    from srkit.engines.osediff import OSEDiffEngine, OSEDiffOptions

    loaded = build("osediff", {"osediff": tiny["pkl"], "sd21-base": tiny["base"], "sd21-text": tiny["text"]})
    direct = OSEDiffEngine(loaded.unet, loaded.vae, loaded.prompt_embeds, torch.device("cpu"), torch.float32,
                           OSEDiffOptions(), loaded.schedule)  # fmt: skip
    assert direct.prompter is None
    out = direct.upscale(image(16, 16), generator=torch.Generator().manual_seed(0))
    expected = loaded.upscale(image(16, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_large_inputs_use_latent_tiles_and_the_tiled_vae(tiny):
    """Small tile options force every tiled path (latent grid, VAE encoder and decoder) on a 512×640 input."""
    from srkit.tiling import plan_latent_tiles

    tiles = {"latent_tile": 32, "latent_overlap": 8, "vae_encoder_tile": 256, "vae_decoder_tile": 32}
    engine = build("gdpo", {"gdpo": tiny["merged"], "sd21-text": tiny["text"]}, official_8bit=False, **tiles)
    assert plan_latent_tiles(64, 80, 32, 8) is not None
    assert engine.vae_tiling.use_encoder_tiles(torch.zeros(1, 3, 512, 640))
    out = engine.upscale(image(32, 40), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 128, 160) and torch.isfinite(out).all()


def test_gdpo_noise_is_seeded(tiny):
    engine = build("gdpo", {"gdpo": tiny["merged"], "sd21-text": tiny["text"]}, official_8bit=False)
    lr = image(16, 16)

    def run(seed: int) -> torch.Tensor:
        return engine.upscale(lr, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert torch.equal(first, run(0))
    assert (first - run(1)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture()
def text_in_cache(tiny, tmp_path, monkeypatch):
    """An isolated cache holding the tiny `sd21-text`, imported the way users import weights."""
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    registry.import_file("sd21-text", tiny["text"])


def test_gdpo_samples_are_distinct_and_reproducible(tiny, tmp_path, text_in_cache):
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "a.png")
    runner = CliRunner()
    outputs = {}
    for run in ("one", "two"):
        result = runner.invoke(
            app,
            ["upscale", str(photos), "-o", str(tmp_path / run), "--model", "gdpo", "--weights", str(tiny["merged"]),
             "--samples", "4", "--seed", "0", "-q"],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        outputs[run] = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / run).iterdir())}
    names = [f"a_s{seed}.png" for seed in range(4)]
    assert sorted(outputs["one"]) == names
    assert outputs["one"]["a_s0.png"].shape == (48, 64, 3)
    for name in names:
        np.testing.assert_array_equal(outputs["one"][name], outputs["two"][name])
    assert len({outputs["one"][name].tobytes() for name in names}) == 4


def test_models_lists_the_one_step_engines():
    result = CliRunner().invoke(app, ["models"], catch_exceptions=False)
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    for name in ("osediff", "naosd", "gdpo", "gendr"):
        assert name in rows, result.stdout
        assert rows[name][1:3] == ["x4", "1"]
    assert rows["gendr"][3] == "unreleased" and rows["naosd"][3] == "unreleased"
    assert rows["gdpo"][3:5] == ["not", "cached"]
    detail = CliRunner().invoke(app, ["models", "gdpo"], catch_exceptions=False)
    assert all(option in detail.stdout for option in ("--t-add", "--t-diff", "--tagger", "--prompt-embeds"))
    assert "Apache-2.0" in CliRunner().invoke(app, ["models", "osediff"], catch_exceptions=False).stdout
