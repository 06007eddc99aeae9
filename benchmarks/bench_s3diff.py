"""S3Diff: srkit's engine against a plain reference path, same weights, same input, same seed, one run.

The reference path is the official inference's structure on srkit's own modules: both prompts re-encoded by the
text encoder for every image, two separate UNet passes for classifier-free guidance, peft-style unmerged LoRA
(A, C-mix, B on every feature map), and the x0 step through `DDPMScheduler.step`.  srkit's path embeds the
prompts once when the engine is built, batches the two guidance passes into one UNet call, merges the
per-image LoRA into each layer's weight and picks its CPU kernels: each nearest-upsample + 3×3 conv of the UNet
and the VAE decoder runs as four 2×2 convolutions on the low-resolution map (`srkit/nn/upsample_conv.py`) and 3×3
convolutions on large maps go through NNPACK's Winograd kernels (`srkit/nn/winograd_conv.py`; run with
SRKIT_CPU_WINOGRAD=0 to see srkit without them).  The reference runs diffusers' layers with PyTorch's default
kernels.  Everything else (estimator, colour fix) is shared code.

Reported per path: median seconds per image over interleaved repeats (so background load hits both alike), the
peak resident-memory increase during a call (sampled every 10 ms), and max |srkit − reference| of the float
outputs; for srkit also the memory its merged-weight cache holds between calls (allocated on the first image,
reused afterwards; `lora_merge=false` trades it for the unmerged branch).  Target on CPU: ≥ 1.3× faster, outputs within 1e-4.

Weights: the real SD-Turbo + s3diff.pkl + de_net.pth when `--real` finds them in the srkit cache; otherwise
random weights with SD-Turbo's architecture (SD 2.1 UNet, SD VAE, OpenCLIP-H text tower, r32/r16 DG-LoRA) —
time and memory depend on the shapes, not on the values.

Run:  .venv/bin/python benchmarks/bench_s3diff.py [--size 128] [--repeats 2] [--real] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bench_common
import torch
import torch.nn.functional as F

from srkit.colorfix import color_fix
from srkit.cpu_memory import keep_freed_memory
from srkit.diffusion.latents import crop_to, pad_to_multiple, vae_decode, vae_encode
from srkit.diffusion.schedule import SD_TURBO_SCHEDULER, NoiseSchedule
from srkit.diffusion.text import TextEncoder, prompt_embeddings
from srkit.engines.s3diff import (
    NEGATIVE_PROMPT,
    POSITIVE_PROMPT,
    SCALE,
    TIMESTEP,
    S3DiffEngine,
    S3DiffNetworks,
    S3DiffOptions,
    attach_dg_lora,
    load_networks,
)
from srkit.nn.de_net import DegradationEstimator
from srkit.nn.upsample_conv import use_phase_upsampling
from srkit.nn.winograd_conv import use_winograd_convolutions

# ---------------------------------------------------------------------------------------------------------------
# Networks: real weights from the cache, or random ones with SD-Turbo's shapes


def random_sd_turbo(workdir: Path) -> tuple[S3DiffNetworks, TextEncoder]:
    """SD-Turbo-shaped UNet/VAE/CLIP with random weights, S3Diff's DG-LoRA (r32 UNet, r16 VAE) attached."""
    from transformers import CLIPTokenizer

    unet, vae, text = bench_common.sd2_unet(), bench_common.sd_vae(), bench_common.sd2_text_encoder()
    guidance, unet_mod, vae_mod = attach_dg_lora(unet, vae, rank_unet=32, rank_vae=16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in [*unet.modules(), *vae.modules()]:
            if hasattr(module, "lora_B"):
                up = module.up.weight
                up.copy_(torch.randn(up.shape, generator=gen) * 0.01)
    networks = S3DiffNetworks(
        unet.requires_grad_(False),
        vae.requires_grad_(False),
        guidance.eval().requires_grad_(False),
        DegradationEstimator().eval().requires_grad_(False),
        NoiseSchedule.from_config(SD_TURBO_SCHEDULER),
        unet_mod,
        vae_mod,
        [],
        "",
    )
    return networks, TextEncoder(_character_tokenizer(workdir, CLIPTokenizer), text)


def _character_tokenizer(workdir: Path, tokenizer_class):
    """A CLIP tokenizer over single characters (no merges): real BPE files need the hub; the encoder's cost
    does not depend on them (prompts are always padded to 77 tokens)."""
    symbols = list(string.printable.strip())
    vocab = {s: i for i, s in enumerate(symbols)} | {
        s + "</w>": len(symbols) + i for i, s in enumerate(symbols)
    }
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    return tokenizer_class(
        str(workdir / "vocab.json"), str(workdir / "merges.txt"), pad_token="<|endoftext|>"
    )


def real_sd_turbo() -> tuple[S3DiffNetworks, TextEncoder]:
    from srkit import registry

    base = registry.resolve("sd-turbo", offline=True)
    networks = load_networks(
        base, registry.resolve("s3diff", offline=True), registry.resolve("s3diff-de-net", offline=True)
    )
    return networks, TextEncoder.from_folder(base)


# ---------------------------------------------------------------------------------------------------------------
# The reference path (official structure)


def reference_upscale(
    networks: S3DiffNetworks,
    text: TextEncoder,
    lr: torch.Tensor,
    generator: torch.Generator,
    options: S3DiffOptions,
) -> torch.Tensor:
    """The official procedure as written upstream: per-image text encoding, two UNet passes, unmerged LoRA."""
    from diffusers import DDPMScheduler

    networks.unet_modulation.merge = networks.vae_modulation.merge = False  # keeps srkit's merged buffers
    for network in (networks.unet, networks.vae):
        use_phase_upsampling(network, False)
        use_winograd_convolutions(network, False)
    try:
        with torch.inference_mode():
            pos, neg = text(options.prompt), text(options.negative_prompt)
            networks.set_degradation(networks.estimator(lr))
            upsampled = F.interpolate(lr, size=(lr.shape[2] * SCALE, lr.shape[3] * SCALE), mode="bilinear")
            image, size = pad_to_multiple((upsampled * 2 - 1).clamp(-1, 1), 64)
            z = vae_encode(networks.vae, image, latent=options.latent, generator=generator)
            t = torch.tensor([TIMESTEP])
            eps_pos = networks.unet(z, t, encoder_hidden_states=pos).sample
            eps_neg = networks.unet(z, t, encoder_hidden_states=neg).sample
            eps = eps_neg + options.guidance * (eps_pos - eps_neg)
            scheduler = DDPMScheduler.from_config(SD_TURBO_SCHEDULER)
            scheduler.set_timesteps(1)
            x0 = scheduler.step(eps, TIMESTEP, z, generator=generator).prev_sample
            sr = crop_to(vae_decode(networks.vae, x0).clamp(-1, 1), size)
            return color_fix(
                sr * 0.5 + 0.5, upsampled, options.color_fix, official_8bit=options.official_8bit
            )
    finally:
        networks.unet_modulation.merge = networks.vae_modulation.merge = True
        for network in (networks.unet, networks.vae):
            use_phase_upsampling(network, True)
            use_winograd_convolutions(network, True)


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, int]:
    """(output, seconds, peak RSS increase in bytes) of one call."""
    baseline, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return out, seconds, max(peak[0], rss_bytes()) - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size", type=int, default=128, help="LR side; the output is 4x (default 128 -> 512)."
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path, interleaved")
    parser.add_argument(
        "--real", action="store_true", help="use the cached real weights (srkit weights pull s3diff)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--allocator",
        choices=("srkit", "default"),
        default="srkit",
        help="srkit: keep freed memory in the heap as `srkit upscale` does on the CPU (srkit/cpu_memory.py); "
        "default: glibc's mmap/unmap of large blocks. Process-wide, so both paths run under the same one.",
    )
    args = parser.parse_args()
    if args.allocator == "srkit":
        keep_freed_memory()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        networks, text = real_sd_turbo() if args.real else random_sd_turbo(Path(tmp))
        build_seconds = time.perf_counter() - started
        options = S3DiffOptions(color_fix="wavelet", official_8bit=False)
        started = time.perf_counter()
        embeddings = prompt_embeddings({"pos": POSITIVE_PROMPT, "neg": NEGATIVE_PROMPT}, encoder=text)
        engine = S3DiffEngine(networks, embeddings, torch.device("cpu"), torch.float32, options)
        embed_seconds = time.perf_counter() - started
        lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

        def srkit_call(image: torch.Tensor) -> torch.Tensor:
            return engine.upscale(image, generator=torch.Generator().manual_seed(0))

        def reference_call(image: torch.Tensor) -> torch.Tensor:
            return reference_upscale(networks, text, image, torch.Generator().manual_seed(0), options)

        warm = lr[:, :, :32, :32]
        srkit_call(warm), reference_call(warm)
        runs: dict[str, list[tuple[float, int]]] = {"reference": [], "srkit": []}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, call in (("reference", reference_call), ("srkit", srkit_call)):
                outputs[name], seconds, peak = measure(lambda c=call: c(lr))
                runs[name].append((seconds, peak))
                print(f"{name:9s} {seconds:8.2f} s  peak +{peak / 2**20:8.0f} MiB", flush=True)

    seconds = {name: statistics.median(s for s, _ in values) for name, values in runs.items()}
    peaks = {name: max(p for _, p in values) for name, values in runs.items()}
    diff = (outputs["srkit"] - outputs["reference"]).abs().max().item()
    unsaturated = ((outputs["srkit"] > 0) & (outputs["srkit"] < 1)).float().mean().item()
    result = {
        "weights": "sd-turbo + s3diff (cached)" if args.real else "random, SD-Turbo architecture",
        "output": f"{args.size * SCALE}x{args.size * SCALE}",
        "device": "cpu",
        "allocator": args.allocator,
        "threads": torch.get_num_threads(),
        "seconds_per_image": seconds,
        "speed_ratio": seconds["reference"] / seconds["srkit"],
        "peak_rss_increase_mib": (
            {k: round(v / 2**20) for k, v in peaks.items()}
            if args.allocator == "default"
            else "not measurable: freed memory stays in the heap (run with --allocator default)"
        ),
        "max_abs_output_diff": diff,
        "output_unsaturated_fraction": unsaturated,
        "srkit_merged_weight_cache_mib": round(networks.merged_cache_bytes() / 2**20),
        "build_seconds": round(build_seconds, 1),
        "srkit_prompt_embedding_seconds_once": round(embed_seconds, 2),
    }
    bench_common.report(result, args.json)


if __name__ == "__main__":
    main()
