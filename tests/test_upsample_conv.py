"""Nearest ×2 + 3×3 conv as four 2×2 convolutions: equal to the plain computation, and used only where exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn

from srkit.nn.dg_lora import DGLoRALayer, Modulation
from srkit.nn.upsample_conv import PhaseUpsample2D, phase_kernels, upsample_conv, use_phase_upsampling


def _plain(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (1, 3, 1, 1), (1, 6, 16, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_upsample_then_conv_in_float64(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 5, 3, padding=1, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    out = upsample_conv(x, conv.weight, conv.bias)
    assert out.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(out, _plain(x, conv), rtol=0, atol=1e-12)


def test_phase_kernels_sum_the_taps_that_see_one_input_pixel() -> None:
    weight = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    kernels = phase_kernels(weight)
    # even rows, even columns: rows (w0, w1 + w2), then columns alike
    assert kernels[0, 0, 0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # odd rows, odd columns: rows (w0 + w1, w2), columns (w0 + w1, w2)
    assert kernels[1, 1, 0, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def _upsampler(channels: int = 4) -> Upsample2D:
    torch.manual_seed(1)
    return Upsample2D(channels, use_conv=True).eval()


@torch.no_grad()
def test_phase_upsample2d_matches_diffusers_upsample2d() -> None:
    upsampler = _upsampler()
    x = torch.randn(2, 4, 6, 7)
    expected = upsampler(x)
    assert use_phase_upsampling(upsampler) == 1 and type(upsampler) is PhaseUpsample2D
    torch.testing.assert_close(upsampler(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(upsampler(x, output_size=(12, 14)), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_phase_upsample2d_falls_back_to_the_original_for_other_target_sizes() -> None:
    upsampler = _upsampler()
    x = torch.randn(1, 4, 6, 7)
    expected = upsampler(x, output_size=(11, 13))  # the UNet's odd-size path: not a plain ×2
    use_phase_upsampling(upsampler)
    assert torch.equal(upsampler(x, output_size=(11, 13)), expected)


def test_switching_keeps_parameters_and_switches_back() -> None:
    model = nn.Sequential(_upsampler(), nn.Conv2d(4, 4, 1), _upsampler())
    keys = list(model.state_dict())
    assert use_phase_upsampling(model) == 2
    assert list(model.state_dict()) == keys
    assert use_phase_upsampling(model, enabled=False) == 2
    assert all(type(m) is Upsample2D for m in (model[0], model[2]))


def test_dg_lora_upsampler_uses_the_merged_weight_and_falls_back_under_autograd() -> None:
    upsampler = _upsampler()
    modulation = Modulation(torch.randn(1, 1, 2, 2))
    upsampler.conv = DGLoRALayer(upsampler.conv, 2, "default", 0, modulation)
    nn.init.normal_(upsampler.conv.up.weight)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        expected = upsampler(x)  # diffusers' forward through the merged DG-LoRA layer
        use_phase_upsampling(upsampler)
        torch.testing.assert_close(upsampler(x), expected, rtol=0, atol=1e-5)
    # with gradients the layer runs its unmerged branch; the phase path steps aside and gradients flow
    x.requires_grad_(True)
    out = upsampler(x)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-5)
    out.sum().backward()
    assert x.grad is not None and upsampler.conv.up.weight.grad is not None


@torch.no_grad()
def test_phase_kernels_are_kept_until_the_weight_changes() -> None:
    upsampler = _upsampler()
    use_phase_upsampling(upsampler)
    x = torch.randn(1, 4, 5, 5)
    upsampler(x)
    kept = upsampler._phase_cache[1]
    upsampler(x)
    assert upsampler._phase_cache[1] is kept  # not derived again for the next tile or image
    upsampler.conv.weight.mul_(2)  # e.g. new weights loaded in place
    upsampler.conv.bias.mul_(2)
    reference = _plain(x, upsampler.conv)
    torch.testing.assert_close(upsampler(x), reference, rtol=0, atol=1e-5)
    assert upsampler._phase_cache[1] is not kept


@torch.no_grad()
def test_phase_upsampling_follows_the_layout_of_the_weights_not_of_the_input() -> None:
    """A channels-last part writes channels-last; a contiguous (fp32) part keeps its contiguous path even when an
    activation arrives channels-last, so `--dtype fp32` outputs stay where they were."""
    upsampler = _upsampler(8)
    x = torch.randn(1, 8, 6, 7)
    expected = upsampler(x)
    use_phase_upsampling(upsampler)
    contiguous_part = upsampler(x.to(memory_format=torch.channels_last))
    assert contiguous_part.is_contiguous()
    torch.testing.assert_close(contiguous_part, expected, rtol=0, atol=1e-5)
    upsampler.to(memory_format=torch.channels_last)
    channels_last_part = upsampler(x.to(memory_format=torch.channels_last))
    assert not channels_last_part.is_contiguous()
    assert channels_last_part.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last_part, expected, rtol=0, atol=1e-5)
