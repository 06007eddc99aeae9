"""Golden parity of the ConsisSR engine with the official code (fixture: ../shared/golden/consissr_tiny, README).

srkit loads the fixture's Lightning checkpoint through its normal path (the architecture from the fixture's
official-layout yaml and OpenCLIP json, given as engine options) and reproduces, with the recorded noises: the
pre-processing, the respaced timesteps, the whole sampler (normal start and GAN-Embedding), the decoded image, the
colour fixes and the 8-bit PNGs.  Settings (steps, guidance, starts, seeds) are read from cases.json, so another
fixture of the same layout is checked the same way (SRKIT_GOLDEN_DIR).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import fixture_dir, json_fixture, needs, tensors_fixture
from PIL import Image

from srkit.colorfix import color_fix, truncate_8bit
from srkit.common import build_options
from srkit.diffusion.samplers.ancestral import respaced_timesteps
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.consissr import pad_zeros, prepare_official

GOLDEN = fixture_dir("consissr_tiny")
TOLERANCE = 1e-4

pytestmark = needs(GOLDEN)


def latent_tolerance(expected: torch.Tensor) -> float:
    return TOLERANCE * max(1.0, expected.abs().max().item())


def read_u8(name: str) -> np.ndarray:
    return np.asarray(Image.open(GOLDEN / name).convert("RGB"))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 / 255 in float64, then float32 NCHW (inference.py)."""
    return torch.from_numpy(pixels.astype(np.float64) / 255.0).float().permute(2, 0, 1)[None]


cases = json_fixture(GOLDEN / "cases.json")


expected = tensors_fixture(GOLDEN / "expected.safetensors")


def build(case: dict, start: str, dtype: torch.dtype = torch.float32):
    """The engine through `from_weights`, with the fixture's settings; a GAN start needs no GAN model here
    (the fixture's GAN image is given), so `--start gan` is set after building."""
    engine_class, _ = get_engine("consissr")
    values = {
        "model_config": str(GOLDEN / "cldm_tiny.yaml"),
        "clip_config": str(GOLDEN / "consissr_tiny_openclip.json"),
        "steps": case["steps"],
        "guidance": case["cfg_scale"],
        "prompt": case.get("positive_prompt", "clean, high-resolution, 8k"),
        "negative_prompt": case.get("negative_prompt", "dotted, noise, blur, lowres, smooth"),
    }
    if start == "gan":
        values |= {"start": "gan", "start_t": case["starts"]}
    options = build_options(engine_class.options_class, values)
    weights = WeightsSet({"consissr": GOLDEN / "consissr_tiny.ckpt"})
    if start == "gan":  # from_weights would build the GAN model too; the fixture gives its output instead
        from srkit.engines.consissr import load_export

        nets = load_export(weights["consissr"], options.model_config, options.clip_config)
        return engine_class(nets, torch.device("cpu"), dtype, options)
    return engine_class.from_weights(weights, torch.device("cpu"), dtype, options)


def replay(expected: dict, prefix: str):
    """The recorded per-step noises, in loop order."""
    return lambda index, like: expected[f"{prefix}.step{index}.noise"]


@pytest.fixture(scope="module")
def control(cases) -> torch.Tensor:
    return pad_zeros(to_tensor(prepare_official(read_u8("input_lr.png"), cases["sample"]["sr_scale"])))


@pytest.fixture(scope="module")
def sample_run(cases, expected, control):
    engine = build(cases["sample"], "noise")
    latent = engine.generate(control * 2 - 1, draw=replay(expected, "sample"), start_noise=expected["sample.x_T"])
    return engine, latent


def test_golden_consissr_preprocessing(cases) -> None:
    prepared = prepare_official(read_u8("input_lr.png"), cases["sample"]["sr_scale"])
    assert list(prepared.shape[1::-1]) == cases["sample"]["after_auto_resize"]
    padded = pad_zeros(to_tensor(prepared))
    assert list(padded.shape[-1:-3:-1]) == cases["sample"]["padded"]
    assert np.array_equal((padded[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), read_u8("sample_preprocessed.png"))


@pytest.mark.parametrize("case_name", ["sample", "lre"])
def test_golden_consissr_respaced_timesteps(cases, case_name: str) -> None:
    case = cases[case_name]
    steps = respaced_timesteps(case["steps"], 1000, case.get("starts", 1.0))
    assert steps == [t for t, _ in case["timesteps_and_index"]]


def test_golden_consissr_sampler_with_recorded_noise(sample_run, expected) -> None:
    _, latent = sample_run
    error = (latent - expected["sample.latent"]).abs().max().item()
    assert error <= latent_tolerance(expected["sample.latent"]), f"final latent off by {error:.3g}"


def test_golden_consissr_decode_and_colour_fixes(sample_run, expected, control) -> None:
    engine, latent = sample_run
    with torch.inference_mode():
        decoded = engine.nets.decode(latent)
    assert (decoded - expected["sample.decoded"]).abs().max() <= TOLERANCE
    image = (decoded + 1) / 2
    for method in ("adain", "wavelet"):  # srkit's fixes clamp to [0, 1]; the fixture's floats are unclamped
        fixed = color_fix(image, control, method)
        assert (fixed - expected[f"sample.{method}"].clamp(0, 1)).abs().max() <= TOLERANCE, method


def test_golden_consissr_png_through_the_engine_finish(sample_run, expected, control, cases) -> None:
    """AdaIN (the default), 8-bit truncation, crop: every pixel within one level of the official PNG."""
    engine, latent = sample_run
    size = tuple(cases["sample"]["output_size"][::-1])
    out = engine.finish(latent, control, size, size)
    assert torch.equal(truncate_8bit(out), out)
    diff = np.abs((out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16) - read_u8("sample_sr_adain.png"))
    assert diff.max() <= 1


def test_golden_consissr_gan_embedding(cases, expected, control) -> None:
    """GAN-Embedding: the GAN image as hint and token source, its latent q-sampled at t_max, the truncated
    schedule, AdaIN against the LR's control image."""
    case = cases["lre"]
    engine = build(case, "gan")
    assert list(engine.sampler.timesteps) == [t for t, _ in case["timesteps_and_index"]]
    gan = pad_zeros(to_tensor(read_u8("input_gan.png")))
    latent = engine.generate(gan * 2 - 1, draw=replay(expected, "lre"), start_noise=expected["lre.q_sample_noise"])
    error = (latent - expected["lre.latent"]).abs().max().item()
    assert error <= latent_tolerance(expected["lre.latent"]), f"final latent off by {error:.3g}"
    size = tuple(case["gan_size"][::-1])
    out = engine.finish(latent, control, size, size)
    diff = np.abs((out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16) - read_u8("lre_sr_adain.png"))
    assert diff.max() <= 1
