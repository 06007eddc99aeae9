"""SeeSR: srkit's engine against the official pipeline's structure, same random weights, same draws, one run.

The official structure (`test_seesr.py` + `pipelines/pipeline_seesr.py`) on srkit's networks: RAM runs twice per
image (`inference` for the tags, `generate_image_embeds` for the tokens), the VAE encodes the CFG-doubled batch,
and every step embeds the control image again inside the ControlNet for the [uncond, cond] batch.  srkit runs RAM
once (tags and tokens from one pass), encodes once, embeds the control image once for all steps, and picks its CPU
kernels (phase upsampling; NNPACK Winograd where measured faster); the reference runs PyTorch's defaults.  Text
encoding, sampler maths, decode and colour fix are the same code.

Weights: random, with SeeSR's shapes (SD2 UNet with image cross-attention, its ControlNet, SD VAE, OpenCLIP-H text
tower, RAM Swin-L); time and memory depend on the shapes.  Zero-initialised ControlNet convs get small values.

Run:  .venv/bin/python benchmarks/bench_seesr.py [--size 128] [--steps 5] [--json out.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import bench_common
import torch
from diffusers import ControlNetModel

from srkit.bench.runner import measure
from srkit.colorfix import color_fix
from srkit.diffusion.latents import vae_decode, vae_encode
from srkit.diffusion.schedule import NoiseSchedule
from srkit.engines.prompting import TagPrompter
from srkit.engines.seesr import START_TIMESTEP, SeeSREngine, SeeSROptions, prepare_batch
from srkit.nn.image_cross_attention import add_image_cross_attention
from srkit.nn.seesr import SeeSRNets
from srkit.taggers.ram import RAM, RAM_Q2L, RAM_SWIN_L_384, RAMTagger

CPU = torch.device("cpu")
SD2_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                 "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1, "_class_name": "DDPMScheduler"}  # fmt: skip


def random_seesr(folder: Path):
    """SeeSR's networks, an SD2-shaped base folder (VAE, scheduler) and a RAM Swin-L tagger, random weights."""
    unet = bench_common.sd2_unet()
    controlnet = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.any():
                param.normal_(0, 1e-3)
    nets = SeeSRNets(add_image_cross_attention(unet).eval(), add_image_cross_attention(controlnet).eval())
    nets.unet.requires_grad_(False), nets.controlnet.requires_grad_(False)
    vae = bench_common.sd_vae()
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_SCHEDULER))
    text = bench_common.sd2_text_encoder()
    ram = RAM(4585, RAM_SWIN_L_384, RAM_Q2L).eval().requires_grad_(False)
    tagger = RAMTagger(ram, [f"tag{i}" for i in range(4585)], torch.full((4585,), 0.5))
    return nets, vae, text, tagger


def main() -> None:
    parser = bench_common.start(__doc__)
    parser.add_argument("--size", type=int, default=128, help="LR side (128 -> a 512² control image)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = bench_common.machine()
    folder = Path("/tmp/srkit-bench-seesr")
    nets, vae, text_model, tagger = random_seesr(folder)
    tokens = torch.arange(77)[None] % 1000
    with torch.inference_mode():
        text, negative = text_model(tokens)[0], text_model(tokens + 1)[0]  # stand-ins for both prompts' embeddings
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    control = prepare_batch(lr)
    shape = (1, 4, control.shape[-2] // 8, control.shape[-1] // 8)
    gen = torch.Generator().manual_seed(1)
    start, posterior = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    noises = [torch.randn(shape, generator=gen) for _ in range(args.steps)]
    options = SeeSROptions(steps=args.steps, official_8bit=False)
    schedule = NoiseSchedule.from_config(SD2_SCHEDULER)

    def official() -> torch.Tensor:
        from srkit.engines.seesr import ddpm_sampler

        sampler = ddpm_sampler(folder, args.steps)
        with torch.inference_mode():
            tagger.tags(lr)  # RAM twice: `inference` for the tags, `generate_image_embeds` for the tokens
            ram = tagger.image_embeds(lr)
            z = vae_encode(vae, torch.cat([control, control]) * 2 - 1, noise=torch.cat([posterior, posterior]))[:1]
            x = schedule.add_noise(z, start, START_TIMESTEP)
            for index, t in enumerate(sampler.timesteps):
                eps_u, eps_c = nets.eps(torch.cat([x, x]), t, torch.cat([negative, text]), torch.cat([ram, ram]),
                                        torch.cat([control, control])).chunk(2)  # fmt: skip
                x = sampler.step(index, x, eps_u + 5.5 * (eps_c - eps_u), noises[index])
            return color_fix((vae_decode(vae, x) + 1) / 2, control, "adain")

    with measure(CPU) as stats:
        reference = official()
    results["official structure"] = {"seconds": round(stats["seconds"], 2), "peak_rss_mib": round(stats["peak_rss_sampled_mib"])}
    engine = SeeSREngine(nets, vae, folder, TagPrompter("", fixed=text), tagger, negative, CPU, torch.float32, options)
    with measure(CPU) as stats:
        with torch.inference_mode():
            _, ram, _ = tagger.tags_embeds_logits(lr)
        latent = engine.generate(control, text, ram, draw=lambda index, like: noises[index], start_noise=start,
                                 posterior_noise=posterior)  # fmt: skip
        with torch.inference_mode():
            ours = color_fix((vae_decode(vae, latent) + 1) / 2, control, "adain")
    results["srkit"] = {"seconds": round(stats["seconds"], 2), "peak_rss_mib": round(stats["peak_rss_sampled_mib"])}
    results["speed_ratio"] = round(results["official structure"]["seconds"] / results["srkit"]["seconds"], 3)
    results["max_abs_output_diff"] = (ours - reference).abs().max().item()
    bench_common.report(results, args.json)


if __name__ == "__main__":
    main()
