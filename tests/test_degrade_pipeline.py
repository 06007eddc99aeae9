"""The second-order degradation: seeding, batching, sizes, noise and JPEG, config files, draw statistics."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import smooth_image

from srkit.degrade.config import MIXED_KERNELS, DegradationConfig, StageConfig
from srkit.degrade.filters import resize
from srkit.degrade.jpeg import jpeg_compress
from srkit.degrade.noise import gaussian_noise, poisson_noise
from srkit.degrade.pipeline import DegradationPipeline
from srkit.degrade.sampling import sample_seed


def hr_batch(count: int, height: int = 64, width: int = 48) -> torch.Tensor:
    return torch.stack([torch.from_numpy(smooth_image(height, width, seed=i)).permute(2, 0, 1) for i in range(count)])


@pytest.fixture(scope="module")
def pipeline() -> DegradationPipeline:
    return DegradationPipeline()


# ----------------------------------------------------------------------------------------------------------
# Seeding and batching


def test_same_seed_same_lr_different_seed_different_lr(pipeline):
    hr = hr_batch(3)
    first = pipeline(hr, seed=0)
    assert torch.equal(first, pipeline(hr, seed=0))
    other = pipeline(hr, seed=1)
    for i in range(3):
        assert not torch.equal(first[i], other[i])


def test_batch_equals_one_by_one(pipeline):
    hr = hr_batch(4)
    batch = pipeline(hr, seed=7)
    singles = torch.cat([pipeline(hr[i : i + 1], seed=7, indices=[i]) for i in range(4)])
    assert torch.equal(batch, singles)
    reordered = pipeline(hr.flip(0), seed=7, indices=[3, 2, 1, 0])
    assert torch.equal(reordered, batch.flip(0))


def test_samples_of_one_batch_get_different_degradations(pipeline):
    same_picture = hr_batch(1).expand(4, -1, -1, -1)
    lr = pipeline(same_picture, seed=0)
    assert len({lr[i].numpy().tobytes() for i in range(4)}) == 4


def test_sample_seeds_are_distinct_per_index_and_stream():
    seeds = {sample_seed(0, index, stream) for index in range(50) for stream in range(3)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)


# ----------------------------------------------------------------------------------------------------------
# Output


@pytest.mark.parametrize("scale", [4, 2])
def test_output_is_hr_over_scale_and_8_bit(scale):
    hr = hr_batch(2, 64, 44)
    lr = DegradationPipeline(scale=scale)(hr, seed=3)
    assert lr.shape == (2, 3, 64 // scale, 44 // scale) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, (lr * 255).round() / 255)


def test_with_blur_noise_and_sinc_switched_off_only_resizes_and_jpegs_remain():
    """Wiring check: stage 1 keeps the size and JPEGs; stage 2 resizes to HR / scale and JPEGs; the final
    resize finds the LR size already reached.  Nothing else may touch the pixels."""
    quiet = StageConfig(blur_prob=0.0, resize_prob=(0.0, 0.0, 1.0), gaussian_noise_prob=1.0, noise_range=(0.0, 0.0),
                        jpeg_range=(90, 90))
    pipeline = DegradationPipeline(DegradationConfig(usm_sharpen=False, stage1=quiet, stage2=quiet, final_sinc_prob=0.0))
    hr = hr_batch(3, 64, 64)
    lr = pipeline(hr, seed=0)
    for i in range(3):
        mode = pipeline.sample(0, i).stage2.resize_mode
        expected = jpeg_compress(resize(jpeg_compress(hr[i], 90)[None], (16, 16), mode)[0].clamp(0, 1), 90)
        assert torch.equal(lr[i], expected)


def test_default_degradation_actually_degrades(pipeline):
    hr = hr_batch(4, 64, 64)
    reference = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    difference = (pipeline(hr, seed=0) - reference).abs().mean(dim=(1, 2, 3))
    assert (difference > 0.005).all()


def test_bad_batches_fail_clearly(pipeline):
    with pytest.raises(ValueError, match="B×3×H×W"):
        pipeline(torch.rand(3, 16, 16), seed=0)
    with pytest.raises(ValueError, match="smaller than the scale"):
        pipeline(torch.rand(1, 3, 3, 16), seed=0)
    with pytest.raises(ValueError, match="indices"):
        pipeline(torch.rand(2, 3, 16, 16), seed=0, indices=[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_lr_up_to_rounding(pipeline):
    hr = hr_batch(2)
    cpu, cuda = pipeline(hr, seed=5), pipeline(hr.cuda(), seed=5)
    assert cuda.device.type == "cuda"
    assert (cpu - cuda.cpu()).abs().mean() < 2 / 255


# ----------------------------------------------------------------------------------------------------------
# Noise and JPEG


def test_gaussian_noise_has_the_drawn_sigma_and_gray_noise_is_shared():
    image = torch.full((3, 128, 128), 0.5)
    noise = gaussian_noise(image, 20.0, gray=False, generator=torch.Generator().manual_seed(0))
    assert noise.std().item() == pytest.approx(20 / 255, rel=0.03)
    assert not torch.equal(noise[0], noise[1])
    gray = gaussian_noise(image, 20.0, gray=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_poisson_noise_variance_follows_the_signal():
    """256 distinct levels → 256 counts per unit: Var = value / 256 · scale²."""
    ramp = torch.linspace(0, 1, 256).repeat(3, 256, 1)
    scale = 2.0
    noise = poisson_noise(ramp, scale, gray=False, generator=torch.Generator().manual_seed(0))
    assert noise.mean().abs().item() < 0.002
    expected = ((ramp * 255).round() / 255).mean().item() / 256 * scale**2
    assert noise.pow(2).mean().item() == pytest.approx(expected, rel=0.05)
    gray = poisson_noise(ramp, scale, gray=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gray[0], gray[2])


def test_jpeg_round_trip_keeps_size_and_loses_more_at_low_quality():
    image = torch.from_numpy(smooth_image(48, 40)).permute(2, 0, 1)
    high, low = jpeg_compress(image, 95), jpeg_compress(image, 30)
    assert high.shape == image.shape and high.dtype == image.dtype
    assert torch.equal(high, (high * 255).round() / 255)
    assert (high - image).abs().mean() < (low - image).abs().mean() < 0.05


# ----------------------------------------------------------------------------------------------------------
# Config


def test_defaults_are_the_published_ones():
    config = DegradationConfig()
    one, two = config.stage1, config.stage2
    assert (one.resize_prob, one.resize_range, one.noise_range, one.poisson_scale_range) == (
        (0.2, 0.7, 0.1), (0.15, 1.5), (1, 30), (0.05, 3))
    assert (two.resize_prob, two.resize_range, two.noise_range, two.poisson_scale_range) == (
        (0.3, 0.4, 0.3), (0.3, 1.2), (1, 25), (0.05, 2.5))
    assert (one.blur_sigma, two.blur_sigma, one.blur_prob, two.blur_prob) == ((0.2, 3), (0.2, 1.5), 1, 0.8)
    assert one.kernel_prob == two.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert one.jpeg_range == two.jpeg_range == (30, 95) and config.final_sinc_prob == 0.8


def test_config_toml_round_trip_and_partial_override(tmp_path):
    custom = replace(DegradationConfig(), final_sinc_prob=0.25,
                     stage2=replace(DegradationConfig().stage2, noise_range=(2.0, 3.5), kernel_list=("iso", "aniso"),
                                    kernel_prob=(0.5, 0.5)))
    path = tmp_path / "degrade.toml"
    path.write_text(custom.to_toml())
    assert DegradationConfig.from_toml(path) == custom
    path.write_text("[stage1]\njpeg_range = [60, 70]\n")
    partial = DegradationConfig.from_toml(path)
    assert partial.stage1.jpeg_range == (60, 70)
    assert replace(partial, stage1=DegradationConfig().stage1) == DegradationConfig()


@pytest.mark.parametrize(("text", "message"), [
    ("noise = 3\n", "unknown key 'noise'"),
    ("[stage1]\nresize_prob = [0.5, 0.6, 0.1]\n", "summing to 1"),
    ("[stage2]\nnoise_range = [30, 1]\n", "low <= high"),
    ("[stage1]\nkernel_list = ['iso', 'box']\nkernel_prob = [0.5, 0.5]\n", "unknown kernel kind 'box'"),
    ("usm_sharpen = 'yes'\n", "wrong type"),
    ("final_sinc_prob = [\n", "bad config"),
])
def test_bad_config_files_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        DegradationConfig.from_toml(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# Statistics of the drawn parameters (no pixel work: parameters are drawn on their own)

DRAWS = 2000


@pytest.fixture(scope="module")
def draws(pipeline):
    return [pipeline.sample(seed=11, index=i) for i in range(DRAWS)]


def fraction(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_resize_draws_match_the_configured_ranges(draws, pipeline, stage_name):
    config = getattr(pipeline.config, stage_name)
    stages = [getattr(d, stage_name) for d in draws]
    for direction, probability in zip(("up", "down", "keep"), config.resize_prob, strict=True):
        assert fraction(s.resize == direction for s in stages) == pytest.approx(probability, abs=0.04)
    low, high = config.resize_range
    ups = [s.resize_scale for s in stages if s.resize == "up"]
    downs = [s.resize_scale for s in stages if s.resize == "down"]
    assert all(1 <= v <= high for v in ups) and all(low <= v <= 1 for v in downs)
    assert np.mean(ups) == pytest.approx((1 + high) / 2, abs=0.03)
    assert np.mean(downs) == pytest.approx((low + 1) / 2, abs=0.03)
    assert all(s.resize_scale == 1 for s in stages if s.resize == "keep")
    assert {s.resize_mode for s in stages} == {"area", "bilinear", "bicubic"}


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_noise_and_jpeg_draws_match_the_configured_ranges(draws, pipeline, stage_name):
    config = getattr(pipeline.config, stage_name)
    stages = [getattr(d, stage_name) for d in draws]
    sigmas = [s.noise.strength for s in stages if s.noise.kind == "gaussian"]
    scales = [s.noise.strength for s in stages if s.noise.kind == "poisson"]
    assert len(sigmas) / DRAWS == pytest.approx(config.gaussian_noise_prob, abs=0.04)
    assert fraction(s.noise.gray for s in stages) == pytest.approx(config.gray_noise_prob, abs=0.04)
    for values, (low, high) in ((sigmas, config.noise_range), (scales, config.poisson_scale_range)):
        assert low <= min(values) and max(values) <= high
        assert np.mean(values) == pytest.approx((low + high) / 2, abs=0.05 * (high - low))
        assert min(values) < low + 0.05 * (high - low) and max(values) > high - 0.05 * (high - low)
    qualities = [s.jpeg_quality for s in stages]
    assert all(isinstance(q, int) for q in qualities)
    assert (min(qualities), max(qualities)) == config.jpeg_range
    assert np.mean(qualities) == pytest.approx(sum(config.jpeg_range) / 2, abs=1.5)


@pytest.mark.parametrize("stage_name", ["stage1", "stage2"])
def test_kernel_draws_match_the_configured_mixture(draws, pipeline, stage_name):
    config = getattr(pipeline.config, stage_name)
    kernels = [getattr(d, stage_name).kernel for d in draws]
    assert fraction(k is not None for k in kernels) == pytest.approx(config.blur_prob, abs=0.04)
    kernels = [k for k in kernels if k is not None]
    sincs = [k for k in kernels if k.kind == "sinc"]
    assert len(sincs) / len(kernels) == pytest.approx(config.sinc_prob, abs=0.03)
    assert {k.size for k in kernels} == set(range(7, 22, 2))
    for k in sincs:
        assert (math.pi / 3 if k.size < 13 else math.pi / 5) <= k.cutoff <= math.pi
    mixed = [k for k in kernels if k.kind != "sinc"]
    for kind, probability in zip(MIXED_KERNELS, config.kernel_prob, strict=True):
        assert fraction(k.kind == kind for k in mixed) == pytest.approx(probability, abs=0.04)
    low, high = config.blur_sigma
    assert all(low <= k.sigma_x <= high and low <= k.sigma_y <= high for k in mixed)
    assert all(k.sigma_x == k.sigma_y and k.theta == 0 for k in mixed if not k.kind.endswith("aniso"))
    assert all(-math.pi <= k.theta <= math.pi for k in mixed)
    betas = [k.beta for k in mixed if k.kind.startswith("generalized")]
    assert min(betas) >= config.betag_range[0] and max(betas) <= config.betag_range[1]
    assert fraction(b < 1 for b in betas) == pytest.approx(0.5, abs=0.1)  # coin between [low, 1] and [1, high]
    plateau = [k.beta for k in mixed if k.kind.startswith("plateau")]
    assert all(config.betap_range[0] <= b <= config.betap_range[1] for b in plateau)


def test_final_sinc_and_order_draws(draws):
    finals = [d.final_sinc for d in draws]
    assert fraction(k is not None for k in finals) == pytest.approx(0.8, abs=0.03)
    assert all(k.kind == "sinc" and math.pi / 3 <= k.cutoff <= math.pi for k in finals if k is not None)
    assert fraction(d.sinc_before_jpeg for d in draws) == pytest.approx(0.5, abs=0.04)


def test_a_config_file_drives_the_draws(tmp_path):
    path = tmp_path / "narrow.toml"
    path.write_text("final_sinc_prob = 0.0\n[stage1]\ngaussian_noise_prob = 1.0\nnoise_range = [5, 6]\n"
                    "jpeg_range = [70, 72]\nresize_prob = [0, 1, 0]\nresize_range = [0.5, 1.5]\n")
    pipeline = DegradationPipeline(DegradationConfig.from_toml(path))
    params = [pipeline.sample(0, i).stage1 for i in range(200)]
    assert all(p.noise.kind == "gaussian" and 5 <= p.noise.strength <= 6 for p in params)
    assert {p.jpeg_quality for p in params} == {70, 71, 72}
    assert all(p.resize == "down" and 0.5 <= p.resize_scale <= 1 for p in params)
    assert all(pipeline.sample(0, i).final_sinc is None for i in range(50))
