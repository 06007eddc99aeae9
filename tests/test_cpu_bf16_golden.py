"""bf16 on the CPU keeps the one-step engines and ConsisSR within the half-precision tolerance on the tiny golden
models.

The engines run as `--dtype auto` runs them on an AMX-BF16 CPU (srkit/cpu_features.py: UNet and VAE in bf16 with
their measured layouts, estimator, x0 formula, modulation and colour fix in fp32) — on any CPU: the plan is
forced, and a CPU without native bf16 computes the same bf16 operations in software.  Their float outputs are
compared with the fp32 golden outputs of the official code.

Half-precision tolerance (fp16/bf16 on CUDA alike): PSNR ≥ 45 dB against the fp32 output on the [0, 1] scale (an
rms error below 1.5 8-bit levels) and no pixel off by more than 0.2 on the [-1, 1] scale.  These random tiny
models are harsher than trained ones (x0 multiplies ε errors by ~15, random VAEs have no smooth latents): measured
on the AMX machine 49–65 dB, max 0.12 (the VAE contributes most of it).  Where a part failed this, it would stay
fp32 (`BF16_PARTS`), or the whole engine would (SeeSR: 44.9 dB in bf16, so its parts are "other" and fp32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from golden import fixture_dir, read_tensors
from PIL import Image

from srkit import cpu_features
from srkit.api import resolve_dtype
from srkit.common import build_options
from srkit.diffusion.runtime import module_dtype
from srkit.engines.base import WeightsSet, get_engine

HALF_PRECISION_PSNR_DB = 45.0
HALF_PRECISION_MAX_ERROR = 0.2
AMX = cpu_features.CpuFeatures(
    machine="x86_64", name="test AMX", capability="AVX512",
    flags=frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}), nnpack=True,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _amx_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_features, "detect", lambda: AMX)


def fixture(name: str) -> Path:
    """The fixture folder under the golden root (SRKIT_GOLDEN_DIR), or a skip with the reason."""
    folder = fixture_dir(name)
    if not folder.is_dir():
        pytest.skip(f"golden fixture {folder} is absent")
    return folder


def read(path: Path) -> torch.Tensor:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()


def expected(folder: Path) -> dict[str, torch.Tensor]:
    return read_tensors(folder / "expected.safetensors")


def build(model: str, weights: dict[str, Path], **options):
    engine_class, spec = get_engine(model)
    dtype = resolve_dtype("auto", torch.device("cpu"), spec)
    assert dtype == torch.bfloat16
    values = {"latent": "mode", "color_fix": "none", "official_8bit": False, **options}
    engine = engine_class.from_weights(
        WeightsSet(weights), torch.device("cpu"), dtype, build_options(engine_class.options_class, values)
    )
    assert module_dtype(engine.unet) == module_dtype(engine.vae) == torch.bfloat16
    return engine


def assert_within_half_precision(sr: torch.Tensor, reference: torch.Tensor) -> None:
    """sr, reference in [-1, 1]."""
    assert sr.dtype == torch.float32 and sr.shape == reference.shape
    mse = ((sr - reference) / 2).square().mean().item()
    psnr = 10 * np.log10(1 / max(mse, 1e-20))
    worst = (sr - reference).abs().max().item()
    message = f"PSNR {psnr:.1f} dB, max |error| {worst:.4f}"
    assert psnr >= HALF_PRECISION_PSNR_DB and worst <= HALF_PRECISION_MAX_ERROR, message


@pytest.fixture(scope="module")
def s3diff_engine():
    folder = fixture("s3diff_tiny")
    weights = {"sd-turbo": folder / "base", "s3diff": folder / "s3diff.pkl", "s3diff-de-net": folder / "de_net.pth"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_features, "detect", lambda: AMX)
        engine = build("s3diff", weights, prompt_embeds=str(folder / "prompt_embeds.safetensors"))
    assert module_dtype(engine.networks.estimator) == torch.float32  # its scores set every modulation
    return engine, folder


@pytest.mark.parametrize("case", ["small", "tiled"])
def test_s3diff_bf16_on_the_cpu_within_half_precision(case: str, s3diff_engine) -> None:
    engine, folder = s3diff_engine
    sr = engine.upscale(read(folder / f"input_{case}.png")) * 2 - 1
    assert_within_half_precision(sr, expected(folder)[f"{case}.sr"])


def test_osediff_bf16_on_the_cpu_within_half_precision() -> None:
    folder = fixture("osediff_tiny")
    base = folder / "base"
    engine = build("osediff", {"osediff": folder / "osediff.pkl", "sd21-base": base, "sd21-text": base},
                   prompt_embeds=str(folder / "prompt_embeds.safetensors"))  # fmt: skip
    reference = expected(folder)
    assert_within_half_precision(engine.restore(read(folder / "prepared_small.png") * 2 - 1), reference["small.sr"])
    assert_within_half_precision(engine.upscale(read(folder / "input_tiled.png")) * 2 - 1, reference["tiled.sr"])


@pytest.mark.parametrize(("model", "t_diff", "t_add"), [("gdpo", 100, 250), ("naosd", 250, 250)])
def test_noise_injection_bf16_on_the_cpu_within_half_precision(model: str, t_diff: int, t_add: int) -> None:
    folder = fixture("naosd_tiny")
    _, spec = get_engine(model)
    engine = build(model, {spec.weights[0]: folder / "merged", "sd21-text": folder / "base"}, t_diff=t_diff,
                   t_add=t_add, prompt_embeds=str(folder / "prompt_embeds.safetensors"))  # fmt: skip
    reference = expected(folder)
    case = f"small.t{t_diff}_{t_add}"
    restored = engine.restore(read(folder / "prepared_small.png") * 2 - 1, noise=reference[f"{case}.noise"])
    assert_within_half_precision(restored, reference[f"{case}.sr"])


def test_consissr_bf16_on_the_cpu_within_half_precision() -> None:
    """The multi-step ControlNet engine: ControlNet, UNet, hint encoder and VAE in bf16, the sampler's maths and the
    CLIP prompt in fp32, over every step of the fixture's trajectory with its recorded noises."""
    import json

    from test_golden_consissr import GOLDEN, build, pad_zeros, prepare_official, read_u8, replay, to_tensor

    fixture(GOLDEN.name)
    case = json.loads((GOLDEN / "cases.json").read_text())["sample"]
    reference = expected(GOLDEN)
    engine = build(case, "noise", resolve_dtype("auto", torch.device("cpu"), get_engine("consissr")[1]))
    assert module_dtype(engine.nets.unet) == module_dtype(engine.nets.vae) == torch.bfloat16
    control = pad_zeros(to_tensor(prepare_official(read_u8("input_lr.png"), case["sr_scale"])))
    latent = engine.generate(control * 2 - 1, draw=replay(reference, "sample"), start_noise=reference["sample.x_T"])
    with torch.inference_mode():
        decoded = engine.nets.decode(latent).float()
    assert_within_half_precision(decoded, reference["sample.decoded"])

