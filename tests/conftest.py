"""Shared fixtures: an isolated weights cache, tiny official-layout checkpoints, and generated images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_sd import SD2_SCHEDULER, tiny_unet, tiny_vae, write_scheduler, write_text_side

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAIN_CROSS_DIM = 16
TRAIN_CROP = 64


def compact_state_dict(num_feat: int = 8, num_conv: int = 2, scale: int = 4, seed: int = 0) -> dict:
    """Official SRVGGNetCompact keys (body.N over convolutions and PReLUs) with random values."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    index = 0
    channels_in = 3
    for _ in range(num_conv + 1):
        state[f"body.{index}.weight"] = torch.randn(num_feat, channels_in, 3, 3, generator=gen) * 0.1
        state[f"body.{index}.bias"] = torch.randn(num_feat, generator=gen) * 0.01
        state[f"body.{index + 1}.weight"] = torch.full((num_feat,), 0.25)
        index += 2
        channels_in = num_feat
    state[f"body.{index}.weight"] = torch.randn(3 * scale * scale, num_feat, 3, 3, generator=gen) * 0.05
    state[f"body.{index}.bias"] = torch.zeros(3 * scale * scale)
    return state


@pytest.fixture(autouse=True)
def srkit_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets the same session cache, never the user's ~/.cache/srkit or team registry, and never the
    network."""
    home = tmp_path_factory.getbasetemp() / "srkit-home"
    monkeypatch.setenv("SRKIT_HOME", str(home))
    monkeypatch.setenv("SRKIT_OFFLINE", "1")
    monkeypatch.delenv("SRKIT_REGISTRY", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_compact_pth(tmp_path_factory) -> Path:
    """A tiny x4 compact model saved like the official release files (dict with params_ema)."""
    path = tmp_path_factory.mktemp("weights") / "tiny_compact_x4.pth"
    torch.save({"params_ema": compact_state_dict()}, path)
    return path


class RandomFeatureDistance(torch.nn.Module):
    """Stands in for LPIPS-VGG (whose weights cannot be fetched here) through the recipes' perceptual interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
        self.requires_grad_(False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.features(prediction) - self.features(target)).abs().mean()


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Float32 H×W×3 test picture: gradients plus a few soft blobs (no flat areas that hide errors)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width, y / height, 0.5 + 0.3 * np.sin(x / 9 + y / 13)], axis=2)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(6, 30)
        image += 0.15 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[:, :, None] * rng.uniform(-1, 1, 3)
    return np.clip(image, 0, 1).astype(np.float32)


def shared_data(*parts: str) -> Path:
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (benchmark data lives in the workspace's shared/ folder, not in the repo)")
    return path


@pytest.fixture(scope="session")
def training_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD2.1-layout base (unet, vae, scheduler), the `sd21-text` side, and 8 HR crops."""
    root = tmp_path_factory.mktemp("naosd")
    tiny_unet(seed=0, cross_attention_dim=TRAIN_CROSS_DIM).save_pretrained(root / "base" / "unet")
    tiny_vae(seed=1).save_pretrained(root / "base" / "vae")
    write_scheduler(root / "base", SD2_SCHEDULER)
    write_text_side(root / "text", TRAIN_CROSS_DIM)
    hr = root / "hr"
    hr.mkdir()
    realsr = SHARED / "data" / "realsr" / "test_HR"
    sources = sorted(realsr.glob("*.png"))[:8] if realsr.is_dir() else []
    for index in range(8):
        if sources:
            pixels = np.asarray(Image.open(sources[index]).convert("RGB"))[:96, :96]
        else:
            pixels = (smooth_image(96, 96, seed=index) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(hr / f"crop_{index}.png")
    return {"base": root / "base", "text": root / "text", "hr": hr}


def check_one_and_two_processes(recipe: str, arguments: list[str], root: Path) -> None:
    """`srkit finetune --recipe RECIPE ARGUMENTS` (2 steps, a checkpoint per step) in this process (root/one) and in
    two CPU processes (torchrun, gloo, which accelerate picks up from torchrun's environment; root/two): both
    complete and write the same checkpoint layout with the same trainable tensors."""
    from typer.testing import CliRunner

    from srkit.cli import app

    one = CliRunner().invoke(app, ["finetune", "--recipe", recipe, "--out", str(root / "one"), *arguments])
    assert one.exit_code == 0, one.output
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("torch's launcher (torchrun) is not installed")
    two = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", "2", "-m", "srkit.cli", "finetune", "--recipe", recipe,
         "--out", str(root / "two"), *arguments],
        check=False, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert (root / "two" / "checkpoints" / "step_0000002" / "rank1.pt").is_file()  # really two processes
    assert _layout(root / "one") == _layout(root / "two")
    assert _trainable_keys(root / "one") == _trainable_keys(root / "two")


def _layout(run: Path) -> set[str]:
    """The files and folders of a training run, without what differs with the process count by design (the
    RNG staging folder, the RNG states of ranks above 0) and the tensorboard logs."""
    return {
        str(p.relative_to(run))
        for p in run.rglob("*")
        if "tensorboard" not in p.parts and p.name != "rng" and not (p.name.startswith("rank") and p.name != "rank0.pt")
    }


def _trainable_keys(run: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "step_0000002" / "trainable.safetensors"), "pt") as handle:
        return set(handle.keys())


@pytest.fixture()
def ctrl_c_on_second_image(monkeypatch) -> list[int]:
    """Ctrl-C arrives while the second image of a batch is being upscaled (every batch of the test); returns
    the list of calls, to clear between batches."""
    from srkit import api

    original = api.Upscaler.process
    calls: list[int] = []

    def interrupt_second(self, image, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, image, **kwargs)

    monkeypatch.setattr(api.Upscaler, "process", interrupt_second)
    return calls
