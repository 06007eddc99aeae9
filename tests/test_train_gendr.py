"""GenDR's training on tiny SD-layout models and 8 HR crops: `srkit finetune --recipe vae16` (the 16-channel
teacher), `srkit distill --recipe cid|cida` on SD2.1-base's 4-channel layout and on that 16-channel teacher:
finite losses, checkpoints, exact resume, exports that `srkit upscale --model gendr --weights` loads, where the
gradients go, the CLI, and a two-process run.

The REPA encoder (DINOv2) cannot be downloaded here: a randomly initialised transformers DINOv2 goes through the
same loading path (`-O repa_encoder=FOLDER`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_CROP as CROP
from conftest import smooth_image
from PIL import Image
from safetensors.torch import load_file
from tiny_sd import tiny_vae
from typer.testing import CliRunner

from srkit import registry
from srkit.cli import app
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.gendr import GenDRCheckpoint, gendr_files
from srkit.registry import WeightsError
from srkit.train.data import DegradedHRDataset
from srkit.train.recipes import TextSide
from srkit.train.recipes.cid import CiDRecipeSettings, GenDRDistillRecipe, GenDRDistillSettings
from srkit.train.recipes.vae16 import widen_latent_convs
from srkit.train.repa import RepaEncoder
from srkit.train.run import finetune
from srkit.train.trainer import TrainConfig, Trainer

TINY = {"rank": 4, "discriminator_width": 64, "projector_width": 16, "lambda_cid_steps": 1}
"""Small adapters and heads; λ₁ switches after the first step so that both values run."""


@pytest.fixture(scope="module")
def gendr_inputs(training_files, tmp_path_factory) -> dict[str, Path]:
    """The training files plus a tiny 16-channel VAE and a tiny random DINOv2 (patch 14, 16-d tokens)."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("gendr_train")
    tiny_vae(seed=2, latent_channels=16, scaling_factor=0.24447420268654824).save_pretrained(root / "vae16")
    torch.manual_seed(3)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=14)
    Dinov2Model(config).save_pretrained(root / "dino")
    return {**training_files, "vae16": root / "vae16", "dino": root / "dino", "root": root}


def run(recipe: str, files: dict, out: Path, base: Path, steps: int, resume: bool = False, **settings) -> Path:
    command = "finetune" if recipe == "vae16" else "distill"
    return finetune(
        recipe, data=files["hr"], out=out, base=base, text=files["text"], crop=CROP, device="cpu", command=command,
        config={"steps": steps, "batch_size": 2, "checkpoint_every": 1, "log_every": 1, "seed": 1, "resume": resume},
        settings=settings,
    )  # fmt: skip


def trained(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:07d}" / "trainable.safetensors"))


def assert_resumes_exactly(recipe: str, files: dict, root: Path, base: Path, **settings) -> Path:
    """Two steps straight vs one step, stop, resume to two: the same weights. Returns the straight run's folder."""
    straight, resumed = root / f"{recipe}_straight", root / f"{recipe}_resumed"
    run(recipe, files, straight, base, 2, **settings)
    run(recipe, files, resumed, base, 1, **settings)
    run(recipe, files, resumed, base, 2, resume=True, **settings)
    expected, got = trained(straight, 2), trained(resumed, 2)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)
    return straight


def upscale_with(export: Path | None, tmp_path: Path) -> None:
    """`srkit upscale --model gendr --weights EXPORT` in an offline cache without any VAE (it comes with the
    export); None: the registry's `gendr` entry."""
    image = tmp_path / "in.png"
    Image.fromarray((smooth_image(20, 24) * 255).round().astype(np.uint8)).save(image)
    weights = ["--weights", str(export)] if export is not None else []
    result = CliRunner().invoke(
        app, ["upscale", str(image), "-o", str(tmp_path / "out.png"), "--model", "gendr", *weights],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (96, 80)


def test_cid_on_sd21_layout_trains_resumes_and_exports_a_4_channel_gendr(gendr_inputs, tmp_path, monkeypatch):
    straight = assert_resumes_exactly("cid", gendr_inputs, tmp_path, gendr_inputs["base"], **TINY)
    saved = sorted((straight / "checkpoints" / "step_0000002").iterdir())
    assert {p.name for p in saved} >= {"optim_generator.pt", "optim_real.pt", "optim_fake.pt", "trainable.safetensors"}
    state, start = trained(straight, 2), load_file(str(gendr_inputs["base"] / "unet" / "diffusion_pytorch_model.safetensors"))
    for adapter in ("real", "fake"):  # both scores trained (LoRA B starts at zero)
        assert any(v.abs().sum() > 0 for k, v in state.items() if f".lora_B.{adapter}." in k)
    assert not torch.equal(state["generator.conv_in.weight"], start["conv_in.weight"])  # full-parameter generator

    export = straight / "export"
    checkpoint = GenDRCheckpoint.load(gendr_files(export)[0])
    assert checkpoint.unet_config["in_channels"] == 4 and checkpoint.vae == "sd21-base"
    assert checkpoint.settings == {"alpha": 0.5, "beta": 0.5, "timestep": 500}
    upscale_with(export, tmp_path)
    # The export is the registry's `gendr` layout: imported, `--model gendr` runs it without --weights.
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    registry.import_file("gendr", export)
    upscale_with(None, tmp_path)


def test_vae16_teacher_then_cida_student_on_16_channels(gendr_inputs, tmp_path):
    files, dino = gendr_inputs, str(gendr_inputs["dino"])
    teacher = assert_resumes_exactly(
        "vae16", files, tmp_path, files["base"], vae=str(files["vae16"]), repa_encoder=dino, projector_width=16
    )
    teacher_export = teacher / "export"
    assert {p.name for p in teacher_export.iterdir()} >= {"unet", "vae", "scheduler", "repa_projector.safetensors"}
    student = assert_resumes_exactly("cida", files, tmp_path, teacher_export, repa_encoder=dino, **TINY)
    state = trained(student, 2)
    assert any(k.startswith("head.") for k in state) and any(k.startswith("projector.") for k in state)
    checkpoint = GenDRCheckpoint.load(gendr_files(student / "export")[0])
    assert checkpoint.unet_config["in_channels"] == 16 and checkpoint.vae == "vae-kl-f8-d16"
    upscale_with(student / "export", tmp_path)


@pytest.fixture(scope="module")
def cida_recipe(gendr_inputs) -> GenDRDistillRecipe:
    encoder = RepaEncoder.from_folder(gendr_inputs["dino"])
    settings = GenDRDistillSettings(**TINY, lr_real=3e-5)
    return GenDRDistillRecipe(gendr_inputs["base"], settings, text=TextSide(gendr_inputs["text"]), encoder=encoder)


def one_batch(files: dict) -> dict[str, torch.Tensor]:
    dataset = DegradedHRDataset(files["hr"], crop=CROP, seed=5)
    return {key: torch.stack([dataset[i][key] for i in range(2)]) for key in ("hr", "lr")}


def test_cida_losses_are_finite_and_each_reaches_only_its_own_group(cida_recipe, gendr_inputs):
    recipe = cida_recipe
    torch.manual_seed(0)
    steps = list(recipe.losses(one_batch(gendr_inputs), 0))
    assert [group for group, _, _ in steps] == ["fake", "real", "discriminator", "generator"]
    assert all(torch.isfinite(loss) and loss.requires_grad for _, loss, _ in steps)
    assert set(steps[-1][2]) == {"cid", "mse", "omega_inv", "adv", "repa"}
    groups = recipe.parameter_groups()
    for group, loss, _ in steps:
        for params in groups.values():
            for p in params.values():
                p.grad = None
        loss.backward(retain_graph=True)
        touched = {g for g, params in groups.items() if any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())}
        # The generator loss passes *through* ϕ, ψ and the head (their inputs keep the graph) but never into them.
        assert touched == {group}, (group, touched)


def test_scores_start_as_the_base_and_the_step_is_the_engines(cida_recipe, gendr_inputs, tmp_path):
    recipe = cida_recipe
    noisy, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    text = recipe.embeddings["prompt"]
    with torch.no_grad():  # fresh LoRA (B = 0): ϕ = ψ = the base, as SiD's fake score starts as the teacher
        torch.testing.assert_close(recipe.real(noisy, t, text), recipe.fake(noisy, t, text))
    # The exported generator in the engine takes the very step the recipe trains.
    recipe.export(tmp_path / "export")
    engine_class, _ = get_engine("gendr")
    engine = engine_class.from_weights(
        WeightsSet({"gendr": tmp_path / "export"}), torch.device("cpu"), torch.float32, engine_class.options_class()
    )
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            engine.denoise(latents, generator=None, noise=None),
            (latents - 0.5 * recipe.generator(latents, 500, encoder_hidden_states=text.expand(2, -1, -1)).sample) / 0.5,
        )


def test_learning_rates_per_group_reach_the_optimisers(cida_recipe, gendr_inputs, tmp_path):
    trainer = Trainer(cida_recipe, DegradedHRDataset(gendr_inputs["hr"], crop=CROP), TrainConfig(out=tmp_path, lr=1e-5))
    rates = {group: optimiser.param_groups[0]["lr"] for group, optimiser in trainer.optimizers.items()}
    assert rates == {"generator": 1e-5, "real": 3e-5, "fake": 1e-5, "discriminator": 1e-5}


def test_export_folder_and_a_bare_checkpoint_find_their_vae(tmp_path, cida_recipe):
    cida_recipe.export(tmp_path / "export")
    checkpoint, vae = gendr_files(tmp_path / "export")
    assert checkpoint.name == "gendr.safetensors" and vae == tmp_path / "export" / "vae"
    # A checkpoint moved away from its export runs on the registry entry it names, fetched only then.
    shutil.copy(checkpoint, tmp_path / "alone.safetensors")
    asked: list[str] = []

    def resolve(key: str) -> Path:
        asked.append(key)
        return tmp_path / "export" / "vae"

    engine_class, _ = get_engine("gendr")
    weights = WeightsSet({"gendr": tmp_path / "alone.safetensors"}, resolve=resolve)
    engine_class.from_weights(weights, torch.device("cpu"), torch.float32, engine_class.options_class())
    assert asked == ["sd21-base"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a GenDR export.*srkit distill"):
        gendr_files(tmp_path / "empty")


def test_widened_latent_convs_tile_the_4_channel_weights():
    from tiny_sd import tiny_unet

    unet = tiny_unet(seed=0)
    old_in, old_out = unet.conv_in.weight.clone(), unet.conv_out.weight.clone()
    widen_latent_convs(unet, 16)
    assert unet.config.in_channels == unet.config.out_channels == 16
    torch.testing.assert_close(unet.conv_in.weight[:, 5], old_in[:, 1] * 0.5)  # √(4/16)
    torch.testing.assert_close(unet.conv_out.weight[14], old_out[2])
    assert unet(torch.randn(1, 16, 8, 8), 10, encoder_hidden_states=torch.randn(1, 3, 8)).sample.shape == (1, 16, 8, 8)


def test_cli_keeps_recipes_to_their_command_and_explains_the_cid_choice(gendr_inputs, tmp_path):
    runner = CliRunner()
    common = ["--data", str(gendr_inputs["hr"]), "-o", str(tmp_path / "x"), "--device", "cpu"]
    wrong = runner.invoke(app, ["finetune", "--recipe", "cid", *common])
    assert wrong.exit_code == 2 and "srkit distill" in wrong.output
    wrong = runner.invoke(app, ["distill", "--recipe", "naosd", *common])
    assert wrong.exit_code == 2 and "srkit finetune" in wrong.output
    # No DINOv2 in the (offline, empty) cache: one line that says what to run.
    missing = runner.invoke(app, ["distill", "--recipe", "cida", *common, "--base", str(gendr_inputs["base"]),
                                  "--text", str(gendr_inputs["text"]), "--offline"])  # fmt: skip
    assert missing.exit_code == 2 and "srkit weights pull dinov2-vitb14" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    help_text = " ".join(runner.invoke(app, ["distill", "--help"], terminal_width=200).output.split())
    assert "form=hr-weight" in help_text and "[srkit choice:" in help_text and "WARNING: diverges" in help_text
    assert "lambda_adv=0.01" in help_text and "lambda_cid=10.0" in help_text  # cida: the paper's λ
    models = runner.invoke(app, ["models", "gendr"], terminal_width=250)
    assert "srkit distill --recipe cida" in " ".join(models.output.split())


def test_cida_two_processes_complete(gendr_inputs, tmp_path):
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("torch's launcher (torchrun) is not installed")
    options = [f"{key}={value}" for key, value in {**TINY, "repa_encoder": gendr_inputs["dino"]}.items()]
    command = [
        launcher, "--standalone", "--nproc_per_node", "2", "-m", "srkit.cli", "distill", "--recipe", "cida",
        "--data", str(gendr_inputs["hr"]), "--base", str(gendr_inputs["base"]), "--text", str(gendr_inputs["text"]),
        "--crop", str(CROP), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "two"),
        *[arg for option in options for arg in ("-O", option)],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "step_0000001" / "rank1.pt").is_file()  # really two processes
    assert (tmp_path / "two" / "export" / "gendr.safetensors").is_file()


def test_recipe_settings_are_checked():
    with pytest.raises(ValueError, match="form must be"):
        GenDRDistillRecipe("/nonexistent", CiDRecipeSettings(form="zh-everywhere"))
