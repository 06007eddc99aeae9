"""Benchmark metrics: PSNR/SSIM-Y against an independent float64 reference, the table, missing weights."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import smooth_image
from scipy.signal import correlate

from srkit.bench import metrics
from srkit.bench.metrics import METRICS, MetricUnavailable, create_metric, resolve_specs


def reference_y(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr luma in 0..255, float64."""
    return 16.0 + rgb.astype(np.float64) @ np.array([65.481, 128.553, 24.966])


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM on rounded Y with scipy's correlation (a different filter code path from srkit's)."""
    x, y = np.rint(reference_y(a)), np.rint(reference_y(b))
    ax = np.arange(11) - 5.0
    window = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()

    def f(img: np.ndarray) -> np.ndarray:
        return correlate(img, window, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = f(x), f(y)
    vx, vy, cov = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) / (mx**2 + my**2 + c1) * np.maximum((2 * cov + c2) / (vx + vy + c2), 0)))


def noisy_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    hr = np.rint(smooth_image(48, 40, seed) * 255) / 255
    noise = np.random.default_rng(seed).normal(0, 0.04, hr.shape)
    sr = np.rint(np.clip(hr + noise, 0, 1) * 255) / 255
    return sr.astype(np.float32), hr.astype(np.float32)


def test_y_channel_is_matlab_bt601():
    corners = np.array([[[0, 0, 0], [1, 1, 1]]], np.float32)
    np.testing.assert_allclose(metrics.y_channel(corners) * 255, [[16.0, 235.0]], atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psnr_and_ssim_match_an_independent_reference(seed):
    sr, hr = noisy_pair(seed)
    mse = np.mean((reference_y(sr) / 255 - reference_y(hr) / 255) ** 2)
    assert metrics.psnr_y(sr, hr) == pytest.approx(10 * np.log10(1 / (mse + 1e-8)), abs=1e-5)
    assert metrics.ssim_y(sr, hr) == pytest.approx(reference_ssim(sr, hr), abs=1e-6)


def test_identical_images_score_perfectly():
    image = smooth_image(32, 32)
    assert metrics.psnr_y(image, image) == pytest.approx(80.0)  # 10·log10(1 / eps), pyiqa's eps = 1e-8
    assert metrics.ssim_y(image, image) == pytest.approx(1.0)


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim_y(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32))


def test_table_names_state_their_variant():
    assert {"psnr_y", "ssim_y", "lpips_alex", "dists", "niqe", "musiq_koniq", "maniqa_koniq", "maniqa_pipal",
            "clipiqa_rn50", "fid_clean"} == set(METRICS)
    assert [s.name for s in resolve_specs(["lpips,musiq", "maniqa"])] == [
        "psnr_y", "ssim_y", "lpips_alex", "musiq_koniq", "maniqa_koniq"
    ]
    assert METRICS["lpips_alex"].arrow == "↓" and METRICS["psnr_y"].arrow == "↑"
    assert not METRICS["fid_clean"].per_image and not METRICS["niqe"].needs_gt
    with pytest.raises(ValueError, match="unknown metric 'vif'.*lpips_alex"):
        resolve_specs(["vif"])


def test_missing_weights_name_each_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MetricUnavailable) as info:
        create_metric("lpips")
    line = str(info.value)
    assert "\n" not in line and line.startswith("lpips_alex skipped:")
    assert f"LPIPS_v0.1_alex-df73285e.pth -> {tmp_path}/hub/pyiqa/LPIPS_v0.1_alex-df73285e.pth" in line
    assert f"alexnet-owt-7be5be79.pth -> {tmp_path}/hub/checkpoints/alexnet-owt-7be5be79.pth" in line
    assert "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/LPIPS_v0.1_alex-df73285e.pth" in line
    maniqa = metrics.unavailable_reason(METRICS["maniqa_pipal"])
    assert "MANIQA_PIPAL-ae6d356b.pth" in maniqa and "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k" in maniqa


def test_present_weights_leave_only_the_package_check(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for file in METRICS["musiq_koniq"].weights:
        (tmp_path / "hub" / file.folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "hub" / file.folder / file.name).write_bytes(b"")
    reason = metrics.unavailable_reason(METRICS["musiq_koniq"])
    if importlib.util.find_spec("pyiqa") is None:
        assert reason == "pyiqa is not installed (pip install 'srkit[metrics]')"
    else:
        assert reason is None
    assert metrics.unavailable_reason(METRICS["psnr_y"]) is None


class FakePyiqaModel:
    """Records what the wrapper passes: pyiqa metrics take (N, 3, H, W) tensors, or folders for FID."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def __call__(self, *args, **kwargs):
        import torch

        self.calls.append((args, kwargs))
        return 12.5 if self.name == "fid" else torch.tensor([[0.25]])


@pytest.fixture
def fake_pyiqa(tmp_path, monkeypatch):
    """A stand-in `pyiqa` module and every weight file present, so the factory's pyiqa branch runs offline."""
    import importlib.machinery
    import types

    module = types.ModuleType("pyiqa")
    module.__spec__ = importlib.machinery.ModuleSpec("pyiqa", None)
    module.created = {}

    def create(name, device=None, **options):
        if name == "dists":
            raise RuntimeError("checkpoint is corrupt\nlong traceback text")
        module.created[name] = FakePyiqaModel(name)
        return module.created[name]

    module.create_metric = create
    monkeypatch.setitem(sys.modules, "pyiqa", module)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics.HfFile, "present", lambda self: True)
    for spec in METRICS.values():
        for file in spec.weights:
            if isinstance(file, metrics.HubFile):
                (tmp_path / "hub" / file.folder).mkdir(parents=True, exist_ok=True)
                (tmp_path / "hub" / file.folder / file.name).write_bytes(b"")
    return module


def test_pyiqa_metrics_get_nchw_tensors_and_folders(fake_pyiqa, tmp_path):
    sr, hr = noisy_pair()
    assert create_metric("lpips")(sr, hr) == 0.25
    (args, _), = fake_pyiqa.created["lpips"].calls
    assert [tuple(a.shape) for a in args] == [(1, 3, 48, 40), (1, 3, 48, 40)]
    assert np.array_equal(args[1][0].permute(1, 2, 0).numpy(), hr)
    assert create_metric("maniqa_pipal")(sr, None) == 0.25
    assert len(fake_pyiqa.created["maniqa-pipal"].calls[0][0]) == 1  # no-reference: the SR image only
    assert create_metric("fid")(tmp_path / "sr", tmp_path / "hr") == 12.5
    (args, kwargs), = fake_pyiqa.created["fid"].calls
    assert args == (str(tmp_path / "sr"), str(tmp_path / "hr")) and kwargs["mode"] == "clean"


def test_pyiqa_build_failure_is_one_line(fake_pyiqa):
    with pytest.raises(MetricUnavailable) as info:
        create_metric("dists")
    assert str(info.value) == "dists skipped: pyiqa could not build 'dists': checkpoint is corrupt"
