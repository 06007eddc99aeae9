"""Shared Stable Diffusion plumbing for the one-step SR engines (S3Diff, OSEDiff, NAOSD/GDPO-SR, GenDR).

Every one-step diffusion SR method does the same things around its own networks: load a UNet/VAE/scheduler (and
maybe a text encoder) from a diffusers folder, embed fixed prompts, encode an image to a latent, run the UNet at
one timestep, turn ε into x0, decode.  They live here once so that the engines only state what is particular to
their paper.  Choices made here on purpose:

- Prompt embeddings are computed once, when an engine is built (`prompt_embeddings`), never per image; a
  precomputed `.safetensors` file can stand in for the text encoder (tests, or machines without it).
- x0 is computed directly in float32 from the scheduler's ᾱ table (`NoiseSchedule.predict_x0`), not through
  `DDPMScheduler.step`, whose behaviour at t=999 depends on the diffusers version and the timestep spacing.
- Mixed precision is torch.autocast on CUDA only; `fp32_region()` marks the numerically sensitive parts.
  CPU runs never enter a CUDA-only branch (xformers, half precision, compile modes for CUDA).

This module must not import engines; engines import it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from srkit.nn.tiled_vae import VAETiling, tiled_decode, tiled_encode
from srkit.registry import WeightsError

LatentMode = Literal["sample", "mode"]
AttentionBackend = Literal["sdpa", "xformers"]


SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}
"""SD-Turbo's published `scheduler_config.json` (SD 2.1's DDPM betas): what a model built without the hub
(benchmarks, tests) pairs with its random weights so that ᾱ and the x0 step are the real ones."""


class SDLoadError(WeightsError):
    """A diffusers folder or an embeddings file is missing or incomplete; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Loading a diffusers folder


def _require(folder: Path, subfolder: str, filename: str = "config.json") -> Path:
    path = Path(folder) / subfolder
    if not (path / filename).is_file():
        raise SDLoadError(
            f"{folder} is not a usable diffusers folder ({subfolder}/{filename} is missing); "
            "run `srkit weights pull <base model>` or pass the folder of a complete diffusers model"
        )
    return path


def load_unet(folder: str | Path, subfolder: str = "unet"):
    """The UNet2DConditionModel of a diffusers folder, in float32 on the CPU, eval mode, no gradients."""
    from diffusers import UNet2DConditionModel

    _require(Path(folder), subfolder)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    return unet.eval().requires_grad_(False)


def load_vae(folder: str | Path, subfolder: str = "vae"):
    """The AutoencoderKL of a diffusers folder, in float32 on the CPU, eval mode, no gradients."""
    from diffusers import AutoencoderKL

    _require(Path(folder), subfolder)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    return vae.eval().requires_grad_(False)


def has_text_encoder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()


@dataclass(frozen=True)
class NoiseSchedule:
    """The scheduler facts a one-step model needs: ᾱ per training timestep and what the UNet predicts.

    Built from the folder's scheduler config exactly as `DDPMScheduler` would read it (its defaults fill missing
    keys, e.g. `clip_sample=True`), so that a config asking for clipping is honoured.
    """

    alphas_cumprod: torch.Tensor
    """float32, CPU, one entry per training timestep."""
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_config(cls, config: Mapping) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(dict(config))
        if scheduler.config.thresholding:
            raise SDLoadError("the scheduler config asks for dynamic thresholding, which srkit does not implement")
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32).clone(),
            prediction_type=scheduler.config.prediction_type,
            clip_sample=bool(scheduler.config.clip_sample),
            clip_sample_range=float(scheduler.config.clip_sample_range),
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """ᾱ_t in float32: 0-dim for an int t, (B,) for per-sample timesteps (training draws one t per sample)."""
        steps = torch.as_tensor(t).long().cpu()
        if steps.numel() and not (0 <= int(steps.min()) and int(steps.max()) < self.num_train_timesteps):
            raise ValueError(f"timestep {t} is outside the schedule (0..{self.num_train_timesteps - 1})")
        return self.alphas_cumprod[steps]

    def _alpha_bar_like(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t on `like`'s device, shaped to broadcast over its non-batch axes."""
        a = self.alpha_bar(t).to(like.device)
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def predict_x0(self, sample: torch.Tensor, model_output: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The clean latent predicted at timestep t (an int, or one per sample), in float32 whatever the inputs'
        dtype.

        For ε-prediction x0 = (z − √(1−ᾱ_t)·ε)/√ᾱ_t, which is exactly what one DDPM step from t to "before the
        first step" (ᾱ_prev = 1) returns, minus its 1e-10·noise term.
        """
        with fp32_region(sample.device):
            a = self._alpha_bar_like(t, sample)
            b = 1 - a
            z, out = sample.float(), model_output.float()
            if self.prediction_type == "epsilon":
                x0 = (z - b.sqrt() * out) / a.sqrt()
            elif self.prediction_type == "v_prediction":
                x0 = a.sqrt() * z - b.sqrt() * out
            elif self.prediction_type == "sample":
                x0 = out
            else:
                raise ValueError(f"unknown prediction type '{self.prediction_type}' in the scheduler config")
            if self.clip_sample:
                x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            return x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise in float32 (t an int, or one per sample)."""
        with fp32_region(x0.device):
            a = self._alpha_bar_like(t, x0)
            return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def load_noise_schedule(folder: str | Path, subfolder: str = "scheduler") -> NoiseSchedule:
    """The noise schedule of a diffusers folder (`scheduler/scheduler_config.json`)."""
    path = _require(Path(folder), subfolder, "scheduler_config.json") / "scheduler_config.json"
    return NoiseSchedule.from_config(json.loads(path.read_text()))


# ---------------------------------------------------------------------------------------------------------------
# Prompt embeddings: computed once, or read from a file


class TextEncoder:
    """Tokenizer + CLIP text model of a diffusers folder: prompt -> last hidden state (1, max_length, D).

    Padding to the tokenizer's max length (77) with truncation and no attention mask, as SD pipelines and the
    one-step SR repos do.
    """

    def __init__(self, tokenizer, model) -> None:
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextEncoder:
        from transformers import AutoTokenizer, CLIPTextModel

        _require(Path(folder), "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
        return cls(tokenizer, model.eval().requires_grad_(False))

    @torch.inference_mode()
    def __call__(self, prompt: str) -> torch.Tensor:
        length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        tokens = self.tokenizer(
            [prompt],
            max_length=length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.model.parameters()).device
        return self.model(tokens.to(device))[0].float()


def load_prompt_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """A precomputed embeddings file: safetensors, one (1, L, D) tensor per key (e.g. `pos`, `neg`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SDLoadError(f"prompt embeddings file {path} does not exist")
    return {key: value.float() for key, value in load_file(str(path)).items()}


def save_prompt_embeddings(path: str | Path, embeddings: Mapping[str, torch.Tensor]) -> Path:
    """Write embeddings so that a machine without the text encoder can use them (`load_prompt_embeddings`)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in embeddings.items()}, str(path))
    return Path(path)


def prompt_embeddings(
    prompts: Mapping[str, str],
    *,
    folder: str | Path | None = None,
    precomputed: str | Path | Mapping[str, torch.Tensor] | None = None,
    encoder: TextEncoder | None = None,
) -> dict[str, torch.Tensor]:
    """Embeddings for named prompts ({"pos": "...", "neg": "..."}), computed once at engine build time.

    Sources, in order: `precomputed` (a file or mapping with the same keys; used *instead of* a text encoder),
    then `encoder`, then the text encoder of `folder` (loaded on the CPU in float32, used, and dropped, so an
    engine does not keep ~1.4 GB of CLIP alive for two fixed prompts).  Returns float32 CPU tensors (1, L, D).
    """
    if precomputed is not None:
        table = load_prompt_embeddings(precomputed) if isinstance(precomputed, (str, Path)) else dict(precomputed)
        missing = [key for key in prompts if key not in table]
        if missing:
            raise SDLoadError(
                f"the precomputed prompt embeddings lack {', '.join(missing)} (have: {', '.join(sorted(table))})"
            )
        return {key: table[key].float().cpu() for key in prompts}
    if encoder is None:
        if folder is None or not has_text_encoder(folder):
            raise SDLoadError(
                f"no text encoder in {folder} and no precomputed prompt embeddings; pull the full base model "
                "(`srkit weights pull <base>`) or pass a prompt_embeds .safetensors file"
            )
        encoder = TextEncoder.from_folder(folder)
    cache: dict[str, torch.Tensor] = {}
    for prompt in set(prompts.values()):
        cache[prompt] = encoder(prompt).cpu()
    return {key: cache[prompt] for key, prompt in prompts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Precision, attention, compilation


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """fp16/bf16 autocast on CUDA; a no-op on the CPU and in float32 (CPU runs stay plain fp32)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """Code inside runs in float32 even inside `autocast` (x0 formula, modulation matrices, colour fix)."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


def vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The dtype to run a VAE in: fp16 is upcast to fp32 when the VAE config says it overflows (`force_upcast`)."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def prepare_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a network to its device and dtype (no-op when already there) and pick its CPU computations.

    On the CPU every nearest ×2 upsample + 3×3 conv runs as four 2×2 convolutions on the low-resolution map
    (`srkit/nn/upsample_conv.py`: 2.25× fewer FLOPs, same result up to rounding), and 3×3 convolutions on large
    maps run through NNPACK's Winograd kernels (`srkit/nn/winograd_conv.py`: 2–4× faster per layer, ~1e-5
    relative rounding; on the CPUs where that was measured, see `winograd_wanted`).  On CUDA the original layers
    run (not measured there).
    Deliberately no channels-last on the CPU: measured slower for the SD VAE decoder with oneDNN, and its
    different summation order moves S3Diff outputs by ~5e-3 (x0 amplifies ε errors ~15x).
    """
    first = next(module.parameters())
    if first.device != device or first.dtype != dtype:
        module.to(device=device, dtype=dtype)
    from srkit.nn.upsample_conv import use_phase_upsampling  # imports diffusers: only when a model is built
    from srkit.nn.winograd_conv import use_winograd_convolutions

    use_phase_upsampling(module, enabled=device.type == "cpu")
    use_winograd_convolutions(module, enabled=device.type == "cpu")
    return module


def set_attention(module: torch.nn.Module, backend: AttentionBackend, device: torch.device) -> None:
    """Select the attention kernels of a diffusers model: PyTorch SDPA (default) or xformers (CUDA, opt-in)."""
    if backend == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        module.set_attn_processor(AttnProcessor2_0())
    elif backend == "xformers":
        if device.type != "cuda":
            raise ValueError("--attention xformers needs a CUDA device; use --attention sdpa")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError("--attention xformers needs the xformers package: pip install 'srkit[cuda]'") from None
        module.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"unknown attention backend '{backend}'; use sdpa or xformers")


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """torch.compile for fixed shapes (latent tiles all have one size), or `fn` unchanged.

    `dynamic=False` because every tile has the same shape; a different image size costs one recompile.
    """
    if not enabled:
        return fn
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------------------------
# Images <-> latents


def pad_to_multiple(image: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad right/bottom so both sides are multiples of `multiple`; returns the padded image and the original size.

    Reflect padding wider than the image (tiny inputs) is done in several passes instead of failing.
    """
    height, width = image.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, image.shape[-2] - 1) if mode == "reflect" else pad_h
        step_w = min(pad_w, image.shape[-1] - 1) if mode == "reflect" else pad_w
        image = F.pad(image, (0, step_w, 0, step_h), mode=mode)
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return image, (height, width)


def crop_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return image[..., : size[0], : size[1]]


def latent_scale(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a VAE config; shift is 0 for SD 1.x/2.x."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_encode(
    vae,
    image: torch.Tensor,
    *,
    latent: LatentMode = "sample",
    generator: torch.Generator | None = None,
    tiling: VAETiling | None = None,
) -> torch.Tensor:
    """Image in [-1, 1] -> scaled latent: a seeded posterior sample (the official behaviour) or its mode.

    The encoder runs tiled (GroupNorm statistics shared across tiles) when `tiling` says the image is large.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if latent not in ("sample", "mode"):
        raise ValueError(f"latent must be 'sample' or 'mode', got '{latent}'")
    image = image.to(next(vae.parameters()).dtype)
    if tiling is not None and tiling.use_encoder_tiles(image):
        hidden = tiled_encode(vae.encoder, image, tiling)
    else:
        hidden = vae.encoder(image)
    if vae.quant_conv is not None:
        hidden = vae.quant_conv(hidden)
    posterior = DiagonalGaussianDistribution(hidden)
    z = posterior.sample(generator=generator) if latent == "sample" else posterior.mode()
    scale, shift = latent_scale(vae)
    return (z - shift) * scale


def vae_decode(vae, latents: torch.Tensor, *, tiling: VAETiling | None = None) -> torch.Tensor:
    """Scaled latent -> image (not clamped), through a tiled decoder when `tiling` says the latent is large."""
    scale, shift = latent_scale(vae)
    z = (latents / scale + shift).to(next(vae.parameters()).dtype)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    if tiling is not None and tiling.use_decoder_tiles(z):
        return tiled_decode(vae.decoder, z, tiling)
    return vae.decoder(z)


# ---------------------------------------------------------------------------------------------------------------
# The UNet at one timestep


def unet_eps(
    unet,
    latents: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """The UNet output at timestep t, with classifier-free guidance when `uncond` is given and guidance ≠ 1.

    Guidance batches the conditional and unconditional passes into one call (activations are the conditional
    batch followed by the unconditional one) and returns ε_u + g·(ε_c − ε_u).  `cond`/`uncond` are (1, L, D) or
    (B, L, D) embeddings.
    """
    batch = latents.shape[0]
    dtype = next(unet.parameters()).dtype
    timestep = torch.tensor([t], device=latents.device, dtype=torch.long)
    if uncond is None or guidance == 1.0:
        text = cond.expand(batch, -1, -1).to(latents.device, dtype)
        return unet(latents.to(dtype), timestep, encoder_hidden_states=text).sample
    text = torch.cat([cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1)]).to(latents.device, dtype)
    both = unet(torch.cat([latents, latents]).to(dtype), timestep, encoder_hidden_states=text).sample
    eps_cond, eps_uncond = both.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@contextlib.contextmanager
def inference(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """inference_mode + (CUDA) autocast: the context every engine's `upscale` body runs in."""
    with torch.inference_mode(), autocast(device, dtype):
        yield


__all__ = [
    "AttentionBackend",
    "LatentMode",
    "NoiseSchedule",
    "SDLoadError",
    "TextEncoder",
    "VAETiling",
    "autocast",
    "crop_to",
    "fp32_region",
    "has_text_encoder",
    "inference",
    "latent_scale",
    "load_noise_schedule",
    "load_prompt_embeddings",
    "load_unet",
    "load_vae",
    "maybe_compile",
    "pad_to_multiple",
    "prepare_module",
    "prompt_embeddings",
    "save_prompt_embeddings",
    "set_attention",
    "unet_eps",
    "vae_decode",
    "vae_dtype",
    "vae_encode",
]
