"""GDPO-SR fine-tuning on a tiny NAOSD model (itself trained here by the naosd recipe): rewards through the
pluggable metric interface (randomly initialised scorers stand in for MUSIQ/MANIQA), the step-0 loss, checkpoints,
resume, and an export that `srkit upscale --model gdpo --weights` loads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TRAIN_CROP, smooth_image
from PIL import Image
from typer.testing import CliRunner

from srkit import registry
from srkit.bench.metrics import psnr_y
from srkit.cli import app
from srkit.train.data import DegradedHRDataset
from srkit.train.recipes import TextSide
from srkit.train.recipes.gdpo import GDPORecipe, GDPOSettings
from srkit.train.run import finetune
from srkit.train.trainer import checkpoints


class RandomScorer:
    """A no-reference quality 'network' with random weights, called like srkit's image metrics: (sr, hr) -> float."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.net(torch.from_numpy(sr).permute(2, 0, 1)[None].float()).sum())


def metrics() -> dict:
    return {"psnr": psnr_y, "musiq": RandomScorer(1), "maniqa": RandomScorer(2)}


@pytest.fixture(scope="module")
def naosd_export(training_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("naosd_run")
    return finetune(
        "naosd", data=training_files["hr"], out=out, base=training_files["base"], text=training_files["text"],
        crop=TRAIN_CROP, config={"steps": 1, "checkpoint_every": 1}, settings={"lambda_lpips": 0}, device="cpu",
    )  # fmt: skip


def test_gdpo_step_zero_loss_is_log_two_and_rewards_are_grouped(training_files, naosd_export):
    recipe = GDPORecipe(naosd_export, GDPOSettings(group_size=3), text=TextSide(training_files["text"]), metrics=metrics())
    sample = DegradedHRDataset(training_files["hr"], crop=TRAIN_CROP)[0]
    batch = {k: v[None] for k, v in sample.items()}
    [(group, loss, logs)] = list(recipe.losses(batch, 0))
    assert group == "policy" and loss.requires_grad
    # A fresh LoRA (B = 0) makes the policy the reference: equal errors, σ(0), loss = log 2.
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-5)
    assert {"gdpo", "reward", "psnr", "musiq", "maniqa"} <= set(logs)
    samples = recipe.sample_group(batch["lr"])
    assert samples.shape == (3, 3, TRAIN_CROP, TRAIN_CROP) and 0 <= samples.min() and samples.max() <= 1
    assert not torch.equal(samples[0], samples[1])  # the group differs only by its noises
    rewards, _ = recipe.rewards(samples, batch["hr"])
    assert rewards.shape == (1, 3) and torch.isfinite(rewards).all()


def test_gdpo_trains_resumes_and_exports(training_files, naosd_export, tmp_path, monkeypatch):
    common = {
        "data": training_files["hr"], "out": tmp_path / "gdpo", "base": naosd_export, "text": training_files["text"],
        "crop": TRAIN_CROP, "settings": {"group_size": 2}, "device": "cpu", "reward_metrics": metrics(),
    }  # fmt: skip
    finetune("gdpo", config={"steps": 2, "checkpoint_every": 1}, **common)
    assert [p.name for p in checkpoints(tmp_path / "gdpo")] == ["step_0000001", "step_0000002"]
    exported = finetune("gdpo", config={"steps": 3, "checkpoint_every": 1, "resume": True}, **common)
    assert [p.name for p in checkpoints(tmp_path / "gdpo")][-1] == "step_0000003"

    monkeypatch.setenv("SRKIT_HOME", str(tmp_path / "home"))
    registry.import_file("sd21-text", training_files["text"])
    image = tmp_path / "in.png"
    Image.fromarray((smooth_image(16, 20) * 255).round().astype(np.uint8)).save(image)
    result = CliRunner().invoke(
        app, ["upscale", str(image), "-o", str(tmp_path / "out.png"), "--model", "gdpo", "--weights", str(exported)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (80, 64)


def test_gdpo_needs_a_base_and_a_detail_metric(training_files, naosd_export, tmp_path):
    with pytest.raises(ValueError, match="gdpo starts from a NAOSD model"):
        finetune("gdpo", data=training_files["hr"], out=tmp_path, text=training_files["text"], crop=TRAIN_CROP)
    with pytest.raises(ValueError, match="needs a fidelity metric"):
        GDPORecipe(naosd_export, GDPOSettings(reward_metrics="psnr,ssim"), text=TextSide(training_files["text"]))
