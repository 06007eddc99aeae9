"""The typed options of every model (CLI `--name value` and `-O name=value`), with no PyTorch import.

Options are plain checked values, so they live apart from the networks: the command line builds and checks a
model's options, and refuses an option the model does not take, in a fraction of a second before PyTorch loads
(seconds).  Each class's `validate` raises a one-line ValueError naming the option; engines receive the built
object.  Which model takes which class is said once, in `srkit.engines.catalogue`.
"""

from __future__ import annotations

from dataclasses import dataclass

from srkit.common import check_choice
from srkit.option_values import (
    COLOR_FIXES,
    LATENT_MODES,
    QUALITY_PROMPT,
    TAGGER_CHOICES,
    check_attention,
)


@dataclass
class EngineOptions:
    """Options every engine accepts; engines subclass this with their own typed fields.  Values are checked when
    the options are built, before any weights are read."""

    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (one line, naming the option) for a bad value; subclasses extend it."""


# ---------------------------------------------------------------------------------------------------------------
# GAN


@dataclass
class GanOptions(EngineOptions):
    """A feed-forward GAN has no options of its own (only the seed every engine accepts)."""


@dataclass
class DenoiseOptions(GanOptions):
    """realesr-general-x4v3, the one GAN with a twin to blend with, so the only one that takes a strength."""

    denoise_strength: float = 0.5
    """1 = the strong-denoise model, 0 = its weak-denoise (wdn) twin."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.denoise_strength <= 1.0:
            raise ValueError(f"--denoise-strength must be in [0, 1], got {self.denoise_strength}")


# ---------------------------------------------------------------------------------------------------------------
# Diffusion: shared by one-step and multi-step models


@dataclass
class DiffusionOptions(EngineOptions):
    color_fix: str = "adain"
    """adain (upstream default), wavelet or none; against the upsampled input."""
    official_8bit: bool = True
    """Truncate to 8 bits around the colour fix as upstream does through PIL; false keeps float until writing."""
    latent_tile: int = 96
    """Latent tile side; tiling starts when the latent area exceeds latent_tile² (0 = never tile)."""
    latent_overlap: int = 32
    tile_batch: int = 1
    """Latent tiles per network call (more fills a GPU better; same result)."""
    vae_encoder_tile: int = 1024
    """Tiled VAE encoder above this many image pixels (+ padding); 0 = never."""
    vae_decoder_tile: int = 224
    """Tiled VAE decoder above this many latent pixels (+ padding); 0 = never."""
    attention: str = "sdpa"
    """sdpa or xformers (CUDA)."""
    compile: bool = False
    """torch.compile the denoising network (pays off on many same-sized tiles)."""

    def validate(self) -> None:
        super().validate()
        check_choice(self.color_fix, COLOR_FIXES, "color_fix")
        if self.latent_tile and not 0 <= self.latent_overlap < self.latent_tile:
            raise ValueError("latent_overlap must be at least 0 and smaller than latent_tile")
        if self.tile_batch < 1:
            raise ValueError("tile_batch must be at least 1")
        check_attention(self.attention)


# ---------------------------------------------------------------------------------------------------------------
# One-step models


@dataclass
class OneStepOptions(DiffusionOptions):
    """What every one-step SD engine accepts."""

    latent: str = "sample"
    """sample: the seeded VAE posterior sample (upstream); mode: its mean (deterministic, not upstream)."""

    def validate(self) -> None:
        super().validate()
        check_choice(self.latent, LATENT_MODES, "latent")


@dataclass
class PromptedOptions(OneStepOptions):
    """Options of the text-conditioned engines of the OSEDiff family (OSEDiff, NAOSD, GDPO-SR)."""

    prompt: str = ""
    """User text; the model sees "{tags}, {prompt}," as upstream composes it."""
    tagger: str = "auto"
    """dape | ram | none: the image tagger whose tags start the prompt (upstream: DAPE on the ×4 input);
    auto = dape when its weights are cached, else none (with a notice)."""
    prompt_embeds: str | None = None
    """A .safetensors file with a precomputed `prompt` embedding (1, 77, D): used instead of the text encoder."""

    def validate(self) -> None:
        super().validate()
        check_choice(self.tagger, TAGGER_CHOICES, "tagger")


@dataclass
class OSEDiffOptions(PromptedOptions):
    timestep: int = 999


@dataclass
class NoiseInjectionOptions(PromptedOptions):
    """NAOSD and GDPO-SR."""

    prompt: str = QUALITY_PROMPT
    t_add: int = 250
    """Timestep the latent is noised to (seeded noise)."""
    t_diff: int = 100
    """Timestep the UNet is told, and whose ᾱ turns its ε into x0."""


S3DIFF_POSITIVE_PROMPT = (
    "A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural lighting."
)
S3DIFF_NEGATIVE_PROMPT = (
    "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth"
)


@dataclass
class S3DiffOptions(OneStepOptions):
    color_fix: str = "wavelet"
    """wavelet (S3Diff's default) | adain | none, against the bilinear-upsampled input."""
    guidance: float = 1.07
    """Classifier-free guidance scale between the positive and negative prompt (1 = positive prompt only)."""
    blur: float | None = None
    """Override the estimated blur degree (0 = sharp ... 1 = heavily blurred)."""
    noise: float | None = None
    """Override the estimated noise degree (0 = clean ... 1 = very noisy)."""
    prompt: str = S3DIFF_POSITIVE_PROMPT
    negative_prompt: str = S3DIFF_NEGATIVE_PROMPT
    prompt_embeds: str | None = None
    """A .safetensors file with `pos` and `neg` embeddings, used instead of the text encoder and the prompts."""
    lora_merge: bool = True
    """Merge each image's LoRA into a cached copy of the wrapped weights (faster; one extra copy of those weights
    in memory, ~3.4 GB for SD-Turbo in fp32); false runs the peft-style unmerged branch (less memory)."""

    def validate(self) -> None:
        super().validate()
        for name in ("blur", "noise"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name} must be a degree in [0, 1], got {value}")


@dataclass
class GenDROptions(OneStepOptions):
    official_8bit: bool = False
    """No upstream code to match, so the output stays float until it is written."""
    alpha: float | None = None
    """ᾱ of the one-step update; None: the checkpoint's value (0.5 unless it says otherwise)."""
    beta: float | None = None
    """β̄ of the one-step update; None: the checkpoint's value (0.5 unless it says otherwise)."""
    timestep: int | None = None
    """t_s given to the UNet; None: the checkpoint's value (500 unless it says otherwise)."""


# ---------------------------------------------------------------------------------------------------------------
# Multi-step models


@dataclass
class MultiStepOptions(DiffusionOptions):
    steps: int | None = None
    """Sampler steps; None: the model's default."""
    guidance: float | None = None
    """Classifier-free guidance scale; None: the model's default."""

    def validate(self) -> None:
        super().validate()
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


SD2_SR_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
"""The negative prompt of SeeSR and of ConsisSR (the same text in both codebases)."""

CONSISSR_STARTS = ("noise", "gan")
CONSISSR_DEFAULT_STEPS = {"noise": 50, "gan": 10}
CONSISSR_DEFAULT_GUIDANCE = {"noise": 5.0, "gan": 4.0}


@dataclass
class ConsisSROptions(MultiStepOptions):
    """steps: 50 (the README), 10 with --start gan (the paper's GAN-Embedding); guidance: 5.0 (the README), 4.0
    with --start gan (the authors' scripts)."""

    prompt: str = QUALITY_PROMPT
    negative_prompt: str = SD2_SR_NEGATIVE_PROMPT
    start: str = "noise"
    """noise: sample from x_T ~ N(0, I) (official inference); gan: GAN-Embedding from a GAN model's output."""
    start_model: str = "realesrgan-x4plus"
    """--start gan: the srkit GAN model whose output is the hint, image-token source and start latent."""
    start_t: float = 0.6
    """--start gan: t_max as a fraction of 999 (the official `starts`; 0.6 gives t_max = 599)."""
    latent_tile: int = 64
    """Fixed by the model: its positional embedding covers exactly a 64×64 latent (the checkpoint decides)."""
    model_config: str | None = None
    """An official-layout model yaml (configs/model/cldm.yaml) for a checkpoint of other sizes; default: the
    released model (SD2.1-base + OpenCLIP ViT-H-14)."""
    clip_config: str | None = None
    """An OpenCLIP model config (json) to go with `model_config`; default ViT-H-14."""

    def validate(self) -> None:
        super().validate()
        check_choice(self.start, CONSISSR_STARTS, "start")
        if not 0 < self.start_t <= 1:
            raise ValueError(f"start_t is a fraction of the schedule in (0, 1], got {self.start_t}")
        if self.latent_tile <= 0:
            raise ValueError("ConsisSR always runs on latent tiles of the model's size (latent_tile > 0)")

    @property
    def sampler_steps(self) -> int:
        return self.steps if self.steps is not None else CONSISSR_DEFAULT_STEPS[self.start]

    @property
    def guidance_scale(self) -> float:
        return self.guidance if self.guidance is not None else CONSISSR_DEFAULT_GUIDANCE[self.start]


SEESR_STARTS = ("lr", "noise")
SEESR_DEFAULTS = {False: (50, 5.5), True: (2, 1.0)}
"""turbo -> (steps, guidance)."""


@dataclass
class SeeSROptions(MultiStepOptions):
    """steps: 50 (2 with turbo); guidance: 5.5 (1 with turbo)."""

    prompt: str = ""
    """User text after the tags: "{tags}, {prompt}," + added_prompt."""
    added_prompt: str = QUALITY_PROMPT
    negative_prompt: str = SD2_SR_NEGATIVE_PROMPT
    tagger: str = "dape"
    """dape (upstream) | ram | none: the tags of the prompt; the image embeddings always come from the tagger model
    (DAPE for none), which SeeSR cannot run without."""
    start: str = "lr"
    """lr: the LR latent noised to t=999 (upstream's default "LR embedding"); noise: pure Gaussian."""
    conditioning_scale: float = 1.0
    """ControlNet residual scale."""
    turbo: bool = False
    """SeeSR's turbo script: the SD-Turbo base (text encoder, VAE, schedule), 2 steps, guidance 1."""
    latent_overlap: int = 32
    """Latent tile overlap (upstream test_seesr.py: 4; RFSR's copy: 32, fewer visible seams)."""
    prompt_embeds: str | None = None
    """A .safetensors file with `prompt` and `neg` embeddings instead of the text encoder (no tags then)."""

    def validate(self) -> None:
        super().validate()
        check_choice(self.tagger, TAGGER_CHOICES, "tagger")
        check_choice(self.start, SEESR_STARTS, "start")

    @property
    def tag_model(self) -> str:
        """The tagger whose model runs: the one asked for, DAPE for none/auto (its embeddings are needed)."""
        return "ram" if self.tagger == "ram" else "dape"


__all__ = [
    "CONSISSR_DEFAULT_GUIDANCE",
    "CONSISSR_DEFAULT_STEPS",
    "CONSISSR_STARTS",
    "S3DIFF_NEGATIVE_PROMPT",
    "S3DIFF_POSITIVE_PROMPT",
    "SD2_SR_NEGATIVE_PROMPT",
    "SEESR_DEFAULTS",
    "SEESR_STARTS",
    "ConsisSROptions",
    "DenoiseOptions",
    "DiffusionOptions",
    "EngineOptions",
    "GanOptions",
    "GenDROptions",
    "MultiStepOptions",
    "NoiseInjectionOptions",
    "OSEDiffOptions",
    "OneStepOptions",
    "PromptedOptions",
    "S3DiffOptions",
    "SeeSROptions",
]
