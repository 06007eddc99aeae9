"""NAOSD pre-training on a tiny SD-layout model and 8 HR crops: finite losses, checkpoints, exact resume, export
that `srkit upscale --model naosd --weights` loads, the CLI, and a two-process run with the same layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import TRAIN_CROP as CROP
from conftest import RandomFeatureDistance, check_one_and_two_processes, smooth_image
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from srkit import registry
from srkit.cli import app
from srkit.train.data import DegradedHRDataset
from srkit.train.recipes import TextSide
from srkit.train.recipes.naosd import NAOSDRecipe, NAOSDSettings
from srkit.train.trainer import TrainConfig, Trainer, checkpoints


def train(training_files, out: Path, steps: int, resume: bool = False) -> Trainer:
    recipe = NAOSDRecipe(training_files["base"], NAOSDSettings(), text=TextSide(training_files["text"]), perceptual=RandomFeatureDistance())
    dataset = DegradedHRDataset(training_files["hr"], crop=CROP, scale=4, seed=1)
    config = TrainConfig(out=out, steps=steps, batch_size=2, checkpoint_every=2, log_every=1, seed=1, resume=resume)
    trainer = Trainer(recipe, dataset, config, device="cpu")
    trainer.train()
    return trainer


def test_naosd_trains_checkpoints_resumes_exactly_and_exports(training_files, tmp_path, monkeypatch):
    straight = train(training_files, tmp_path / "straight", steps=3)
    assert [p.name for p in checkpoints(tmp_path / "straight")] == ["step_0000002", "step_0000003"]
    saved = checkpoints(tmp_path / "straight")[0]
    assert {p.name for p in saved.iterdir()} == {
        "trainable.safetensors", "optim_generator.pt", "optim_regulariser.pt", "rank0.pt", "state.json",
    }  # fmt: skip
    trained = load_file(str(saved / "trainable.safetensors"))
    assert any(k.startswith("unet.conv_in") for k in trained) and any(".lora_A." in k for k in trained)
    assert any(k.startswith("vae.encoder.") for k in trained) and any(k.startswith("fake.") for k in trained)
    lora_b = [v for k, v in trained.items() if ".lora_B." in k and k.startswith("unet.")]
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: the generator really moved

    # Stop after 2 steps, resume to 3: the same weights as the uninterrupted run.
    train(training_files, tmp_path / "resumed", steps=2)
    resumed = train(training_files, tmp_path / "resumed", steps=3, resume=True)
    assert resumed.step == 3
    for name, value in straight.trainable_state().items():
        torch.testing.assert_close(resumed.trainable_state()[name], value, rtol=0, atol=1e-6)

    # The export loads where users load NAOSD weights.
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    registry.import_file("sd21-text", training_files["text"])
    image = tmp_path / "in.png"
    Image.fromarray((smooth_image(20, 24) * 255).round().astype(np.uint8)).save(image)
    result = CliRunner().invoke(
        app, ["upscale", str(image), "-o", str(tmp_path / "out.png"), "--model", "naosd",
              "--weights", str(tmp_path / "straight" / "export")], catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (96, 80)


def test_naosd_losses_are_finite_and_lora_starts_as_the_base(training_files):
    recipe = NAOSDRecipe(training_files["base"], text=TextSide(training_files["text"]), perceptual=RandomFeatureDistance())
    batch = DegradedHRDataset(training_files["hr"], crop=CROP)[0]
    batch = {k: v[None] for k, v in batch.items()}
    torch.manual_seed(0)
    steps = list(recipe.losses(batch, 0))
    assert [group for group, _, _ in steps] == ["generator", "regulariser"]
    assert all(torch.isfinite(loss) and loss.requires_grad for _, loss, _ in steps)
    assert set(steps[0][2]) == {"l2", "lpips", "vsd"}
    noisy, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    text = recipe.prompt.expand(1, -1, -1)
    with torch.no_grad():  # fresh LoRA (B = 0): the fake score equals the frozen base
        torch.testing.assert_close(recipe.fake(noisy, t, text).sample, recipe.real(noisy, t, text).sample)


def test_naosd_cli_and_two_processes_write_the_same_layout(training_files, tmp_path):
    common = ["--data", str(training_files["hr"]), "--base", str(training_files["base"]), "--text", str(training_files["text"]),
              "--crop", str(CROP), "--steps", "2", "--checkpoint-every", "1", "-O", "lambda_lpips=0",
              "--device", "cpu", "--seed", "3"]  # fmt: skip
    check_one_and_two_processes("naosd", common, tmp_path)
