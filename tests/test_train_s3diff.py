"""S3Diff training on tiny SD-layout models, a random DE-Net and a tiny DINO-layout ViT, with 8 HR crops: the
trainable sets, online negative prompting, the discriminator loss and the upstream bug fixes (#25, #27, #31)
pinned; finite losses, checkpoints, an exact resume, an export that `srkit upscale --model s3diff --weights`
loads; the CLI (with the discriminator backbone from the registry, and the one-line error without it) and a
two-process run with the same checkpoint layout."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_CROP as CROP
from conftest import RandomFeatureDistance, check_one_and_two_processes, smooth_image
from PIL import Image
from typer.testing import CliRunner

from srkit import registry
from srkit.cli import app
from srkit.common import field_docs
from srkit.degrade.pipeline import DegradationPipeline
from srkit.diffusion.text import save_prompt_embeddings
from srkit.nn.de_net import DegradationEstimator
from srkit.nn.dg_lora import match_list, match_regex
from srkit.nn.vit import VisionTransformer, load_dino_vit
from srkit.train.data import DegradedHRDataset
from srkit.train.discriminator import multilevel_bce
from srkit.train.recipes import TextSide, describe_settings, describe_training
from srkit.train.recipes.s3diff import (
    S3DIFF_DEGRADATION,
    TRAINING,
    S3DiffRecipe,
    S3DiffSettings,
    online_negative_prompting,
    training_pair,
)
from srkit.train.trainer import TrainConfig, Trainer, checkpoints

SMALL = {"rank_unet": 4, "rank_vae": 2, "disc_channels": 8}


def tiny_vit() -> VisionTransformer:
    """A DINO-layout ViT at the real input size (224², 16² patches) with tiny widths, random weights."""
    torch.manual_seed(7)
    model = VisionTransformer(width=64, depth=8, heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def s3diff_files(training_files, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s3diff_train")
    torch.manual_seed(0)
    torch.save(DegradationEstimator().state_dict(), root / "de_net.pth")
    torch.save(tiny_vit().state_dict(), root / "dino_vitbase16_pretrain.pth")
    return {**training_files, "de_net": root / "de_net.pth", "dino": root / "dino_vitbase16_pretrain.pth"}


def make_recipe(files, **settings) -> S3DiffRecipe:
    return S3DiffRecipe(files["base"], S3DiffSettings(**{**SMALL, **settings}), text=TextSide(files["text"]),
                        de_net=files["de_net"], backbone=tiny_vit(), perceptual=RandomFeatureDistance())  # fmt: skip


def one_batch(files, size: int = 2) -> dict[str, torch.Tensor]:
    dataset = DegradedHRDataset(files["hr"], crop=CROP, config=S3DIFF_DEGRADATION, hflip=True)
    items = [dataset[i] for i in range(size)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_s3diff_trainable_sets_are_upstreams(s3diff_files):
    """Generator: every LoRA factor (UNet rank 32 on the listed targets, VAE encoder rank 16 on the regex), the
    UNet's conv_in, the modulation MLPs and block embeddings; discriminator: its heads only; nothing else."""
    recipe = S3DiffRecipe(s3diff_files["base"], S3DiffSettings(disc_channels=8), text=TextSide(s3diff_files["text"]),
                          de_net=s3diff_files["de_net"], backbone=tiny_vit(), perceptual=RandomFeatureDistance())  # fmt: skip
    generator, discriminator = recipe.groups["generator"], recipe.groups["discriminator"]
    unet_layers = [n for n, m in recipe.unet.named_modules() if hasattr(m, "base_layer")]
    vae_layers = [n for n, m in recipe.vae.named_modules() if hasattr(m, "base_layer")]
    # the LoRA sites are exactly the modules matched by upstream's target patterns (peft's rules)
    plain_unet = [n.removesuffix(".base_layer") for n, m in recipe.unet.named_modules() if n.endswith(".base_layer")]
    assert unet_layers == match_list(plain_unet, recipe.networks.unet_targets) and "conv_in" not in unet_layers
    assert vae_layers == match_regex(vae_layers, recipe.networks.vae_targets)
    assert all(n.startswith("encoder.") for n in vae_layers) and vae_layers
    expected = {f"unet.{n}.lora_{ab}.default.weight" for n in unet_layers for ab in "AB"}
    expected |= {"unet.conv_in.weight", "unet.conv_in.bias"}
    expected |= {f"vae.{n}.lora_{ab}.vae_skip.weight" for n in vae_layers for ab in "AB"}
    expected |= {f"guidance.{net}.{part}.{kind}" for net in ("vae", "unet")
                 for part in ("de_mlp.0", "block_mlp.0", "fuse_mlp") for kind in ("weight", "bias")}  # fmt: skip
    expected |= {"guidance.vae.block_embeddings.weight", "guidance.unet.block_embeddings.weight"}
    assert set(generator) == expected
    assert len(generator) == 2 * len(unet_layers) + 2 + 2 * len(vae_layers) + 14
    assert recipe.unet.get_submodule(unet_layers[0]).lora_A["default"].weight.shape[0] == 32
    assert recipe.vae.get_submodule(vae_layers[0]).lora_A["vae_skip"].weight.shape[0] == 16
    assert len(discriminator) == 12 and all(n.startswith("disc.") for n in discriminator)  # 2 conv heads + MLP
    trainable = {id(p) for p in [*generator.values(), *discriminator.values()]}
    everything = [recipe.unet, recipe.vae, recipe.guidance, recipe.estimator, recipe.discriminator]
    frozen = [n for module in everything for n, p in module.named_parameters() if p.requires_grad and id(p) not in trainable]
    assert frozen == [] and not recipe.guidance.w.requires_grad
    assert all(not p.requires_grad for p in [*recipe.estimator.parameters(), *recipe.discriminator.backbone.parameters()])
    # fresh modulation MLPs start at upstream's scale (Kaiming × 1e-5, zero bias): the matrices C start near 0
    assert recipe.guidance.unet.fuse_mlp.weight.abs().max() < 1e-4 and recipe.guidance.unet.fuse_mlp.bias.abs().max() == 0


def test_online_negative_prompting_chooses_prompt_and_target():
    positive, negative = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    source, target = torch.full((2, 3, 4, 4), -0.5), torch.full((2, 3, 4, 4), 0.5)
    text, mixed = online_negative_prompting(torch.tensor([True, False]), positive, negative, source, target)
    assert torch.equal(text[0], negative[0]) and torch.equal(text[1], positive[0])
    assert torch.equal(mixed[0], source[0]) and torch.equal(mixed[1], target[1])  # the degraded input as target


def test_training_pair_scores_describe_the_input():
    """Upstream #31: a sample left undegraded feeds the HR, and the estimator sees the HR at LR size."""
    hr = torch.rand(2, 3, 16, 16)
    lr = torch.rand(2, 3, 4, 4)
    source, target, estimated = training_pair(hr, lr, torch.tensor([True, False]))
    torch.testing.assert_close(source[0], hr[0] * 2 - 1)
    torch.testing.assert_close(estimated[0], torch.nn.functional.avg_pool2d(hr[:1], 4)[0])
    upsampled = torch.nn.functional.interpolate(lr[1:], size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(source[1], (upsampled[0] * 2 - 1).clamp(-1, 1))
    assert torch.equal(estimated[1], lr[1]) and torch.equal(target, hr * 2 - 1)


def test_discriminator_loss_smooths_the_real_label():
    """Σ over levels of the mean BCE: real (and the generator's) target 0.8, fake 0; softplus(x) − y·x."""
    logits = [torch.full((1, 3, 3), 2.0), torch.full((1, 3, 3), -1.0), torch.full((1, 1), 0.5)]
    softplus = [math.log1p(math.exp(x)) for x in (2.0, -1.0, 0.5)]
    real = sum(sp - 0.8 * x for sp, x in zip(softplus, (2.0, -1.0, 0.5), strict=True))
    assert multilevel_bce(logits, real=True).item() == pytest.approx(real, rel=1e-6)
    assert multilevel_bce(logits, real=False).item() == pytest.approx(sum(softplus), rel=1e-6)
    assert multilevel_bce(logits, real=True, real_label=1.0).item() == pytest.approx(sum(softplus) - 1.5, rel=1e-6)


def test_discriminator_levels_and_gradients(s3diff_files):
    """Three levels: two 3×3 logit maps (ViT blocks 4 and 8 of 12 → here of 8: the 1st and 5th of the last 8)
    and the class token; the generator's adversarial loss leaves no gradient in the heads (upstream #25)."""
    recipe = make_recipe(s3diff_files)
    levels = recipe.discriminator(torch.rand(2, 3, CROP, CROP) * 2 - 1)
    assert [tuple(level.shape) for level in levels] == [(2, 3, 3), (2, 3, 3), (2, 1)]
    steps = recipe.losses(one_batch(s3diff_files), 0)
    heads = list(recipe.groups["discriminator"].values())
    generator = list(recipe.groups["generator"].values())
    names = []
    for group, loss, _ in steps:
        loss.backward()
        names.append(group)
        if len(names) == 2:  # the generator's GAN loss: gradients in the generator, none in the discriminator
            assert all(p.grad is None for p in heads)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator)
        if len(names) == 3:  # the real-image loss: the heads now get their own gradients
            assert all(p.grad is not None for p in heads)
        for p in [*heads, *generator]:
            p.grad = None
    assert names == ["generator", "generator", "discriminator", "discriminator"]


def test_s3diff_degradations_are_drawn_per_sample():
    """Upstream #27: every sample of a batch has its own resize, noise and JPEG draws (S3Diff's ranges)."""
    pipeline = DegradationPipeline(S3DIFF_DEGRADATION)
    drawn = [pipeline.sample(seed=3, index=i) for i in range(4)]
    assert len({(p.stage1.resize_scale, p.stage1.jpeg_quality, p.stage2.jpeg_quality) for p in drawn}) == 4
    assert all(60 <= p.stage1.jpeg_quality <= 95 and 60 <= p.stage2.jpeg_quality <= 100 for p in drawn)
    assert not S3DIFF_DEGRADATION.usm_sharpen and not S3DIFF_DEGRADATION.round_8bit


def test_s3diff_help_lists_released_values_and_sources():
    settings = describe_settings("s3diff")
    lines = {line.split("=")[0]: line for line in settings.splitlines()}
    assert lines["neg_prob"].startswith("neg_prob=0.05 (") and "(--neg_prob)" in lines["neg_prob"]
    assert lines["lambda_gan"].startswith("lambda_gan=0.5 (") and "(--lambda_gan)" in lines["lambda_gan"]
    assert lines["rank_unet"].startswith("rank_unet=32 (") and "--lora_rank_unet" in lines["rank_unet"]
    assert lines["real_label"].startswith("real_label=0.8 (") and "multilevel_sigmoid_s" in lines["real_label"]
    assert set(field_docs(S3DiffSettings)) == {f.name for f in dataclasses.fields(S3DiffSettings)}  # all explained
    training = describe_training("s3diff")
    assert "lr=2e-05" in training and "batch_size=4" in training and "training_utils.py" in training
    assert TRAINING.hflip and TRAINING.degradation == S3DIFF_DEGRADATION and S3DiffSettings().upsample == "bicubic"
    with pytest.raises(ValueError, match="neg_prob"):
        S3DiffSettings(neg_prob=2)


def train(files, out: Path, steps: int, resume: bool = False) -> Trainer:
    dataset = DegradedHRDataset(files["hr"], crop=CROP, seed=1, config=S3DIFF_DEGRADATION, hflip=True)
    config = TrainConfig(out=out, steps=steps, batch_size=2, checkpoint_every=2, log_every=1, seed=1, resume=resume,
                         lr=1e-4)  # fmt: skip
    trainer = Trainer(make_recipe(files), dataset, config, device="cpu")
    trainer.train()
    return trainer


def cache_sd_turbo(files: dict[str, Path]) -> None:
    """The tiny base in the `sd-turbo` cache folder (text-encoder files: from the text side, or empty)."""
    reg = registry.load_registry()
    folder = registry.entry_dir(reg.entry("sd-turbo"))
    for file in reg.entry("sd-turbo").files:
        target = folder / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = next((root / file.path for root in (files["base"], files["text"]) if (root / file.path).is_file()), None)
        shutil.copyfile(source, target) if source else target.write_bytes(b"")


def test_s3diff_trains_checkpoints_resumes_exactly_and_exports(s3diff_files, tmp_path, monkeypatch):
    straight = train(s3diff_files, tmp_path / "straight", steps=3)
    saved = checkpoints(tmp_path / "straight")[0]
    assert {p.name for p in saved.iterdir()} == {
        "trainable.safetensors", "buffers.safetensors", "optim_generator.pt", "optim_discriminator.pt", "rank0.pt",
        "state.json",
    }  # fmt: skip
    state = straight.trainable_state()
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # B starts at zero: it moved

    train(s3diff_files, tmp_path / "resumed", steps=2)
    resumed = train(s3diff_files, tmp_path / "resumed", steps=3, resume=True)
    assert resumed.step == 3
    for name, value in state.items():
        torch.testing.assert_close(resumed.trainable_state()[name], value, rtol=0, atol=1e-6)
    for name, value in straight.recipe.state_buffers().items():
        torch.testing.assert_close(resumed.recipe.state_buffers()[name], value, rtol=0, atol=1e-6)

    # The export is an official-layout s3diff.pkl: training can start from it (the generator's tensors as trained;
    # the discriminator is not part of the release format), and `srkit upscale --model s3diff --weights` loads it.
    exported = tmp_path / "straight" / "export" / "s3diff.pkl"
    config = registry.read_export_config(exported.parent)  # what `srkit weights add NAME --path EXPORT` reads
    assert config["engine"] == "s3diff" and config["recipe"] == "s3diff" and config["format"] == "official-pickle"
    again = S3DiffRecipe(s3diff_files["base"], S3DiffSettings(disc_channels=8), text=TextSide(s3diff_files["text"]),
                         de_net=s3diff_files["de_net"], backbone=tiny_vit(), perceptual=RandomFeatureDistance(),
                         pretrained=exported)  # fmt: skip
    assert set(again.groups["generator"]) == {k for k in state if not k.startswith("disc.")}
    for name, value in again.groups["generator"].items():
        torch.testing.assert_close(value.detach(), state[name], rtol=0, atol=0)
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    cache_sd_turbo(s3diff_files)
    registry.import_file("s3diff-de-net", s3diff_files["de_net"])
    embeds = save_prompt_embeddings(tmp_path / "embeds.safetensors", straight.recipe.embeddings)
    image = tmp_path / "in.png"
    Image.fromarray((smooth_image(20, 24) * 255).round().astype(np.uint8)).save(image)
    result = CliRunner().invoke(
        app, ["upscale", str(image), "-o", str(tmp_path / "out.png"), "--model", "s3diff", "--weights",
              str(exported), "-O", f"prompt_embeds={embeds}"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (96, 80)


def test_s3diff_cli_needs_the_backbone_and_two_processes_write_the_same_layout(s3diff_files, tmp_path, monkeypatch):
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    options = [f"{key}={value}" for key, value in {**SMALL, "lambda_lpips": 0, "de_net": s3diff_files["de_net"]}.items()]
    common = ["--data", str(s3diff_files["hr"]), "--base", str(s3diff_files["base"]), "--text", str(s3diff_files["text"]),
              "--crop", str(CROP), "--steps", "2", "--checkpoint-every", "1", "--batch-size", "1", "--grad-accum", "1",
              "--device", "cpu", "--seed", "3", *[arg for option in options for arg in ("-O", option)]]  # fmt: skip
    missing = CliRunner().invoke(app, ["finetune", "--recipe", "s3diff", "--out", str(tmp_path / "none"), *common])
    assert missing.exit_code == 2 and "dino_vitbase16_pretrain.pth" in missing.output
    assert "srkit weights import dino-vitb16" in missing.output and len(missing.output.strip().splitlines()) == 1

    registry.import_file("dino-vitb16", s3diff_files["dino"])
    assert load_dino_vit(registry.resolve("dino-vitb16")).grid == 14
    check_one_and_two_processes("s3diff", common, tmp_path)
    assert (tmp_path / "two" / "export" / "s3diff.pkl").is_file()
