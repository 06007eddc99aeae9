"""Degradation-guided LoRA: the layer against the explicit per-sample formula, matching rules, block layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srkit.nn.dg_lora import (
    DegradationGuidance,
    DGLoRALayer,
    Modulation,
    fourier_features,
    inject,
    match_list,
    match_regex,
    unet_block,
    vae_block,
)


def _layer(base: nn.Module, rank: int = 4, blocks: int = 3, images: int = 2, block: int = 1) -> DGLoRALayer:
    torch.manual_seed(0)
    modulation = Modulation(torch.randn(images, blocks, rank, rank))
    layer = DGLoRALayer(base, rank, "default", block, modulation)
    nn.init.normal_(layer.up.weight)  # a fresh layer has B = 0; make the branch visible
    return layer


def _explicit_weight(layer: DGLoRALayer, image: int) -> torch.Tensor:
    """W + scaling · B · Cᵀ · A for one image, written out with the factors' own shapes."""
    c = layer.modulation.matrices[image, layer.block]
    a = layer.down.weight.reshape(layer.rank, -1)
    b = layer.up.weight.reshape(-1, layer.rank)
    delta = layer.scaling * b @ c.T @ a
    return layer.base_layer.weight + delta.reshape(layer.base_layer.weight.shape)


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("merge", [True, False])
@torch.no_grad()
def test_s3diff_dg_lora_linear_equals_explicit_per_sample_weight(merge: bool, images: int) -> None:
    layer = _layer(nn.Linear(12, 10), images=images)
    layer.modulation.merge = merge
    x = torch.randn(2 * images, 7, 12)  # two copies (e.g. CFG) of the image batch
    out = layer(x)
    for n in range(2 * images):
        expected = F.linear(x[n], _explicit_weight(layer, n % images), layer.base_layer.bias)
        torch.testing.assert_close(out[n], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 0, 3), (1, 0, 1)])
@torch.no_grad()
def test_s3diff_dg_lora_conv_equals_explicit_per_sample_weight(
    merge: bool, images: int, stride: int, padding: int, kernel: int
) -> None:
    layer = _layer(nn.Conv2d(6, 8, kernel, stride, padding), images=images)
    layer.modulation.merge = merge
    x = torch.randn(images, 6, 9, 9)
    out = layer(x)
    for n in range(images):
        expected = F.conv2d(x[n : n + 1], _explicit_weight(layer, n), layer.base_layer.bias, stride, padding)
        torch.testing.assert_close(out[n : n + 1], expected, rtol=1e-5, atol=1e-5)


def test_s3diff_dg_lora_merges_once_per_image_into_a_reused_buffer() -> None:
    """One merge per image serves every later call (guidance halves, latent tiles); a new C recomputes it in
    the same buffer; with gradients on, the layer runs unmerged so that training sees the factors."""
    layer = _layer(nn.Conv2d(5, 7, 3, 1, 1), images=1)
    x = torch.randn(3, 5, 8, 8)  # three copies of one image
    with torch.no_grad():
        merged = layer(x)
        buffer = layer._merged
        assert buffer is not None
        with torch.inference_mode():  # the buffer is an inference tensor (written under inference_mode)
            buffer.add_(1.0)  # a stale cache would show in the next output
        torch.testing.assert_close(layer(x), F.conv2d(x, buffer, layer.base_layer.bias, padding=1))
        layer.modulation.matrices = torch.randn(1, 3, 4, 4)
        remerged = layer(x)
        assert layer._merged.data_ptr() == buffer.data_ptr()
        expected = F.conv2d(x, _explicit_weight(layer, 0), layer.base_layer.bias, padding=1)
        torch.testing.assert_close(remerged, expected, rtol=1e-5, atol=1e-5)
        layer.modulation.merge = False
        torch.testing.assert_close(layer(x), remerged, rtol=1e-5, atol=1e-4)
        layer.release_merged()
        assert layer._merged is None
    layer.modulation.merge = True
    out = layer(x)
    out.sum().backward()
    assert layer.down.weight.grad is not None and layer._merged is None
    assert not torch.equal(merged, remerged)


def test_s3diff_dg_lora_scaling_and_names_follow_peft() -> None:
    layer = DGLoRALayer(nn.Linear(4, 4), 16, "vae_skip", 0, Modulation())
    assert layer.scaling == 8 / 16
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.vae_skip.weight",
        "lora_B.vae_skip.weight",
    }
    with pytest.raises(RuntimeError, match="set_degradation"):
        layer(torch.zeros(1, 4))


def test_s3diff_dg_lora_batch_must_be_copies_of_the_images() -> None:
    layer = _layer(nn.Linear(3, 3), images=2)
    layer.modulation.merge = False
    with pytest.raises(ValueError, match="copies"):
        layer(torch.zeros(3, 3))


def test_s3diff_peft_matching_rules() -> None:
    names = ["conv_in", "down.0.conv", "down.0.conv1", "a.to_out.0", "a.to_out.1", "encoder.conv_out", "xconv"]
    assert match_list(names, ["conv", "to_out.0"]) == ["down.0.conv", "a.to_out.0"]
    assert match_regex(names, r"^encoder\..*(conv_out)$") == ["encoder.conv_out"]


def test_s3diff_inject_wraps_only_matching_linear_and_conv_layers() -> None:
    model = nn.Sequential()
    model.add_module("down_blocks", nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))]))
    model.add_module("conv_out", nn.Conv2d(4, 3, 1))
    layers = inject(model, ["0", "conv_out"], 2, "default", unet_block, Modulation())
    assert sorted(layers) == ["conv_out", "down_blocks.0.0"]
    assert isinstance(model.down_blocks[0][0], DGLoRALayer) and isinstance(model.down_blocks[0][1], nn.GroupNorm)
    assert layers["down_blocks.0.0"].block == 0 and layers["conv_out"].block == 9


def test_s3diff_block_layout() -> None:
    assert vae_block("encoder.down_blocks.2.resnets.0.conv1") == 2
    assert vae_block("encoder.mid_block.attentions.0.to_q") == 4
    assert vae_block("encoder.conv_in") == vae_block("encoder.conv_out") == 5
    assert unet_block("down_blocks.3.resnets.1.conv2") == 3
    assert unet_block("mid_block.attentions.0.proj_in") == 4
    assert unet_block("up_blocks.2.attentions.1.proj_out") == 7
    assert unet_block("conv_out") == 9


def test_s3diff_fourier_features_order() -> None:
    w = torch.tensor([0.5, -1.0])
    scores = torch.tensor([[0.25, 0.75]])
    features = fourier_features(scores, w)
    p0, p1 = 2 * math.pi * 0.25 * w, 2 * math.pi * 0.75 * w
    expected = torch.cat([p0.sin(), p0.cos(), p1.sin(), p1.cos()])[None]
    torch.testing.assert_close(features, expected)


def test_s3diff_guidance_shapes_per_image_and_block() -> None:
    guidance = DegradationGuidance(rank_vae=4, rank_unet=6)
    vae_c, unet_c = guidance(torch.tensor([[0.1, 0.9], [0.5, 0.5]]))
    assert vae_c.shape == (2, 6, 4, 4) and unet_c.shape == (2, 10, 6, 6)
    assert not torch.allclose(vae_c[0], vae_c[1])
