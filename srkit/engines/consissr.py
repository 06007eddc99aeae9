"""ConsisSR (Gu et al., arXiv:2410.13807; Gujojo/ConsisSR): multi-step ControlNet SR on SD2.1 with the Hybrid
Prompt Adapter, and the paper's GAN-Embedding fast start.

The official inference (`inference.py`, `model/spaced_sampler.py`), step by step:
1. pre-processing: PIL bicubic ×4, then (short side < 512) bicubic up to short side 512, zero-padded to a
   multiple of 64: the control image, in [-1, 1];
2. conditioning: a latent hint of the control image (a frozen VAE-encoder copy) through the ControlNet, and one
   HPA image token (OpenCLIP ViT-H pooled embedding → MLP) joined to the text tokens of the fixed prompts;
3. x_T ~ N(0, I), then respaced DDPM (guided-diffusion spacing, posterior variance) over 50 steps with
   classifier-free guidance 5.0 between "clean, high-resolution, 8k" and "dotted, noise, blur, lowres, smooth";
   the two passes share the hint and the image token, only the text differs;
4. decode, AdaIN colour fix against the padded control image, 8-bit truncation, crop, resize to 4× the input.
GAN-Embedding (`--start gan`, `model/spaced_sampler_lre.py`): a GAN model's output replaces the control image as
hint and image-token source, the start is its hint latent q-sampled at t_max ≈ 0.6·999, and 10 steps of the
truncated schedule run (guidance 4.0, as the authors' scripts); the colour fix stays against the LR's control.

What srkit adds: any size.  The official model runs only at 512² (its positional embedding fixes a 64×64 latent),
so srkit samples larger images on 64×64 latent tiles — exactly the trained size — blended with the upstream
Gaussian weights; each tile is conditioned on its own crop (hint and image token computed once per tile, as the
model saw 512² crops in training), and the VAE runs tiled.  Text is embedded once per engine, and the two
guidance passes are one batched network call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from srkit.colorfix import color_fix, truncate_8bit
from srkit.diffusion.denoiser import Conditioning
from srkit.diffusion.latents import VAETiling, crop_to, pad_to_multiple, resize_to
from srkit.diffusion.runtime import inference, maybe_compile, prepare_networks, set_attention
from srkit.diffusion.samplers.ancestral import (
    AncestralSampler,
    NoiseDraw,
    generator_draw,
    respaced_timesteps,
)
from srkit.engines.base import Progress, WeightsSet, get_engine, register
from srkit.engines.multi_step import MultiStepEngine
from srkit.engines.options import SD2_SR_NEGATIVE_PROMPT as NEGATIVE_PROMPT
from srkit.engines.options import ConsisSROptions
from srkit.engines.preprocess import through_8bit, upscale_then_auto_resize
from srkit.registry import WeightsError
from srkit.tiling import Box, run_tiled

SCALE = 4
PROCESS_SIZE = 512
"""`auto_resize`: an input whose ×4 short side is below this is enlarged to it first (the trained image size:
8 × the model's latent size)."""
PAD_MULTIPLE = 64
GAN_INPUT_TILE = 256
"""The GAN start model runs on input tiles of this size (bounded memory for large inputs)."""


# ---------------------------------------------------------------------------------------------------------------
# Pre-processing, as inference.py does it with PIL


def prepare_official(image: np.ndarray, scale: int = SCALE, process_size: int = PROCESS_SIZE) -> np.ndarray:
    """uint8 H×W×3 LR -> the unpadded uint8 control image (`upscale_then_auto_resize`)."""
    return upscale_then_auto_resize(image, scale, process_size)


def prepare_batch(batch: torch.Tensor, process_size: int = PROCESS_SIZE) -> torch.Tensor:
    """Tensor[B,3,h,w] in [0,1] -> the unpadded control images in [0,1] (via 8-bit, as upstream)."""
    return through_8bit(batch, lambda pixels: prepare_official(pixels, SCALE, process_size))


def pad_zeros(image: torch.Tensor) -> torch.Tensor:
    """Zero padding right/bottom to a multiple of 64 (the official padding, applied to [0,1] images)."""
    return pad_to_multiple(image, PAD_MULTIPLE, mode="constant")[0]


# ---------------------------------------------------------------------------------------------------------------
# The engine

class ConsisSRDenoiser:
    """ε of the ControlNet + UNet for latent tiles: context = [image token, text], the hint embedding as a map."""

    def __init__(self, nets) -> None:
        self.nets = nets

    def __call__(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        context = self.nets.context(cond.tokens["image"], cond.tokens["text"])
        return self.nets.eps(x, t, context, cond.maps["hint"])


@register("consissr")
class ConsisSREngine(MultiStepEngine):
    def __init__(self, nets, device: torch.device, dtype: torch.dtype, options: ConsisSROptions, start_engine=None):
        super().__init__(device, dtype, options)
        self.nets = nets
        self.start_engine = start_engine
        """The GAN engine of `--start gan`."""
        self.latent_size = nets.architecture.latent_size
        self.process_size = 2 ** (len(nets.architecture.vae_channel_mult) - 1) * self.latent_size
        if options.latent_tile != self.latent_size:
            raise ValueError(f"this ConsisSR model runs on {self.latent_size}² latent tiles (latent_tile), not "
                             f"{options.latent_tile}²")  # fmt: skip
        self.vae_tiling = VAETiling(encoder_tile=options.vae_encoder_tile, decoder_tile=options.vae_decoder_tile)
        with torch.inference_mode():
            text = nets.encode_text([options.prompt, options.negative_prompt])
        self.text_positive, self.text_negative = text.clone().split(1)
        set_attention(nets.unet, options.attention, device)
        set_attention(nets.controlnet, options.attention, device)
        set_attention(nets.vae, "sdpa", device)
        self.to_dtype(dtype)
        self.network = maybe_compile(ConsisSRDenoiser(nets), options.compile)
        self.guidance_scale = options.guidance_scale
        steps = respaced_timesteps(options.sampler_steps, nets.schedule.num_train_timesteps,
                                   options.start_t if options.start == "gan" else 1.0)  # fmt: skip
        self.sampler = AncestralSampler.build(steps, nets.schedule.alphas_cumprod())

    @classmethod
    def weights_for(cls, options: ConsisSROptions) -> tuple[str, ...]:
        if options.start != "gan":
            return cls.spec.weights
        return cls.spec.weights + get_engine(options.start_model)[1].weights

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: ConsisSROptions) -> ConsisSREngine:
        start_engine = None
        if options.start == "gan":
            start_class, start_spec = get_engine(options.start_model)
            if start_spec.tiling != "pixel" or start_spec.scale != SCALE:
                raise ValueError(f"--start-model must be a x{SCALE} GAN model, not '{options.start_model}'")
            start_options = start_class.options_class()
            start_engine = start_class.from_weights(weights, device, torch.float32, start_options)
        nets = load_export(weights["consissr"], options.model_config, options.clip_config)
        return cls(nets, torch.device(device), dtype, options, start_engine)

    def to_dtype(self, dtype: torch.dtype) -> None:
        """The ControlNet, UNet, hint encoder (part "unet") and VAE (part "vae") in `dtype` on the device, each
        as `srkit.cpu_features` chose on the CPU (bf16 weights on AMX); the CLIP prompt follows on CUDA only (on
        the CPU its one pass per image stays fp32)."""
        nets = self.nets
        prepare_networks(self.device, dtype, [nets.unet, nets.controlnet, nets.hint_encoder], nets.vae)
        nets.prompt.to(self.device, dtype if self.device.type == "cuda" else torch.float32)
        self.dtype = dtype

    # -----------------------------------------------------------------------------------------------------------
    # The procedure

    def upscale(
        self, batch: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        height, width = batch.shape[-2:]
        # 1. The official pre-processing: the control image (unpadded), then zero-padded to 64.
        unpadded = prepare_batch(batch.to(self.device), self.process_size)
        control = pad_zeros(unpadded)
        # 2. What conditions the network: the control image, or a GAN model's output (GAN-Embedding).
        source = control if self.start_engine is None else pad_zeros(self.gan_image(batch, unpadded.shape[-2:]))
        # 3-4. Sample the latent (x_T or the q-sampled GAN latent, then the respaced steps).
        latent = self.generate(source * 2 - 1, draw=generator_draw(generator), progress=progress)
        # 5. Decode, colour fix against the control image, crop the padding, exactly 4× the input.
        return self.finish(latent, control, tuple(unpadded.shape[-2:]), (height * SCALE, width * SCALE))

    def gan_image(self, batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The start model's ×4 output in [0,1], resized to the control image's size when the pre-processing
        enlarged a small input (upstream expects the GAN image at that size)."""
        engine = self.start_engine

        def run(piece: torch.Tensor) -> torch.Tensor:
            return engine.upscale(piece.to(engine.device)).float()

        output = run_tiled(run, batch.float(), SCALE, GAN_INPUT_TILE, 16).to(self.device)
        return resize_to(output.clamp(0, 1), size)

    def generate(
        self,
        source: torch.Tensor,
        *,
        draw: NoiseDraw,
        start_noise: torch.Tensor | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """The final latent for a conditioning image in [-1, 1] (padded to 64).

        `draw(i, like)` gives step i's noise and, when `start_noise` is None, the start noise (as index -1):
        x_T itself, or the noise that q-samples the GAN latent to t_max.
        """
        options = self.options
        with inference(self.device, self.dtype):
            source = source.to(self.device)
            cond = Conditioning({"text": self.text_positive}, {"source": source})
            shape = (source.shape[0], self.nets.architecture.latent_channels, source.shape[-2] // 8, source.shape[-1] // 8)
            noise = start_noise if start_noise is not None else draw(-1, torch.empty(shape, device=self.device))
            if options.start == "gan":  # the GAN image's hint latent, noised to the first (truncated) timestep
                x = self.sampler.add_noise(self.nets.hint(source, self.vae_tiling), noise, self.sampler.timesteps[0])
            else:
                x = noise.to(self.device).float()
            return self.run_sampler(x, cond, self.latent_size, draw, progress)

    def tile_condition(self, cond: Conditioning, box: Box) -> Conditioning:
        """A latent tile's hint embedding and image token, from its crop of the conditioning image."""
        y, x, side = box
        crop = cond.maps["source"][:, :, 8 * y : 8 * (y + side), 8 * x : 8 * (x + side)]
        nets = self.nets
        hint = nets.embed_hint(nets.hint(crop))
        return Conditioning({"text": cond.tokens["text"], "image": nets.image_token(crop)}, {"hint": hint})

    def finish(
        self, latent: torch.Tensor, control: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int]
    ) -> torch.Tensor:
        """Decode, colour fix against the padded control image (as upstream), 8-bit truncation, crop, resize."""
        with inference(self.device, self.dtype):
            decoded = self.nets.decode(latent, self.vae_tiling)
        fixed = color_fix((decoded.float() + 1) / 2, control.float(), self.options.color_fix)
        if self.options.official_8bit:
            fixed = truncate_8bit(fixed.clamp(0, 1))
        return resize_to(crop_to(fixed.clamp(0, 1), size), out_size)


EXPORT_CHECKPOINT, EXPORT_MODEL_CONFIG, EXPORT_CLIP_CONFIG = "ConsisSR.ckpt", "model.yaml", "openclip.json"
"""An srkit-trained ConsisSR: the official checkpoint layout plus the configs of its sizes, in one folder."""


def save_export(nets, folder: Path) -> Path:
    """Write trained networks as a folder `--model consissr --weights FOLDER` loads (official checkpoint layout)."""
    import yaml

    from srkit.common import atomic_folder
    from srkit.convert.consissr import ldm_model_config, save_consissr

    with atomic_folder(folder) as partial:
        save_consissr(nets, partial / EXPORT_CHECKPOINT)
        (partial / EXPORT_MODEL_CONFIG).write_text(yaml.safe_dump(ldm_model_config(nets.architecture, nets.schedule)))
        (partial / EXPORT_CLIP_CONFIG).write_text(json.dumps(dict(nets.architecture.clip)))
    return folder


def load_export(path: str | Path, model_config: str | None = None, clip_config: str | None = None):
    """ConsisSR networks from the official checkpoint file, or from an export folder (its configs unless given)."""
    from srkit.convert.consissr import load_consissr

    path = Path(path)
    if path.is_dir():
        model_config = model_config or _existing(path / EXPORT_MODEL_CONFIG)
        clip_config = clip_config or _existing(path / EXPORT_CLIP_CONFIG)
        path = path / EXPORT_CHECKPOINT
    return load_consissr(path, *_architecture(model_config, clip_config))


def _existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def _architecture(model_config: str | None, clip_config: str | None):
    """(architecture, schedule) from official-layout configs, or (None, None) for the released model's defaults."""
    if model_config is None:
        if clip_config is not None:
            raise ValueError("clip_config goes with model_config (the released model uses ViT-H-14)")
        return None, None
    import yaml

    from srkit.convert.consissr import architecture_from_ldm_config

    try:
        model = yaml.safe_load(Path(model_config).read_text())
        clip = json.loads(Path(clip_config).read_text()) if clip_config else None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read the ConsisSR model config: {exc}") from exc
    if clip is None:
        import open_clip

        clip = open_clip.get_model_config("ViT-H-14")
    return architecture_from_ldm_config(model, clip)


__all__ = [
    "NEGATIVE_PROMPT",
    "ConsisSREngine",
    "ConsisSROptions",
    "load_export",
    "prepare_batch",
    "prepare_official",
    "save_export",
]
