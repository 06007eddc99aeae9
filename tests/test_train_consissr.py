"""ConsisSR training: TALA and the stage-1 CLIP distillation against the golden fixture of the official code
(../shared/golden/consissr_tiny, README "TALA loss" and "Stage-1 CLIP distillation"), the trainable sets counted
against upstream's rules, and both stages on a tiny official-layout model with 8 HR crops: finite losses,
checkpoints, an exact resume, and an export that `srkit upscale --model consissr --weights` loads."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_CROP as CROP
from conftest import smooth_image
from golden import fixture_dir, needs, tensors_fixture
from PIL import Image
from tiny_models import tiny_consissr
from typer.testing import CliRunner

from srkit.cli import app
from srkit.common import field_docs
from srkit.train.data import DegradedHRDataset
from srkit.train.recipes import describe_settings, describe_training
from srkit.train.recipes.consissr import (
    CONSISSR_DEGRADATION,
    ConsisSRRecipe,
    ConsisSRSettings,
    restoration_lq,
)
from srkit.train.recipes.consissr_clip import ConsisSRClipRecipe, ConsisSRClipSettings, warmup_cosine
from srkit.train.tala import tala_mask
from srkit.train.trainer import TrainConfig, Trainer, checkpoints

GOLDEN = fixture_dir("consissr_tiny")
TOLERANCE = 1e-4
golden = needs(GOLDEN)

# Upstream's optimiser lists (notes §3.1-3.2), written out on the official checkpoint names.
STAGE2_OFFICIAL = re.compile(
    r"control_model\.(?!.*(attn2|norm2)(?!.*to_out_ip)).*"
    r"|model\.diffusion_model\..*(attn1\.position_emb|attnT|normT|to_out_ip).*"
    r"|cond_stage_model\.ft_layers.*"
)
STAGE1_OFFICIAL = re.compile(r"cond_stage_model\..*visual.*")


def golden_settings(settings_class):
    return settings_class(model_config=str(GOLDEN / "cldm_tiny.yaml"), clip_config=str(GOLDEN / "consissr_tiny_openclip.json"))


def golden_image(name: str) -> torch.Tensor:
    """u8/127.5 − 1 in float32, NCHW (the fixture's conversion)."""
    pixels = np.asarray(Image.open(GOLDEN / name).convert("RGB")).astype(np.float32)
    return torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None]


expected = tensors_fixture(GOLDEN / "expected.safetensors")


@pytest.fixture(scope="module")
def official_keys() -> list[str]:
    return list(torch.load(GOLDEN / "consissr_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"])


def official_names(recipe) -> set[str]:
    from srkit.convert.consissr import checkpoint_key, key_map

    keys = key_map(recipe.nets.architecture)
    return {checkpoint_key(keys, name) for name in recipe.groups["consissr"]}


@golden
def test_tala_reproduces_the_golden_case_and_trains_upstreams_set(expected, official_keys):
    """The recorded draws (t, u, posterior and diffusion noises) through the recipe's TALA: latents, the swap,
    x_t, ε*, the network's ε̂, per-sample and mean loss.  Then the loss's gradient reaches exactly the trained
    parameters that upstream's no-grad UNet encoder lets it reach."""
    recipe = ConsisSRRecipe(GOLDEN / "consissr_tiny.ckpt", golden_settings(ConsisSRSettings))
    hq = torch.cat([golden_image("tala_hq0.png"), golden_image("tala_hq1.png")])
    lq = torch.cat([golden_image("tala_lq0.png"), golden_image("tala_lq1.png")])
    t, u = expected["tala.t"], float(expected["tala.u"])
    step = recipe.tala(hq, lq, t, u, hq_noise=expected["tala.hq_posterior_noise"],
                       lq_noise=expected["tala.lq_posterior_noise"], noise=expected["tala.noise"])  # fmt: skip
    assert step.from_lq.tolist() == expected["tala.uses_lq_latent"].tolist() == [True, False]
    cases = json.loads((GOLDEN / "cases.json").read_text())["tala"]
    torch.testing.assert_close(((t.float() / 1000) ** 10).double(), torch.tensor(cases["p_t"], dtype=torch.float64))
    for key, value in [("z_hq", step.z_hq), ("z_lq", step.z_lq), ("x_noisy", step.noisy), ("eps_target", step.target),
                       ("c_latent", step.hint), ("eps_pred", step.prediction)]:  # fmt: skip
        reference = expected[f"tala.{key}"]
        error = (value.detach() - reference).abs().max().item()
        assert error <= TOLERANCE * max(1.0, reference.abs().max().item()), (key, error)
    assert (step.context.detach() - expected["tala.context"]).abs().max() <= TOLERANCE
    torch.testing.assert_close(step.per_sample.detach(), expected["tala.loss_per_sample"], rtol=0, atol=TOLERANCE)
    assert step.loss.item() == pytest.approx(cases["loss"], abs=TOLERANCE) == expected["tala.loss"].item()

    # Upstream's stage-2 list, counted on the official names: ControlNet 354, UNet 144, ft_layers_4 8 tensors.
    names = official_names(recipe)
    assert names == {key for key in official_keys if STAGE2_OFFICIAL.fullmatch(key)}
    assert sum(k.startswith("control_model.") for k in names) == 354
    assert sum(k.startswith("model.diffusion_model.") for k in names) == 144
    assert sum(k.startswith("cond_stage_model.ft_layers_4.") for k in names) == 8
    assert not any("to_k_ip" in k or "to_v_ip" in k or "cond_encoder" in k or "first_stage" in k for k in names)
    step.loss.backward()
    trained = recipe.groups["consissr"]
    without = {name for name, p in trained.items() if p.grad is None}
    # the UNet's encoder and middle block run without autograd (upstream's ControlledUnetModel): their 7
    # transformer blocks' 9 listed tensors each stay untouched; everything else listed gets a gradient
    assert len(without) == 63 and all(n.startswith(("unet.down_blocks.", "unet.mid_block.")) for n in without)
    frozen = [n for n, p in recipe.nets.named_parameters() if p.requires_grad and n not in trained]
    assert frozen == []


@golden
def test_clip_distillation_reproduces_the_golden_case(expected, official_keys):
    recipe = ConsisSRClipRecipe(GOLDEN / "consissr_tiny.ckpt", golden_settings(ConsisSRClipSettings))
    loss, lq_embedding, hq_embedding = recipe.distillation(golden_image("clip_lq.png"), golden_image("clip_hq.png"))
    torch.testing.assert_close(lq_embedding.detach(), expected["clip.lq_embed"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(hq_embedding, expected["clip.hq_embed"], rtol=0, atol=TOLERANCE)
    assert loss.item() == pytest.approx(expected["clip.loss"].item(), abs=1e-6)
    names = official_names(recipe)
    assert names == {key for key in official_keys if STAGE1_OFFICIAL.fullmatch(key)} and len(names) == 32
    loss.backward()
    assert all(p.grad is not None for p in recipe.groups["consissr"].values())


def test_tala_mask_is_one_draw_per_batch_against_t_over_T_to_the_tenth():
    t = torch.tensor([999, 900, 750, 500, 0])
    assert tala_mask(t, 0.3, 1000).tolist() == [True, True, False, False, False]  # 0.99, 0.35, 0.056, 0.001, 0
    assert tala_mask(t, 0.05, 1000).tolist() == [True, True, True, False, False]
    assert tala_mask(t, 0.0, 1000, gamma=1.0).tolist() == [True, True, True, True, False]


def test_released_schedule_and_help():
    s = ConsisSRClipSettings()
    assert warmup_cosine(0, s) == pytest.approx(0.01) and warmup_cosine(500, s) == pytest.approx(0.505)
    assert warmup_cosine(1000, s) == pytest.approx(1.0) and warmup_cosine(200_000, s) == pytest.approx(0.01)
    assert warmup_cosine(50_500, s) == pytest.approx(0.505, abs=1e-3)  # half-way down the cosine
    assert "gamma=10.0 (TALA exponent" in describe_settings("consissr") and "ddpm_cldm.py" in describe_settings("consissr")
    for settings_class in (ConsisSRSettings, ConsisSRClipSettings):  # every hyper-parameter explained
        assert set(field_docs(settings_class)) == {f.name for f in dataclasses.fields(settings_class)}
    assert "lr=0.0001" in describe_training("consissr") and "crop=224" in describe_training("consissr-clip")
    assert "warm_up_steps=1000 (" in describe_settings("consissr-clip")
    assert "LambdaWarmUpCosineScheduler" in describe_settings("consissr-clip")
    hq = torch.rand(1, 3, 16, 16)
    lq = restoration_lq(torch.nn.functional.avg_pool2d(hq, 4), (16, 16))
    assert lq.shape == hq.shape and torch.equal(((lq + 1) / 2 * 255).round(), (lq + 1) / 2 * 255)  # 8-bit levels


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny official-layout checkpoint for 8×8 latents (64² crops)."""
    paths, options = tiny_consissr(tmp_path_factory.mktemp("consissr_train"), latent_size=8)
    return paths["consissr"], {"model_config": options["model_config"], "clip_config": options["clip_config"]}


def train(recipe_class, settings_class, tiny_model, files, out: Path, steps: int, resume: bool = False) -> Trainer:
    checkpoint, options = tiny_model
    dataset = DegradedHRDataset(files["hr"], crop=CROP, seed=1, config=CONSISSR_DEGRADATION)
    config = TrainConfig(out=out, steps=steps, batch_size=2, checkpoint_every=2, log_every=1, seed=1, resume=resume,
                         lr=1e-3, max_grad_norm=0.0)  # fmt: skip
    trainer = Trainer(recipe_class(checkpoint, settings_class(**options)), dataset, config, device="cpu")
    trainer.train()
    return trainer


def upscale(export: Path, out: Path) -> Image.Image:
    image = out.parent / "in.png"
    Image.fromarray((smooth_image(16, 16) * 255).round().astype(np.uint8)).save(image)
    flags = [arg for key, value in {"steps": 1, "latent_tile": 8, "latent_overlap": 4}.items()
             for arg in ("-O", f"{key}={value}")]  # fmt: skip
    result = CliRunner().invoke(app, ["upscale", str(image), "-o", str(out), "--model", "consissr", "--weights",
                                      str(export), *flags], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    return Image.open(out)


@pytest.mark.parametrize(("recipe_class", "settings_class"), [(ConsisSRRecipe, ConsisSRSettings),
                                                               (ConsisSRClipRecipe, ConsisSRClipSettings)])
def test_consissr_stages_train_checkpoint_resume_exactly_and_export(recipe_class, settings_class, tiny_model,
                                                                    training_files, tmp_path):  # fmt: skip
    straight = train(recipe_class, settings_class, tiny_model, training_files, tmp_path / "straight", steps=3)
    assert [p.name for p in checkpoints(tmp_path / "straight")] == ["step_0000002", "step_0000003"]
    assert {p.name for p in checkpoints(tmp_path / "straight")[0].iterdir()} == {
        "trainable.safetensors", "optim_consissr.pt", "rank0.pt", "state.json"}  # fmt: skip
    base = recipe_class(tiny_model[0], settings_class(**tiny_model[1]))
    moved = [n for n, p in straight.trainable_state().items() if not torch.equal(p, base.groups["consissr"][n].detach())]
    assert moved

    train(recipe_class, settings_class, tiny_model, training_files, tmp_path / "resumed", steps=2)
    resumed = train(recipe_class, settings_class, tiny_model, training_files, tmp_path / "resumed", steps=3, resume=True)
    for name, value in straight.trainable_state().items():
        torch.testing.assert_close(resumed.trainable_state()[name], value, rtol=0, atol=1e-6)

    export = tmp_path / "straight" / "export"  # the official checkpoint layout, with the model's configs
    assert {p.name for p in export.iterdir()} == {"ConsisSR.ckpt", "model.yaml", "openclip.json"}
    exported = recipe_class(export, settings_class())  # a later stage starts from it
    for name, value in straight.trainable_state().items():
        torch.testing.assert_close(exported.groups["consissr"][name].detach(), value, rtol=0, atol=0)
    assert upscale(export, tmp_path / "out.png").size == (64, 64)


def test_consissr_clip_cli_uses_the_released_setup_where_not_overridden(tiny_model, training_files, tmp_path):
    checkpoint, options = tiny_model
    flags = [arg for key, value in options.items() for arg in ("-O", f"{key}={value}")]
    result = CliRunner().invoke(app, ["finetune", "--recipe", "consissr-clip", "--data", str(training_files["hr"]),
                                      "--out", str(tmp_path / "run"), "--base", str(checkpoint), "--crop", str(CROP),
                                      "--batch-size", "2", "--steps", "1", "--device", "cpu", *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    state = json.loads((checkpoints(tmp_path / "run")[-1] / "state.json").read_text())
    assert state["recipe"] == "consissr-clip" and state["config"]["lr"] == 1e-4
    assert state["config"]["max_grad_norm"] == 0.0 and state["config"]["checkpoint_every"] == 10_000
    optimizer = torch.load(checkpoints(tmp_path / "run")[-1] / "optim_consissr.pt", weights_only=True)
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(1e-6)  # step 0 of the warm-up: 1e-4 × 0.01
