"""3×3 convolutions through NNPACK on the CPU: close to oneDNN, chosen only for the shapes it is meant for."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srkit import cpu_features
from srkit.cpu_features import CpuFeatures
from srkit.nn import winograd_conv
from srkit.nn.dg_lora import DGLoRALayer, Modulation
from srkit.nn.winograd_conv import (
    ENV_SWITCH,
    MIN_CHANNELS,
    WinogradConv2d,
    nnpack_available,
    use_winograd_convolutions,
    winograd_applies,
    winograd_wanted,
)

pytestmark = pytest.mark.skipif(not nnpack_available(), reason="this PyTorch build has no NNPACK")

SIDE = 64  # the smallest map the rule sends to NNPACK


@pytest.fixture(autouse=True)
def _winograd_on_any_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default srkit uses NNPACK only on the CPUs it was measured on; these tests check it everywhere."""
    monkeypatch.setenv(ENV_SWITCH, "1")


def _conv(c_in: int = MIN_CHANNELS, c_out: int = MIN_CHANNELS, **kwargs) -> WinogradConv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kwargs.pop("kernel_size", 3), padding=kwargs.pop("padding", 1), **kwargs)
    use_winograd_convolutions(conv)
    return conv.requires_grad_(False)


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_winograd_conv_is_close_to_the_direct_convolution(batch: int) -> None:
    conv = _conv()
    x = torch.randn(batch, MIN_CHANNELS, SIDE, SIDE + 3)
    assert winograd_applies(conv, x, conv.weight, conv.bias)
    out = conv(x)
    expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert out.shape == expected.shape
    assert 0 < _relative_difference(out, expected) < 1e-4  # Winograd rounding, not the same kernel


@pytest.mark.parametrize(
    "conv_kwargs,side",
    [
        ({}, SIDE // 2),  # small map
        ({"c_in": 3}, SIDE),  # 3-channel input (VAE conv_in)
        ({"c_out": 3}, SIDE),  # 3-channel output (VAE conv_out)
        ({"stride": 2}, SIDE),
        ({"kernel_size": 1, "padding": 0}, SIDE),
    ],
)
@torch.no_grad()
def test_other_shapes_keep_the_direct_convolution_bit_for_bit(conv_kwargs: dict, side: int) -> None:
    conv = _conv(**conv_kwargs)
    x = torch.randn(1, conv.in_channels, side, side)
    assert not winograd_applies(conv, x, conv.weight, conv.bias)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))


def test_gradients_and_float64_keep_the_direct_convolution() -> None:
    conv = _conv()
    x = torch.randn(1, MIN_CHANNELS, SIDE, SIDE, requires_grad=True)
    assert not winograd_applies(conv, x, conv.weight, conv.bias)
    conv(x).sum().backward()
    assert x.grad is not None
    double = _conv().double()
    x64 = torch.randn(1, MIN_CHANNELS, SIDE, SIDE, dtype=torch.float64)
    assert not winograd_applies(double, x64, double.weight, double.bias)


def test_environment_switch_keeps_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert use_winograd_convolutions(model) == 2 and type(model[0]) is WinogradConv2d
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert use_winograd_convolutions(model) == 2 and type(model[0]) is nn.Conv2d


@torch.no_grad()
def test_merged_dg_lora_conv_runs_through_the_base_layers_kernel_choice() -> None:
    base = _conv()
    layer = DGLoRALayer(base, 4, "default", 0, Modulation(torch.randn(1, 1, 4, 4)))
    nn.init.normal_(layer.up.weight, std=0.01)
    x = torch.randn(1, MIN_CHANNELS, SIDE, SIDE)
    merged = layer.inference_weight()
    assert merged is not None and winograd_applies(base, x, merged, base.bias)
    expected = F.conv2d(x, merged, base.bias, padding=1)
    assert 0 < _relative_difference(layer(x), expected) < 1e-4


def test_winograd_conv3x3_works_as_the_first_nnpack_call_of_a_process() -> None:
    """NNPACK must be initialised before its first kernel call; a fresh process checks that this happens."""
    code = (
        "import torch; from srkit.nn.winograd_conv import winograd_conv3x3; "
        "x = torch.randn(1, 64, 64, 64); w = torch.randn(64, 64, 3, 3); "
        "print(tuple(winograd_conv3x3(x, w, None).shape))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
    assert done.stdout.strip() == "(1, 64, 64, 64)"


def test_automatic_choice_follows_the_cpus_it_was_measured_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """AVX2 x86-64 only (srkit/cpu_features.py decides; its tests cover the other kinds)."""
    monkeypatch.delenv(ENV_SWITCH)

    def cpu(machine: str, capability: str, flags: frozenset[str] = frozenset({"avx2", "fma"})) -> CpuFeatures:
        return CpuFeatures(machine, "test", capability, flags, nnpack=True)

    monkeypatch.setattr(cpu_features, "detect", lambda: cpu("x86_64", "AVX2"))
    assert winograd_wanted()
    monkeypatch.setattr(cpu_features, "detect", lambda: cpu("x86_64", "AVX512", frozenset({"avx2", "avx512f"})))
    assert not winograd_wanted()
    monkeypatch.setattr(cpu_features, "detect", lambda: cpu("aarch64", "SVE256", frozenset()))
    assert not winograd_wanted()


@pytest.mark.parametrize("rows_per_band", [1, 5, 64])
@torch.no_grad()
def test_large_maps_run_in_row_bands_with_the_same_result(
    rows_per_band: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bands bound NNPACK's workspace; the one-row halos and zero edge rows must give the plain convolution."""
    torch.manual_seed(0)
    x = torch.randn(2, MIN_CHANNELS, 67, 70)
    weight, bias = torch.randn(MIN_CHANNELS, MIN_CHANNELS, 3, 3), torch.randn(MIN_CHANNELS)
    monkeypatch.setattr(winograd_conv, "MAX_BAND_ELEMENTS", rows_per_band * MIN_CHANNELS * 70)
    out = winograd_conv.winograd_conv3x3(x, weight, bias)
    assert _relative_difference(out, F.conv2d(x, weight, bias, padding=1)) < 1e-4
