"""GenDR's teacher, SD2.1-VAE16 (arXiv 2503.06790 §4.1, §5.1): an SD2.1 UNet moved to the 16-channel latent of
`vae-kl-f8-d16` by full-parameter denoising training with REPA (Eq. 3).

Per batch: HR crop → frozen VAE16 → z_t = √ᾱ_t·z + √(1−ᾱ_t)·ε at t ~ U{0..999} → UNet ε-MSE [SD's objective], plus
λ·REPA: the UNet's features after its first down block (with its downsampler), projected by an MLP, aligned
token by token (−cos) with DINOv2 tokens of the HR image [paper: "after the first downsampling block", "e.g.
DINOv2"; encoder, projector and λ are srkit's proposals]. The UNet sees GenDR's fixed prompt, replaced by the
empty prompt for 10 % of samples so that guidance works later [proposal: the paper's captions are not public].

Only conv_in and conv_out change shape (4 → 16 channels). The paper does not say how they start; srkit tiles the
4-channel weights over the 16 channels, scaling conv_in by √(4/16) so that unit-variance latents give the same
activation variance, and repeats conv_out's filters [proposal].

Export: a diffusers folder (unet/, vae/, scheduler/ and the REPA projector) that `srkit distill --recipe cid|cida
--base OUT/export` starts from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from srkit.diffusion.latents import vae_encode
from srkit.diffusion.loading import load_unet
from srkit.diffusion.text import NEGATIVE_KEY, PROMPT_KEY
from srkit.engines.gendr import DEFAULT_VAE, load_vae16
from srkit.train.distill.cid import sample_timesteps
from srkit.train.distill.cida import RepaProjector, feature_tokens, repa_alignment_loss
from srkit.train.distill.sid import reduce_loss, score_matching_loss
from srkit.train.distill.vp import PromptGuidance, drop_prompts
from srkit.train.recipes import RecipeInputs, TextSide, TrainingSetup, local_or_registry
from srkit.train.recipes.cid import BASE_ENTRY, GENDR_PROMPT, REPA_PROJECTOR_FILE, TEXT_ENTRY
from srkit.train.recipes.sd_recipe import REPA_NETWORK, SDRecipe, require_network
from srkit.train.repa import REPA_ENCODER, RepaEncoder, load_repa_encoder, module_output

TRAINING = TrainingSetup(train={"lr": 1e-5}, degrade=False, source="GenDR §5.1: constant AdamW learning rate")
"""A text-to-image base learns from HR crops alone: no degradation is run."""


@dataclass
class VAE16Settings:
    """The teacher's hyper-parameters; each docstring says where its default comes from."""

    vae: str = DEFAULT_VAE
    """The 16-channel VAE, a registry name or a diffusers folder [paper §4.1: ostris/vae-kl-f8-d16]."""
    t_min: int = 0
    """Training timesteps from [SD: 0]."""
    t_max: int = 1000
    """Training timesteps below [SD: 1000]."""
    prompt: str = GENDR_PROMPT
    """Fixed prompt of every image [proposal: GenDR's fixed prompt; the paper's captions are not public]."""
    prompt_dropout: float = 0.1
    """Share of samples with the empty prompt [proposal: 10 %, keeps guidance usable]."""
    lambda_repa: float = 0.5
    """REPA weight; 0: off [proposal: REPA's 0.5; paper: not stated]."""
    projector_width: int = 2048
    """Hidden width of the REPA projector [proposal: REPA's 2048]."""
    repa_encoder: str = REPA_ENCODER
    """REPA target encoder, a registry name or a transformers DINOv2 folder [proposal: DINOv2 ViT-B/14]."""
    io_init: str = "tile"
    """Start of the 16-channel conv_in/conv_out: 'tile' the 4-channel weights [proposal] or 'random' [paper: not
    stated]."""


SETTINGS = VAE16Settings


def build(settings: VAE16Settings, inputs: RecipeInputs) -> VAE16Recipe:
    """SD2.1-base (`sd21-base`) and its text side (`sd21-text`) unless given, VAE16 and DINOv2 from the registry."""
    base = local_or_registry(inputs.base, BASE_ENTRY, inputs.offline)
    vae = Path(settings.vae).expanduser()
    vae = vae if vae.is_dir() else local_or_registry(None, settings.vae, inputs.offline)
    encoder = load_repa_encoder(settings.repa_encoder, inputs.offline) if settings.lambda_repa > 0 else None
    return VAE16Recipe(base, vae, settings, text=inputs.text_side(TEXT_ENTRY), encoder=encoder)


@torch.no_grad()
def widen_latent_convs(unet: nn.Module, channels: int, init: str = "tile") -> None:
    """Replace conv_in/conv_out by `channels`-channel ones (and say so in the UNet's config).

    "tile": input channel c of conv_in takes old channel c mod C₀, scaled by √(C₀/channels) (unit-variance inputs
    keep the activation variance); output channel c of conv_out repeats old channel c mod C₀. "random": PyTorch's
    default initialisation."""
    if init not in ("tile", "random"):
        raise ValueError(f"io_init must be 'tile' or 'random', got '{init}'")
    old_in, old_out = unet.conv_in, unet.conv_out
    new_in = nn.Conv2d(channels, old_in.out_channels, old_in.kernel_size, padding=old_in.padding)
    new_out = nn.Conv2d(old_out.in_channels, channels, old_out.kernel_size, padding=old_out.padding)
    if init == "tile":
        source = torch.arange(channels) % old_in.in_channels
        new_in.weight.copy_(old_in.weight[:, source] * (old_in.in_channels / channels) ** 0.5)
        new_in.bias.copy_(old_in.bias)
        new_out.weight.copy_(old_out.weight[source % old_out.out_channels])
        new_out.bias.copy_(old_out.bias[source % old_out.out_channels])
    dtype, device = old_in.weight.dtype, old_in.weight.device
    unet.conv_in, unet.conv_out = new_in.to(device, dtype), new_out.to(device, dtype)
    unet.register_to_config(in_channels=channels, out_channels=channels)


class VAE16Recipe(SDRecipe):
    name = "vae16"
    engine = ""
    """No upscaling model runs a text-to-image base: it is the `--base` of `srkit distill --recipe cid|cida`."""
    licence = "CreativeML-OpenRAIL++-M (trained from SD2.1, whose terms apply; VAE16: MIT)"

    def __init__(
        self,
        base: str | Path,
        vae: str | Path,
        settings: VAE16Settings | None = None,
        *,
        text: TextSide = TextSide(),
        encoder: RepaEncoder | None = None,
    ) -> None:
        s = self.settings = settings or VAE16Settings()
        require_network(s.lambda_repa, encoder, "the REPA term", REPA_NETWORK, "lambda_repa")
        super().__init__(
            base, text=text,
            prompts={PROMPT_KEY: s.prompt, NEGATIVE_KEY: ""}, timesteps=(s.t_min, s.t_max - 1),
        )  # fmt: skip
        if self.schedule.prediction_type != "epsilon":
            raise ValueError(f"the vae16 recipe trains ε-prediction; this base predicts '{self.schedule.prediction_type}'")
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.vae = load_vae16(Path(vae)).eval().requires_grad_(False)
        self.unet = load_unet(self.base).train()
        channels = self.vae.config.latent_channels
        if self.unet.config.in_channels != channels:
            widen_latent_convs(self.unet, channels, s.io_init)
        self.groups = {"unet": {f"unet.{k}": p for k, p in self.unet.named_parameters()}}
        self.encoder, self.projector = encoder, None
        if encoder is not None:
            self.projector = RepaProjector(self.unet.config.block_out_channels[0], s.projector_width, encoder.dim)
            self.groups["unet"] |= {f"projector.{k}": p for k, p in self.projector.named_parameters()}

    def to(self, device: torch.device) -> VAE16Recipe:
        super().to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def eps(self, noisy: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        return self.unet(noisy, t, encoder_hidden_states=embedding).sample

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        hr = batch["hr"]
        with torch.no_grad():
            z = vae_encode(self.vae, hr * 2 - 1, latent="sample").float()
        t = sample_timesteps(z.shape[0], s.t_min, s.t_max, device=z.device)
        prompts = PromptGuidance(self.embeddings[PROMPT_KEY][0], self.embeddings[NEGATIVE_KEY][0])
        guidance = drop_prompts(prompts, z.shape[0], s.prompt_dropout)
        with module_output(self.unet.down_blocks[0]) as features:
            diffusion = reduce_loss(
                score_matching_loss(self.eps, z, t, torch.randn_like(z), self.alphas_cumprod, guidance, "eps"), "mean"
            )
        logs = {"diff": diffusion.item()}
        total = diffusion
        if self.projector is not None:
            target = self.encoder(hr, tuple(features[-1].shape[-2:]))
            repa = repa_alignment_loss(self.projector(feature_tokens(features[-1]).float()), target).mean()
            total = total + s.lambda_repa * repa
            logs["repa"] = repa.item()
        yield "unet", total, logs

    def export(self, folder: Path) -> Path:
        """unet/ (16 channels), vae/, scheduler/ and the REPA projector: the SD2.1-VAE16 base of `srkit distill`."""
        from safetensors.torch import save_file

        with self.export_folder(folder) as partial:
            self.unet.save_pretrained(partial / "unet")
            self.vae.save_pretrained(partial / "vae")
            if self.projector is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
                save_file(state, str(partial / REPA_PROJECTOR_FILE))
        return folder


__all__ = ["SETTINGS", "TRAINING", "VAE16Recipe", "VAE16Settings", "build", "widen_latent_convs"]
