"""The CPU srkit runs on and the per-part choice of dtype and kernels (srkit/cpu_features.py), and what the
engines make of it: `--dtype fp32` runs every part in fp32; `--dtype auto` on an AMX CPU runs the measured parts in
bf16 and keeps the others fp32.  Kinds of CPU are faked, so every check runs on any machine."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TINY_MODELS
from typer.testing import CliRunner

from srkit import cpu_features
from srkit.api import precision_plan, resolve_dtype
from srkit.cli import app
from srkit.common import build_options
from srkit.cpu_features import CpuFeatures, Kernels, Layout, kernels_for
from srkit.engines.base import WeightsSet, get_engine, model_names
from srkit.nn.fp32_ends import Fp32EndConv2d, conv_ends

CPU = torch.device("cpu")


def fake(flags: set[str], capability: str = "AVX512", machine: str = "x86_64", limit: str | None = None) -> CpuFeatures:
    return CpuFeatures(machine, f"fake {capability}", capability, frozenset(flags), limit, nnpack=True)


AMX = fake({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
AVX512_BF16 = fake({"avx2", "fma", "avx512f", "avx512_bf16"})
AVX512 = fake({"avx2", "fma", "avx512f"})
AVX2 = fake({"avx2", "fma"}, capability="AVX2")
ARM_BF16 = fake({"bf16", "fphp"}, capability="SVE256", machine="aarch64")


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to run on a given kind of CPU (and let NNPACK's switch follow the kind)."""
    monkeypatch.delenv(cpu_features.WINOGRAD_SWITCH, raising=False)

    def use(cpu: CpuFeatures) -> CpuFeatures:
        monkeypatch.setattr(cpu_features, "detect", lambda: cpu)
        return cpu

    return use


# ---------------------------------------------------------------------------------------------------------------
# Detection


def test_kinds_follow_the_flags_and_oneDNNs_isa_limit() -> None:
    assert [c.kind for c in (AMX, AVX512_BF16, AVX512, AVX2, ARM_BF16)] == [
        "amx-bf16", "avx512-bf16", "avx512", "avx2", "arm"
    ]  # fmt: skip
    assert fake(set(), capability="DEFAULT").kind == "other"
    # ONEDNN_MAX_CPU_ISA below AMX leaves AVX512-BF16; below that, bf16 is emulated: no native bf16 at all.
    assert fake(AMX.flags, limit="AVX512_CORE_BF16").kind == "avx512-bf16"
    limited = fake(AMX.flags, limit="AVX512_CORE")
    assert limited.kind == "avx512" and not limited.native_bf16
    assert AMX.native_bf16 and AVX512_BF16.native_bf16 and ARM_BF16.native_bf16
    assert not AVX512.native_bf16 and not AVX2.native_bf16


def test_detection_reads_this_machine() -> None:
    cpu = cpu_features.detect()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.kind in cpu_features.KINDS
    summary = cpu.summary()
    assert summary["kind"] == cpu.kind and summary["threads"] == torch.get_num_threads()
    json.dumps(summary)  # reports store it


# ---------------------------------------------------------------------------------------------------------------
# The choice


@pytest.mark.parametrize("cpu", [AMX, AVX512_BF16, AVX512, AVX2, ARM_BF16], ids=lambda c: c.kind)
def test_fp32_is_fp32_in_every_part_on_every_cpu(cpu: CpuFeatures) -> None:
    assert all(kernels_for(part, CPU, torch.float32, cpu).dtype == torch.float32 for part in cpu_features.PARTS)


def test_amx_runs_the_measured_parts_in_bf16_and_keeps_the_others_fp32(on_cpu) -> None:
    on_cpu(AMX)
    assert cpu_features.cpu_auto_dtype() == torch.bfloat16
    dtypes = {part: kernels_for(part, CPU, torch.bfloat16).dtype for part in cpu_features.PARTS}
    assert dtypes == {"gan": torch.bfloat16, "unet": torch.bfloat16, "vae": torch.bfloat16,
                      "estimator": torch.float32, "tagger": torch.float32, "prompt": torch.float32,
                      "other": torch.float32}  # fmt: skip
    assert kernels_for("gan", CPU, torch.bfloat16).channels_last
    assert not any(kernels_for(part, CPU, dtype).winograd for part in cpu_features.PARTS
                   for dtype in (torch.float32, torch.bfloat16))  # fmt: skip


def test_avx2_keeps_fp32_with_nnpack_winograd_as_measured(on_cpu) -> None:
    on_cpu(AVX2)
    assert cpu_features.cpu_auto_dtype() == torch.float32
    unet = kernels_for("unet", CPU, torch.float32)
    assert unet == Kernels(torch.float32, Layout(winograd=True, phase_upsampling=True))
    assert kernels_for("gan", CPU, torch.float32) == Kernels(torch.float32)  # as before: no NNPACK for GAN nets


def test_winograd_switch_overrides_the_kind(on_cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    on_cpu(AVX2)
    assert cpu_features.winograd_wanted()
    monkeypatch.setenv(cpu_features.WINOGRAD_SWITCH, "0")
    assert not kernels_for("vae", CPU, torch.float32).winograd
    on_cpu(AMX)
    monkeypatch.setenv(cpu_features.WINOGRAD_SWITCH, "1")
    assert kernels_for("vae", CPU, torch.float32).winograd
    assert not kernels_for("vae", CPU, torch.bfloat16).winograd  # NNPACK computes fp32 only


def test_unmeasured_bf16_cpus_default_to_fp32_but_run_bf16_when_asked(on_cpu) -> None:
    for cpu in (AVX512_BF16, ARM_BF16):
        on_cpu(cpu)
        assert resolve_dtype("auto", CPU, get_engine("realesrgan-x4plus")[1]) == torch.float32
        assert resolve_dtype("bf16", CPU, get_engine("realesrgan-x4plus")[1]) == torch.bfloat16
        assert kernels_for("unet", CPU, torch.bfloat16) == Kernels(torch.bfloat16)
        assert kernels_for("estimator", CPU, torch.bfloat16).dtype == torch.float32


def test_an_engine_without_bf16_parts_stays_fp32(on_cpu) -> None:
    """A new engine whose parts nobody measured ("other") is an fp32 engine even where `auto` picks bf16."""
    from srkit.engines.base import EngineSpec

    on_cpu(AMX)
    unmeasured = EngineSpec("new", 4, 20, (), "none", "a multi-step engine not measured yet")
    assert resolve_dtype("auto", CPU, unmeasured) == resolve_dtype("bf16", CPU, unmeasured) == torch.float32
    assert resolve_dtype("auto", CPU, get_engine("s3diff")[1]) == torch.bfloat16


def test_cpu_precision_errors_are_one_clear_line(on_cpu) -> None:
    spec = get_engine("realesrgan-x4plus")[1]
    on_cpu(AVX2)
    with pytest.raises(ValueError, match="needs a CPU with native bf16.*use fp32"):
        resolve_dtype("bf16", CPU, spec)
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        resolve_dtype("fp16", CPU, spec)
    with pytest.raises(ValueError, match="network part must be one of"):
        kernels_for("decoder", CPU, torch.float32)


def test_cuda_gets_the_dtype_asked_for_except_the_estimator() -> None:
    cuda = torch.device("cuda")
    assert kernels_for("unet", cuda, torch.float16) == Kernels(torch.float16, device="cuda")
    assert kernels_for("estimator", cuda, torch.float16).dtype == torch.float32


def test_fp32_region_turns_a_cpu_autocast_off() -> None:
    from srkit.diffusion.runtime import fp32_region

    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with fp32_region(CPU):
            assert (a @ b).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# What the engines run


def engine_modules(engine) -> dict[str, torch.nn.Module]:
    """Every network an engine holds (directly, or inside a descriptor / networks container)."""
    found: dict[str, torch.nn.Module] = {}
    for name, value in vars(engine).items():
        if isinstance(value, torch.nn.Module):
            found[name] = value
            found.update({f"{name}.{child}": module for child, module in value.named_children()})
        elif hasattr(value, "__dict__"):
            found.update({f"{name}.{k.lstrip('_')}": v for k, v in vars(value).items() if isinstance(v, torch.nn.Module)})
    return found


def run_recording_dtypes(engine, spec) -> set[torch.dtype]:
    """Upscale a small image, recording the dtype of every floating tensor any module of the engine produced;
    fails if any module ran under a CPU autocast."""
    seen: set[torch.dtype] = set()

    def record(module, inputs, output) -> None:
        assert not torch.is_autocast_enabled("cpu"), f"{type(module).__name__} ran under CPU autocast"
        outputs = output if isinstance(output, (tuple, list)) else [getattr(output, "sample", output)]
        seen.update(t.dtype for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point())

    handles = [m.register_forward_hook(record) for net in engine_modules(engine).values() for m in net.modules()]
    try:
        generator = torch.Generator().manual_seed(0) if spec.stochastic else None
        out = engine.upscale(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), generator=generator)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1  # the api takes it to float32
    return seen


def build_tiny(name: str, dtype_setting: str, tmp_path):
    engine_class, spec = get_engine(name)
    paths, options = TINY_MODELS[name](tmp_path)
    dtype = resolve_dtype(dtype_setting, CPU, spec)
    engine = engine_class.from_weights(WeightsSet(paths), CPU, dtype, build_options(engine_class.options_class, options))
    return engine, spec


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_dtype_fp32_runs_every_part_in_fp32(name: str, tmp_path, on_cpu) -> None:
    """On a CPU where `auto` would pick bf16, `--dtype fp32` keeps every weight and every activation fp32."""
    on_cpu(AMX)
    engine, spec = build_tiny(name, "fp32", tmp_path)
    for label, net in engine_modules(engine).items():
        assert {p.dtype for p in net.parameters()} <= {torch.float32}, label
    assert run_recording_dtypes(engine, spec) == {torch.float32}
    assert engine.upscale(torch.rand(1, 3, 8, 8), generator=torch.Generator().manual_seed(0)).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_dtype_auto_on_amx_runs_the_chosen_parts_in_bf16(name: str, tmp_path, on_cpu) -> None:
    """Parts measured in bf16 hold bf16 weights and compute in bf16; an engine none of whose parts was measured in
    bf16 (the multi-step ControlNet engines: part "other") is an fp32 engine through and through."""
    on_cpu(AMX)
    engine, spec = build_tiny(name, "auto", tmp_path)
    plan = precision_plan(name, "cpu", "auto")
    modules = engine_modules(engine)
    if all(kernels.dtype == torch.float32 for kernels in plan.values()):
        assert engine.dtype == torch.float32
        for label, net in modules.items():
            assert {p.dtype for p in net.parameters()} <= {torch.float32}, label
        assert run_recording_dtypes(engine, spec) == {torch.float32}
        return
    # where each part's network sits in an engine: the name of its attribute, or its dotted path
    held = {"gan": "model", "unet": "unet", "vae": "vae", "estimator": "estimator", "tagger": "tagger.model",
            "prompt": "prompt"}  # fmt: skip
    optional = {"tagger"}  # a tag-prompted engine built with --tagger none holds no tagger
    assert set(plan) <= set(held)
    for part, kernels in plan.items():
        found = {id(m): m for label, m in modules.items() if label.split(".")[-1] == held[part] or label == held[part]}
        if not found and part in optional:
            continue
        (net,) = found.values()
        ends = {id(t) for end in conv_ends(net) for t in end.parameters()} if kernels.layout.fp32_ends else set()
        assert {p.dtype for p in net.parameters() if id(p) not in ends} == {kernels.dtype}, part
        assert {p.dtype for p in net.parameters() if id(p) in ends} <= {torch.float32}, part
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4]
        if kernels.channels_last and convs:
            assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs), part
    assert torch.bfloat16 in run_recording_dtypes(engine, spec)


def test_a_bf16_gan_net_reads_and_writes_fp32_at_its_ends(on_cpu) -> None:
    """First conv: fp32 image in, bf16 features out; last conv: fp32 out, off bf16's 1/256 grid; the ends' weights
    never take a round trip through bf16; preparing again in fp32 gives plain convolutions back."""
    from srkit.diffusion.runtime import prepare_module

    on_cpu(AMX)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))  # fmt: skip
    last_weight = net[4].weight.detach().clone()
    keys = set(net.state_dict())
    prepare_module(net, CPU, torch.bfloat16, part="gan")
    assert [type(m) for m in net if isinstance(m, torch.nn.Conv2d)] == [Fp32EndConv2d, torch.nn.Conv2d, Fp32EndConv2d]
    assert net[2].weight.dtype == torch.bfloat16 and torch.equal(net[4].weight, last_weight)
    assert set(net.state_dict()) == keys
    image = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert net[0](image).dtype == torch.bfloat16
        out = net(image)
    assert out.dtype == torch.float32 and not torch.equal(out, out.bfloat16().float())
    prepare_module(net, CPU, torch.float32, part="gan")
    assert all(type(m) is torch.nn.Conv2d and m.weight.dtype == torch.float32 for m in net[::2])


def test_every_engine_names_its_parts() -> None:
    for name in model_names():
        assert set(get_engine(name)[1].parts) <= set(cpu_features.PARTS), name


def test_info_prints_the_cpu_and_each_parts_choice(on_cpu) -> None:
    on_cpu(AMX)
    result = CliRunner().invoke(app, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["cpu"]["kind"] == "amx-bf16" and data["cpu_auto_dtype"] == "bf16"
    assert data["models"]["realesrgan-x4plus"]["gan"] == {
        "auto": "bf16, channels-last, fp32 first/last conv, oneDNN", "fp32": "fp32, channels-last, oneDNN"
    }  # fmt: skip
    assert data["models"]["s3diff"]["estimator"]["auto"].startswith("fp32")
    text = CliRunner().invoke(app, ["info"])
    assert text.exit_code == 0 and "amx-bf16" in text.output and "realesrgan-x4plus" in text.output
