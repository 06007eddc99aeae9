"""ConsisSR: srkit's engine against the official inference's structure, same random weights, same draws, one run.

The official structure (`model/spaced_sampler.py` + `ControlLDM.apply_model`), on srkit's own networks: for every
sampler step, the conditional and the unconditional pass run separately, and each pass encodes its prompt with the
text tower, the hint with the VAE-encoder copy and the image token with the ViT-H image tower again (the official
`get_learned_conditioning` / `apply_condition_encoder` run inside every `apply_model` call).  srkit's path embeds the
text once per engine and the hint, its ControlNet embedding and the image token once per image, batches both
guidance passes into one network call, and picks its CPU kernels (four 2×2 convolutions for each upsample + 3×3
conv; NNPACK Winograd where measured faster, `srkit/nn/winograd_conv.py`); the reference runs PyTorch's defaults.
Sampler maths, decode and colour fix are the same code.

Weights: random, with the released model's shapes (SD2.1-base UNet and ControlNet with HPA, SD VAE and its encoder
copy, OpenCLIP ViT-H-14; ~2.3 G parameters, ~9 GB in fp32); time and memory depend on the shapes, not on the values.
Zero-initialised layers (zero convs, `to_out_ip`, the image-token MLP's last layer) get small random values, so
every branch contributes to the output that is compared.

Also: `--start gan` (10 steps of the truncated schedule from the embedded Real-ESRGAN x4plus output) against a full
`--full-steps` run of the normal start, end to end through the engine in `--dtype auto` (the wall-time ratio the
paper's fast start buys).  Peak RSS (sampled) of every run.  Where `--dtype auto` is not fp32 on this CPU (bf16 on
AMX, `srkit info`), the 5-step comparison also times srkit in that dtype against the same fp32 reference.

Run:  .venv/bin/python benchmarks/bench_consissr.py [--size 128] [--steps 5] [--full-steps 50] [--json out.json]
"""

from __future__ import annotations

from pathlib import Path

import bench_common
import torch

from srkit import registry
from srkit.api import resolve_dtype
from srkit.bench.runner import measure
from srkit.colorfix import color_fix
from srkit.cpu_features import dtype_name
from srkit.diffusion.samplers.ancestral import AncestralSampler, respaced_timesteps
from srkit.engines.base import WeightsSet, get_engine
from srkit.engines.consissr import ConsisSREngine, ConsisSROptions, pad_zeros, prepare_batch
from srkit.nn.consissr import ConsisSRNets

CPU = torch.device("cpu")


def random_nets() -> ConsisSRNets:
    """The released architecture with random weights; all-zero initial tensors get small random values."""
    torch.manual_seed(0)
    nets = ConsisSRNets().eval().requires_grad_(False)
    with torch.no_grad():
        for param in nets.parameters():
            if not param.any():
                param.normal_(0, 1e-3)
    return nets


def official_structure(nets: ConsisSRNets, options: ConsisSROptions, control: torch.Tensor, x: torch.Tensor,
                       noises: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """The official loop: per step two separate passes, each re-encoding prompt, hint and image token."""
    sampler = AncestralSampler.build(respaced_timesteps(options.sampler_steps), nets.schedule.alphas_cumprod())

    def one_pass(latent: torch.Tensor, t: int, prompt: str) -> torch.Tensor:
        text = nets.encode_text([prompt])
        context = nets.context(nets.image_token(control), text)
        return nets.eps(latent, t, context, nets.embed_hint(nets.hint(control)))

    with torch.inference_mode():
        for index, t in enumerate(sampler.timesteps):
            eps_cond = one_pass(x, t, options.prompt)
            eps_uncond = one_pass(x, t, options.negative_prompt)
            eps = eps_uncond + options.guidance_scale * (eps_cond - eps_uncond)
            x = sampler.step(index, x, eps, noises[index])
        return finish(nets, x, control)


def finish(nets: ConsisSRNets, latent: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        decoded = nets.decode(latent)
    return color_fix((decoded + 1) / 2, (control + 1) / 2, "adain")


def timed(label: str, call, results: dict) -> torch.Tensor:
    with measure(CPU) as stats:
        out = call()
    results[label] = {"seconds": round(stats["seconds"], 2), "peak_rss_mib": round(stats["peak_rss_sampled_mib"] or 0)}
    print(f"{label:28s} {stats['seconds']:8.1f} s  peak RSS {stats['peak_rss_sampled_mib']:8.0f} MiB", flush=True)
    return out


def main() -> None:
    parser = bench_common.start(__doc__)
    parser.add_argument("--size", type=int, default=128, help="LR side (128 -> the trained 512² size)")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps of the srkit-vs-official comparison")
    parser.add_argument("--full-steps", type=int, default=50, help="steps of the normal start vs --start gan (0: skip)")
    parser.add_argument("--gan-steps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = bench_common.machine()

    nets = timed("build random weights", random_nets, results)
    options = ConsisSROptions(steps=args.steps, official_8bit=False)
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    control = pad_zeros(prepare_batch(lr)) * 2 - 1
    latent_shape = (1, 4, control.shape[-2] // 8, control.shape[-1] // 8)
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(latent_shape, generator=gen)
    noises = [torch.randn(latent_shape, generator=gen) for _ in range(args.steps)]

    reference = timed(f"official structure, {args.steps} steps", lambda: official_structure(nets, options, control, x_T, noises), results)
    engine = ConsisSREngine(nets, CPU, torch.float32, options)  # picks srkit's CPU kernels (in place)

    def srkit_run() -> torch.Tensor:
        latent = engine.generate(control, draw=lambda index, like: noises[index], start_noise=x_T)
        return finish(nets, latent, control)

    ours = timed(f"srkit, {args.steps} steps", srkit_run, results)
    reference_seconds = results[f"official structure, {args.steps} steps"]["seconds"]
    results["speed_ratio"] = round(reference_seconds / results[f"srkit, {args.steps} steps"]["seconds"], 3)
    results["max_abs_output_diff"] = (ours - reference).abs().max().item()
    print(f"speed ratio {results['speed_ratio']}x, max |srkit - official| {results['max_abs_output_diff']:.2e}")
    auto = resolve_dtype("auto", CPU, ConsisSREngine.spec)
    if auto != torch.float32:  # casts the shared networks in place: after every fp32 run of the comparison
        engine = ConsisSREngine(nets, CPU, auto, options)
        label = f"srkit --dtype auto ({dtype_name(auto)}), {args.steps} steps"
        ours_auto = timed(label, srkit_run, results)
        results["speed_ratio_auto"] = round(reference_seconds / results[label]["seconds"], 3)
        results["max_abs_output_diff_auto"] = (ours_auto - reference).abs().max().item()
        print(f"--dtype auto: speed ratio {results['speed_ratio_auto']}x, max |srkit - official| "
              f"{results['max_abs_output_diff_auto']:.2e}")  # fmt: skip

    if args.full_steps:
        gan_class, gan_spec = get_engine("realesrgan-x4plus")
        gan = gan_class.from_weights(WeightsSet({gan_spec.name: registry.resolve(gan_spec.name)}), CPU,
                                     torch.float32, gan_class.options_class())  # fmt: skip
        full = ConsisSREngine(nets, CPU, auto, ConsisSROptions(steps=args.full_steps))
        fast = ConsisSREngine(nets, CPU, auto, ConsisSROptions(start="gan", steps=args.gan_steps), gan)
        lr_image = (lr * 255).round() / 255
        timed(f"srkit start gan, {args.gan_steps} steps", lambda: fast.upscale(lr_image, generator=torch.Generator().manual_seed(0)), results)
        timed(f"srkit normal, {args.full_steps} steps", lambda: full.upscale(lr_image, generator=torch.Generator().manual_seed(0)), results)
        results["gan_start_time_ratio"] = round(results[f"srkit normal, {args.full_steps} steps"]["seconds"]
                                                / results[f"srkit start gan, {args.gan_steps} steps"]["seconds"], 2)  # fmt: skip
    bench_common.report(results, args.json)


if __name__ == "__main__":
    main()
