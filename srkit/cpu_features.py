"""The CPU srkit runs on, and how each network part runs there: the one place that knows both.

Detection reads PyTorch's kernel level (`torch.backends.cpu.get_cpu_capability()`: AVX2, AVX512, SVE...), the ISA
flags cpuinfo reports (`torch.cpu.get_capabilities()`: AMX-BF16, AVX512-BF16, AVX512-FP16...; on ARM the `bf16`
and `fphp` flags of /proc/cpuinfo) and oneDNN's own ISA limit (`ONEDNN_MAX_CPU_ISA`), and names a *kind* of CPU:

- `amx-bf16`: AMX tiles with bf16 and AVX512-BF16 (Xeon since Sapphire Rapids).  Measured (see `MEASURED`).
- `avx512-bf16`: AVX512-BF16 without usable AMX (Cooper Lake, AMD Zen 4/5).  fp32 layouts measured; bf16 not.
- `avx512`: AVX-512 without bf16.  fp32 layouts as measured on the AMX machine (AMX does not touch fp32).
- `avx2`: x86-64 whose best PyTorch kernels are AVX2.  Measured earlier: fp32 with NNPACK Winograd.
- `arm`, `other`: not measured; PyTorch's own kernels in fp32 (ARM's bf16/fp16 flags are reported, not used).

The choice (`kernels_for`) is per network part — `gan` (feed-forward SR nets), `unet` (diffusion UNets),
`vae`, `estimator` (S3Diff's degradation estimator), `tagger` (RAM), `other` (anything not yet measured) — and
per precision: which dtype the part's weights and activations use, whether its feature maps are channels-last,
and which convolution kernels it runs (oneDNN, NNPACK Winograd for large 3×3 convs, four 2×2 convs for each
nearest-×2 upsample + 3×3 conv of a diffusers model).  Only what was measured faster *and* kept the quality gates
is switched on; everything else runs as PyTorch would.

bf16 on the CPU is a per-part weight dtype, not autocast: a part chosen for bf16 holds bf16 weights and gets
bf16 inputs; a part kept in fp32 (the estimator, the tagger, any part not measured) holds fp32 weights and
really computes in fp32, next to bf16 parts.  Measured on the AMX machine, bf16 weights give the same outputs as
fp32 weights under CPU autocast (which keeps no op in fp32 that matters here: norms and softmax run in bf16
either way) and are faster (no per-call weight cast).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from srkit.common import check_choice

PARTS = ("gan", "unet", "vae", "estimator", "tagger", "prompt", "other")
KINDS = ("amx-bf16", "avx512-bf16", "avx512", "avx2", "arm", "other")
WINOGRAD_SWITCH = "SRKIT_CPU_WINOGRAD"
"""0: never NNPACK (oneDNN everywhere, e.g. for bit-for-bit comparisons); 1: wherever NNPACK exists."""
_ONEDNN_ISA_ORDER = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI", "AVX512_CORE_BF16",
    "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
)  # fmt: skip
"""oneDNN's `ONEDNN_MAX_CPU_ISA` values, lowest first (a limit below AVX512_CORE_BF16 leaves bf16 emulated)."""


# ---------------------------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU computes natively, as PyTorch and oneDNN will use it."""

    machine: str
    """platform.machine(): x86_64, aarch64, ..."""
    name: str
    capability: str
    """PyTorch's vectorised-kernel level: DEFAULT, AVX2, AVX512, SVE256, ..."""
    flags: frozenset[str] = field(default_factory=frozenset)
    """The flags that matter here: avx2, fma, avx512f, avx512_bf16, avx512_fp16, amx_bf16 (x86); bf16, fp16 (ARM)."""
    onednn_isa_limit: str | None = None
    nnpack: bool = False

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64")

    @property
    def arm(self) -> bool:
        return self.machine.lower() in ("aarch64", "arm64")

    def _onednn_allows(self, lowest: str) -> bool:
        limit = (self.onednn_isa_limit or "ALL").upper()
        if limit not in _ONEDNN_ISA_ORDER:
            return True  # an unknown value: oneDNN ignores it
        return _ONEDNN_ISA_ORDER.index(limit) >= _ONEDNN_ISA_ORDER.index(lowest)

    @property
    def amx_bf16(self) -> bool:
        return self.x86 and "amx_bf16" in self.flags and self._onednn_allows("AVX512_CORE_AMX")

    @property
    def avx512_bf16(self) -> bool:
        return self.x86 and "avx512_bf16" in self.flags and self._onednn_allows("AVX512_CORE_BF16")

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 convolutions and matmuls run on bf16 hardware here (not emulated through fp32)."""
        return self.amx_bf16 or self.avx512_bf16 or (self.arm and "bf16" in self.flags)

    @property
    def kind(self) -> str:
        """One of KINDS: the row of `MEASURED` this CPU gets."""
        if self.x86:
            if self.amx_bf16 and self.avx512_bf16:
                return "amx-bf16"
            if self.avx512_bf16:
                return "avx512-bf16"
            if self.capability == "AVX512":
                return "avx512"
            if self.capability == "AVX2":
                return "avx2"
            return "other"
        return "arm" if self.arm else "other"

    def summary(self) -> dict[str, object]:
        """For reports: name, kind, PyTorch's level, flags, native bf16, NNPACK, threads."""
        return {
            "name": self.name,
            "machine": self.machine,
            "kind": self.kind,
            "pytorch_capability": self.capability,
            "flags": sorted(self.flags),
            "native_bf16": self.native_bf16,
            "onednn_isa_limit": self.onednn_isa_limit,
            "nnpack": self.nnpack,
            "threads": torch.get_num_threads(),
        }


_X86_FLAGS = {  # srkit's name -> torch.cpu.get_capabilities() key
    "avx2": "avx2", "fma": "fma3", "avx512f": "avx512_f", "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16", "amx_bf16": "amx_bf16",
}  # fmt: skip
_ARM_FLAGS = {"bf16": "bf16", "fphp": "fp16"}
"""/proc/cpuinfo `Features` word -> srkit's name (fphp: half-precision arithmetic)."""


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, words of the flags/Features line) of the first CPU in /proc/cpuinfo; empty off Linux."""
    name, words = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return name, words
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not words:
            words = set(value.split())
    return name, words


@functools.cache
def detect() -> CpuFeatures:
    """This machine's CpuFeatures (read once per process)."""
    name, words = _cpuinfo()
    machine = platform.machine()
    flags: set[str] = set()
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    capabilities = dict(get_capabilities()) if get_capabilities is not None else {}
    for ours, theirs in _X86_FLAGS.items():
        if capabilities.get(theirs) or ours in words:
            flags.add(ours)
    if machine.lower() in ("aarch64", "arm64"):
        flags.update(ours for word, ours in _ARM_FLAGS.items() if word in words or capabilities.get(word))
    else:
        flags &= set(_X86_FLAGS)
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return CpuFeatures(
        machine=machine,
        name=name or str(capabilities.get("cpu_name", "")) or platform.processor() or machine,
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=frozenset(flags),
        onednn_isa_limit=limit,
        nnpack=bool(torch.backends.nnpack.is_available()),
    )


# ---------------------------------------------------------------------------------------------------------------
# The choice


@dataclass(frozen=True)
class Layout:
    """CPU kernels of one part at one precision (what `Kernels` adds to a dtype)."""

    channels_last: bool = False
    winograd: bool = False
    """NNPACK Winograd for 3×3 convs on large maps (fp32 only; srkit/nn/winograd_conv.py)."""
    phase_upsampling: bool = False
    """Four 2×2 convs for each diffusers nearest-×2 upsample + 3×3 conv (srkit/nn/upsample_conv.py)."""
    fp32_ends: bool = False
    """bf16 only: the first convolution reads fp32 input, the last writes fp32 output (srkit/nn/fp32_ends.py)."""


@dataclass(frozen=True)
class Kernels:
    """How one network part runs: the dtype of its weights and activations, and its kernels."""

    dtype: torch.dtype
    layout: Layout = Layout()
    device: str = "cpu"

    @property
    def channels_last(self) -> bool:
        return self.layout.channels_last

    @property
    def winograd(self) -> bool:
        return self.layout.winograd

    @property
    def phase_upsampling(self) -> bool:
        return self.layout.phase_upsampling

    def describe(self) -> str:
        """E.g. "bf16, channels-last, oneDNN" or "fp32, NNPACK Winograd (large 3x3) + oneDNN, 2x2-phase upsampling"."""
        parts = [dtype_name(self.dtype)]
        if self.device != "cpu":
            return f"{parts[0]} ({self.device}, PyTorch's kernels)"
        if self.channels_last:
            parts.append("channels-last")
        if self.layout.fp32_ends and self.dtype != torch.float32:
            parts.append("fp32 first/last conv")
        parts.append("NNPACK Winograd (large 3x3) + oneDNN" if self.winograd else "oneDNN")
        if self.phase_upsampling:
            parts.append("2x2-phase upsampling")
        return ", ".join(parts)


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16: the names `--dtype` takes."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


_PLAIN = Layout()
_PHASE = Layout(phase_upsampling=True)
_AVX2 = Layout(winograd=True, phase_upsampling=True)
_AVX512_FP32 = {"gan": Layout(channels_last=True), "unet": _PHASE, "vae": _PHASE, "other": _PHASE}
MEASURED: dict[str, dict[str, dict[str, Layout]]] = {
    # part -> precision -> layout; a part without a "bf16" entry stays fp32 on that kind; a part absent: _DEFAULT.
    "avx2": {"gan": {"fp32": _PLAIN}, **{p: {"fp32": _AVX2} for p in ("unet", "vae", "other")}},
    "avx512": {p: {"fp32": layout} for p, layout in _AVX512_FP32.items()},
    "avx512-bf16": {p: {"fp32": layout} for p, layout in _AVX512_FP32.items()},
    "amx-bf16": {
        "gan": {"fp32": Layout(channels_last=True), "bf16": Layout(channels_last=True, fp32_ends=True)},
        "unet": {"fp32": _PHASE, "bf16": _PLAIN},
        "vae": {"fp32": _PHASE, "bf16": Layout(channels_last=True, phase_upsampling=True)},
        "other": {"fp32": _PHASE},
    },
}
"""What bench_cpu_dtype.py measured fastest per kind of CPU (numbers in its docstring and in README.md)."""
_DEFAULT = {"gan": _PLAIN, "estimator": _PLAIN, "tagger": _PLAIN, "prompt": _PLAIN, "unet": _PHASE, "vae": _PHASE,
            "other": _PHASE}  # fmt: skip
"""Unmeasured kinds: PyTorch's kernels in fp32, plus the phase upsampling of diffusers models (it only removes
FLOPs; srkit's default on every CPU before this table)."""
BF16_PARTS = frozenset({"gan", "unet", "vae"})
"""Parts that keep their quality gates in bf16 on the CPU (RealSR row of the embedded default; golden one-step
outputs).  A text tower that embeds a prompt once per image ("prompt": ConsisSR's CLIP) stays fp32 on the CPU."""
ALWAYS_FP32 = frozenset({"estimator", "tagger"})
"""fp32 on every device: S3Diff's degradation estimator, whose two scores set every DG-LoRA modulation (and which
costs ~1% of an S3Diff run), and the RAM/DAPE tagger, whose tags are thresholded decisions (one encoder pass per
image; srkit.taggers builds it in fp32 without autocast)."""


def _winograd_switch() -> bool | None:
    """SRKIT_CPU_WINOGRAD: False (0), True (1), None (unset or auto: the measured choice)."""
    setting = os.environ.get(WINOGRAD_SWITCH, "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return None


def winograd_wanted(cpu: CpuFeatures | None = None) -> bool:
    """Whether srkit may use NNPACK Winograd at all: SRKIT_CPU_WINOGRAD=0 never, =1 wherever NNPACK exists, unset
    on the kinds of CPU where it was measured faster (AVX2: AVX-512 doubles oneDNN's throughput but not NNPACK's,
    whose kernels are AVX2; ARM was not measured)."""
    switch = _winograd_switch()
    return (cpu or detect()).kind == "avx2" if switch is None else switch


def cpu_auto_dtype(cpu: CpuFeatures | None = None) -> torch.dtype:
    """`--dtype auto` on the CPU: bf16 where some part was measured faster in bf16 on this kind, else fp32."""
    table = MEASURED.get((cpu or detect()).kind, {})
    return torch.bfloat16 if any("bf16" in row for row in table.values()) else torch.float32


def cpu_engine_dtype(parts: tuple[str, ...], dtype: torch.dtype, cpu: CpuFeatures | None = None) -> torch.dtype:
    """The dtype of an engine with these parts on the CPU when `dtype` is asked for: bf16 only if some part then
    computes in bf16 (an engine whose parts all stay fp32 is an fp32 engine: nothing casts its inputs down)."""
    cpu = cpu or detect()
    if dtype == torch.bfloat16 and all(kernels_for(p, torch.device("cpu"), dtype, cpu).dtype != dtype for p in parts):
        return torch.float32
    return dtype


def check_cpu_dtype(dtype: torch.dtype, cpu: CpuFeatures | None = None) -> None:
    """Refuse, in one line, a precision this CPU cannot run well: fp16 anywhere, bf16 without native bf16."""
    cpu = cpu or detect()
    if dtype == torch.float16:
        raise ValueError("--dtype fp16 is for CUDA; on the CPU use auto, fp32 or bf16 (where the CPU has bf16)")
    if dtype == torch.bfloat16 and not cpu.native_bf16:
        raise ValueError(
            f"--dtype bf16 needs a CPU with native bf16 (AMX or AVX512-BF16; this one is '{cpu.kind}'); use fp32"
        )


def kernels_for(part: str, device: torch.device, dtype: torch.dtype, cpu: CpuFeatures | None = None) -> Kernels:
    """How network `part` (one of PARTS) runs on `device` when its engine runs in `dtype`.

    ALWAYS_FP32 parts: fp32 on every device.  CUDA: `dtype` and PyTorch's own kernels.  CPU: an fp32 engine runs
    every part in fp32; a bf16 engine (`--dtype auto` where bf16 was measured, or `--dtype bf16`) runs a part in
    bf16 when it is in BF16_PARTS and this kind of CPU has a measured bf16 layout for it (where bf16 was never
    measured, `--dtype bf16` gets PyTorch's kernels), in fp32 otherwise.  Layouts are the measured ones."""
    check_choice(part, PARTS, "network part")
    if part in ALWAYS_FP32:
        dtype = torch.float32
    if device.type != "cpu":
        return Kernels(dtype, device=device.type)
    cpu = cpu or detect()
    table = MEASURED.get(cpu.kind, {}).get(part, {})
    if dtype == torch.bfloat16 and part in BF16_PARTS and cpu.native_bf16:
        if "bf16" in table:
            return Kernels(torch.bfloat16, table["bf16"])
        if cpu_auto_dtype(cpu) == torch.float32:  # `--dtype bf16` where bf16 was never measured: PyTorch's kernels
            return Kernels(torch.bfloat16, _PLAIN)
    layout = table.get("fp32", _DEFAULT[part])
    switch = _winograd_switch()
    return Kernels(torch.float32, layout if switch is None else replace(layout, winograd=switch))


__all__ = [
    "ALWAYS_FP32",
    "BF16_PARTS",
    "KINDS",
    "MEASURED",
    "PARTS",
    "WINOGRAD_SWITCH",
    "CpuFeatures",
    "Kernels",
    "Layout",
    "check_cpu_dtype",
    "cpu_auto_dtype",
    "cpu_engine_dtype",
    "detect",
    "dtype_name",
    "kernels_for",
    "winograd_wanted",
]
