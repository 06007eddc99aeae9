"""GenDR's distillation (arXiv 2503.06790 §4.2–4.3, §5.1): CiD here, CiDA (cida.py) on the same recipe with the
adversarial and REPA terms switched on. The student loads in `srkit upscale --model gendr --weights OUT/export`.

Networks (notes/gendr-cid.md A.4–A.5, §C):
- generator G_θ: a full trainable copy of the base UNet [paper: full-parameter training from SD2.1-VAE16], run as
  the engine runs it: bicubic ×4 (`prepare_bicubic`) → VAE encode → z_g = (z_l − β̄·ε̂(z_l, t_s))/ᾱ
  (`gendr_update`, ᾱ = β̄ = 0.5, t_s = 500);
- one frozen copy of the base carries two LoRA adapters, the real score ϕ and the fake score ψ (rank 64, alpha 128
  [paper]); both start as the base (B = 0). ϕ is trained on HR latents, ψ on the generator's (Eq. 7, x0 targets);
- CiDA only: a discriminator head on ϕ's mid-block features of the noised latents, and a REPA projector on the
  generator's features after its first down block, aligned with DINOv2 tokens of the HR image.

One batch, in the order the trainer steps the groups (all forwards first, then every group steps once):
fake: L_ψ on sg(z_g); real: L_ϕ on z_h; discriminator: logistic loss on noised z_h vs sg(noised z_g); generator:
λ₁·(L_cid + λ_mse·L_mse) + λ₂·L_adv + λ₃·L_repa (Eq. 11), with ϕ, ψ and the head frozen but their inputs keeping
the graph (SiD's gradient passes through both networks' Jacobians). The scores the generator sees are the ones
of the start of the step (simultaneous updates; SiD alternates; srkit's toy learns either way).

Where the HR latent enters L_cid is the `form` setting. The paper's reading (z_h in the inner product of Eq. 8
and in ω of §5.1, pinned by the golden) diverges on srkit's 2-D toy (benchmarks/toy_distill.py), because the
constant z_h removes SiD's direct gradient term; srkit's default keeps SiD's inner product with z_g, puts z_h in ω
as §5.1 says, and adds a small explicit regression ‖z_g − z_h‖² (Eq. 6) [srkit choice, see the `form` and `lambda_mse` settings].
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from srkit.diffusion.denoiser import UNetDenoiser
from srkit.diffusion.latents import vae_encode
from srkit.diffusion.loading import load_unet, load_vae
from srkit.diffusion.samplers.one_step import gendr_update
from srkit.diffusion.text import NEGATIVE_KEY, PROMPT_KEY
from srkit.engines.gendr import (
    DEFAULT_VAE,
    DEFAULTS,
    EXPORT_CHECKPOINT,
    EXPORT_VAE,
    prepare_bicubic,
    save_gendr,
)
from srkit.train.distill import cida
from srkit.train.distill.cid import cid_generator_loss, regression_loss, sample_timesteps
from srkit.train.distill.sid import reduce_loss, score_matching_loss
from srkit.train.distill.vp import PromptGuidance, drop_prompts, vp_coefficients
from srkit.train.lora import add_lora, frozen, target_modules, use_adapter
from srkit.train.recipes import RecipeInputs, TextSide, TrainingSetup, local_or_registry
from srkit.train.recipes.sd_recipe import REPA_NETWORK, SDRecipe, require_network
from srkit.train.repa import REPA_ENCODER, RepaEncoder, load_repa_encoder, module_output

GENDR_PROMPT = "realism photo, best quality, realistic detailed, clean, high-resolution"
"""The opening of GenDR's fixed positive prompt (paper §5.1 fn. 3); the rest of the footnote is not in srkit's
notes, so pass the full text with -O prompt=... when you have it."""
SCORE_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)  # fmt: skip
"""Where ϕ and ψ put their LoRA [proposal, notes §C: attention, transformer projections and feed-forward, resnets]."""
BASE_ENTRY, TEXT_ENTRY = "sd21-base", "sd21-text"
REPA_PROJECTOR_FILE = "repa_projector.safetensors"
"""A base exported by `srkit finetune --recipe vae16` carries its REPA projector; CiDA starts from it."""
TRAINING = TrainingSetup(train={"lr": 1e-5}, source="GenDR §5.1: AdamW learning rate of every group")
SCORE_ADAPTERS = ("real", "fake")


@dataclass
class GenDRDistillSettings(cida.CiDASettings):
    """GenDR's distillation hyper-parameters with CiDA's weights (the paper's GenDR; `srkit distill --recipe cida`);
    each docstring says where its default comes from (--help shows the first sentence)."""

    form: str = "hr-weight"
    """Where z_h enters L_cid: 'hr-weight' [srkit choice: SiD's inner product with z_g, z_h in ω as §5.1 says;
    learns on the toy], 'paper' [paper Eq. 8 + §5.1, z_h in the inner product and in ω; WARNING: diverges on
    srkit's toy, benchmarks/toy_distill.py, unless lambda_mse >= 1] or 'sid' (plain SiD-LSG). The paper's form
    loses SiD's direct gradient term because z_h is a constant; the golden pins it as maths."""
    lambda_mse: float = 0.1
    """Weight of Eq. 6's latent MSE ‖z_g − z_h‖² added to L_cid [srkit choice: with 'hr-weight' the best realism and
    fidelity on the toy; the paper states no explicit SR term in Eq. 11, the fact sheet §1.5 says one is added]."""
    rank: int = 64
    """LoRA rank of the real and fake scores [paper §5.1: 64]."""
    lora_alpha: float = 128.0
    """LoRA alpha of the real and fake scores [paper §5.1: 128, scale 2]."""
    gendr_alpha: float = DEFAULTS["alpha"]
    """ᾱ of the one-step update [paper §4.4: 0.5]."""
    gendr_beta: float = DEFAULTS["beta"]
    """β̄ of the one-step update [paper §4.4: 0.5]."""
    t_s: int = DEFAULTS["timestep"]
    """Timestep the generator UNet is told [paper §5.1: 500]."""
    latent: str = "sample"
    """VAE posterior 'sample' or 'mode' for z_l and z_h [srkit: the gendr engine's default, sample]."""
    prompt: str = GENDR_PROMPT
    """Fixed positive prompt c [paper fn. 3, its opening only: pass the full text if you have it]."""
    negative_prompt: str = ""
    """The ∅ of guidance [proposal: the empty prompt; paper: not stated]."""
    lr_real: float | None = None
    """AdamW rate of the real score; none: --lr [paper §5.1: 1e-5 for every group]."""
    lr_fake: float | None = None
    """AdamW rate of the fake score; none: --lr [paper §5.1: 1e-5 for every group]."""
    lr_discriminator: float | None = None
    """AdamW rate of the discriminator head; none: --lr [proposal; paper: not stated]."""
    repa_encoder: str = REPA_ENCODER
    """REPA target encoder, a registry name or a transformers DINOv2 folder [proposal: DINOv2 ViT-B/14; the paper
    names DINOv2 as an example]."""


@dataclass
class CiDRecipeSettings(GenDRDistillSettings):
    """CiD alone (`srkit distill --recipe cid`): Eq. 9 without the adversarial and REPA terms."""

    lambda_cid: float = 1.0
    """λ₁ for the first lambda_cid_steps steps [paper Eq. 9: CiD alone, 1; CiDA uses 10]."""
    lambda_adv: float = 0.0
    """λ₂, adversarial term; 0: off [CiD; CiDA uses the paper's 0.01]."""
    lambda_repa: float = 0.0
    """λ₃, REPA term on the generator; 0: off [CiD; CiDA uses the paper's 0.1]."""


SETTINGS = CiDRecipeSettings


def build(settings: GenDRDistillSettings, inputs: RecipeInputs, name: str = "cid") -> GenDRDistillRecipe:
    """The base (`--base`: SD2.1-VAE16 from `srkit finetune --recipe vae16`, or the registry's SD2.1-base for a
    4-channel GenDR-style student), its text side (`sd21-text` unless --text/--prompt-embeds), and DINOv2 for REPA."""
    base = local_or_registry(inputs.base, BASE_ENTRY, inputs.offline)
    encoder = load_repa_encoder(settings.repa_encoder, inputs.offline) if settings.lambda_repa > 0 else None
    return GenDRDistillRecipe(
        base, settings, text=inputs.text_side(TEXT_ENTRY), encoder=encoder, name=name
    )


class ScoreNetwork:
    """One adapter of the shared score UNet as an ε-model (z_t, t, prompt embedding) → ε̂; inside
    `keeping_features()` every call also keeps its mid-block output (the discriminator's input)."""

    def __init__(self, unet: torch.nn.Module, adapter: str) -> None:
        self.unet, self.adapter = unet, adapter
        self.kept: list[torch.Tensor] | None = None

    def __call__(self, noisy: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        use_adapter(self.unet, self.adapter)
        if self.kept is None:
            return self.unet(noisy, t, encoder_hidden_states=embedding).sample
        with module_output(self.unet.mid_block) as outputs:
            eps = self.unet(noisy, t, encoder_hidden_states=embedding).sample
        self.kept.extend(outputs)
        return eps

    @contextmanager
    def keeping_features(self) -> Iterator[list[torch.Tensor]]:
        self.kept = []
        try:
            yield self.kept
        finally:
            self.kept = None


class GenDRDistillRecipe(SDRecipe):
    name = "cid"
    engine = "gendr"
    licence = "CreativeML-OpenRAIL++-M (distilled from an SD2.1 base, whose terms apply; VAE16: MIT)"

    def __init__(
        self,
        base: str | Path,
        settings: GenDRDistillSettings | None = None,
        *,
        text: TextSide = TextSide(),
        encoder: RepaEncoder | None = None,
        name: str = "cid",
    ) -> None:
        """`name` ("cid" or "cida") is what checkpoints record; the settings decide which terms run."""
        s = self.settings = settings or CiDRecipeSettings()
        self.name = name
        require_network(s.lambda_repa, encoder, "CiDA's REPA term", REPA_NETWORK, "lambda_repa")
        if s.form not in ("paper", "hr-weight", "sid"):
            raise ValueError(f"form must be 'paper', 'hr-weight' or 'sid', got '{s.form}'")
        super().__init__(
            base, text=text,
            prompts={PROMPT_KEY: s.prompt, NEGATIVE_KEY: s.negative_prompt},
            timesteps=(s.t_s, s.t_min, s.t_max - 1),
        )  # fmt: skip
        if self.schedule.prediction_type != "epsilon":
            raise ValueError(
                f"GenDR distils an ε-prediction base (SD2.1-base, SD2.1-VAE16); this one predicts "
                f"'{self.schedule.prediction_type}'"
            )
        self.alphas_cumprod = self.schedule.alphas_cumprod
        self.vae = load_vae(self.base).eval().requires_grad_(False)
        self.scores = load_unet(self.base).train().requires_grad_(False)
        channels = self.vae.config.latent_channels
        if self.scores.config.in_channels != channels:
            raise ValueError(
                f"the base UNet reads {self.scores.config.in_channels} latent channels, its VAE has {channels}"
            )
        self.vae_entry = DEFAULT_VAE if channels == 16 else BASE_ENTRY
        self.generator = copy.deepcopy(self.scores).requires_grad_(True)
        sites = target_modules(self.scores, SCORE_LORA_TARGETS)
        self.groups = {"generator": {f"generator.{k}": p for k, p in self.generator.named_parameters()}}
        for adapter in SCORE_ADAPTERS:
            lora = add_lora(self.scores, sites, s.rank, adapter, alpha=s.lora_alpha)
            self.groups[adapter] = {f"scores.{k}": p for k, p in lora.items()}
        for adapter in SCORE_ADAPTERS:  # adding an adapter freezes the others (peft); both are trained
            for parameter in self.groups[adapter].values():
                parameter.requires_grad_(True)
        self.real, self.fake = (ScoreNetwork(self.scores, adapter) for adapter in SCORE_ADAPTERS)
        self.head = self.projector = None
        if s.lambda_adv > 0:
            width = self.scores.config.block_out_channels[-1]
            self.head = cida.DiscriminatorHead(width, s.discriminator_width)
            self.groups["discriminator"] = {f"head.{k}": p for k, p in self.head.named_parameters()}
        self.encoder = encoder
        if encoder is not None:
            self.projector = cida.RepaProjector(self.generator.config.block_out_channels[0], s.projector_width, encoder.dim)
            self._start_projector(Path(self.base) / REPA_PROJECTOR_FILE)
            self.groups["generator"] |= {f"projector.{k}": p for k, p in self.projector.named_parameters()}

    def _start_projector(self, path: Path) -> None:
        """The teacher's REPA projector when the base has one of the same shape [proposal, notes §C]."""
        if not path.is_file():
            return
        from safetensors.torch import load_file

        state = load_file(str(path))
        own = self.projector.state_dict()
        if state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
            self.projector.load_state_dict(state)

    def learning_rates(self) -> dict[str, float]:
        s = self.settings
        rates = {"real": s.lr_real, "fake": s.lr_fake, "discriminator": s.lr_discriminator}
        return {group: rate for group, rate in rates.items() if rate is not None}

    def to(self, device: torch.device) -> GenDRDistillRecipe:
        super().to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    # ------------------------------------------------------------------------------------------------------------

    def guidance(self, scale: float) -> PromptGuidance:
        """The fixed prompt c and the empty prompt ∅, shared by the batch, with guidance scale κ."""
        return PromptGuidance(self.embeddings[PROMPT_KEY][0], self.embeddings[NEGATIVE_KEY][0], scale)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → scaled latents, as the engine encodes (frozen VAE)."""
        return vae_encode(self.vae, images * 2 - 1, latent=self.settings.latent).float()

    def generate(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z_g, generator features after down_blocks[0] or None): the engine's one step on LR in [0, 1]."""
        s = self.settings
        z_l = self.encode(prepare_bicubic(lr))
        text = self.condition(PROMPT_KEY)
        if self.projector is None:
            return gendr_update(UNetDenoiser(self.generator), z_l, s.t_s, text, s.gendr_alpha, s.gendr_beta), None
        with module_output(self.generator.down_blocks[0]) as features:
            z_g = gendr_update(UNetDenoiser(self.generator), z_l, s.t_s, text, s.gendr_alpha, s.gendr_beta)
        return z_g, features[-1]

    def score_loss(self, network: ScoreNetwork, clean: torch.Tensor) -> torch.Tensor:
        """Eq. 7 on `clean` (detached) at t ~ U{t_min..t_max−1}, with prompt dropout."""
        s = self.settings
        t = sample_timesteps(clean.shape[0], s.t_min, s.t_max, device=clean.device)
        guidance = drop_prompts(self.guidance(s.score_cfg_scale), clean.shape[0], s.prompt_dropout)
        elements = score_matching_loss(
            network, clean, t, torch.randn_like(clean), self.alphas_cumprod, guidance, s.score_target
        )
        return reduce_loss(elements, s.normalisation)

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        z_h = self.encode(batch["hr"])
        z_g, generator_features = self.generate(batch["lr"])
        fake = self.score_loss(self.fake, z_g.detach())
        yield "fake", fake, {"fake": fake.item()}
        real = self.score_loss(self.real, z_h)
        yield "real", real, {"real": real.item()}

        t = sample_timesteps(z_g.shape[0], s.t_min, s.t_max, device=z_g.device)
        noise = torch.randn_like(z_g)
        adversarial = None
        with frozen(self.scores, *filter(None, [self.head])), self.real.keeping_features() as real_features:
            terms = cid_generator_loss(
                z_g, z_h, self.real, self.fake, t, noise, self.alphas_cumprod, self.guidance(s.cfg_scale), s.xi, s.form
            )
            if self.head is not None:
                fake_features = self._conditional_half(real_features[-1], z_g.shape[0])
                adversarial = cida.generator_adversarial_loss(self.head(fake_features))
        if self.head is not None:
            discriminator = self.discriminator_loss(z_h, fake_features.detach(), t, noise)
            yield "discriminator", discriminator, {"disc": discriminator.item()}

        cid, logs = terms.elements, {"omega_inv": terms.weight_factor.mean().item()}
        if s.lambda_mse:
            mse = regression_loss(z_g, z_h)
            cid, logs["mse"] = cid + s.lambda_mse * mse, mse.mean().item()
        repa = self.repa_loss(generator_features, batch["hr"]) if self.projector is not None else None
        total = cida.cida_generator_loss(cid, adversarial, repa, s, step)
        logs["cid"] = total.cid.item()
        logs |= {name: value.item() for name, value in (("adv", total.adversarial), ("repa", total.repa)) if value is not None}
        yield "generator", total.total, logs

    @staticmethod
    def _conditional_half(features: torch.Tensor, batch: int) -> torch.Tensor:
        """The conditional part of a guided call's features (`guided_eps` batches [∅, c])."""
        return features[batch:] if features.shape[0] == 2 * batch else features

    def discriminator_loss(
        self, z_h: torch.Tensor, fake_features: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The head on ϕ's mid-block features of z_h noised with the generator step's t and ε vs the generator's
        (already computed, detached): only the head learns [proposal, notes §C]."""
        a, b = vp_coefficients(self.alphas_cumprod, t, z_h)
        embedding = self.embeddings[PROMPT_KEY].expand(z_h.shape[0], -1, -1)
        with torch.no_grad(), self.real.keeping_features() as real_features:
            self.real(a * z_h + b * noise, t, embedding)
        elements = cida.discriminator_loss(self.head(real_features[-1]), self.head(fake_features))
        return reduce_loss(elements, self.settings.normalisation)

    def repa_loss(self, features: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Per-token −cos between the projected generator features and the encoder's HR tokens (elementwise)."""
        target = self.encoder(hr, tuple(features.shape[-2:]))
        return cida.repa_alignment_loss(self.projector(cida.feature_tokens(features).float()), target)

    # ------------------------------------------------------------------------------------------------------------

    def export(self, folder: Path) -> Path:
        """`gendr.safetensors` (the generator, the fixed prompt, ᾱ/β̄/t_s, the VAE's registry name) and the VAE
        it was trained with in `vae/`: what `srkit upscale --model gendr --weights FOLDER` loads."""
        s = self.settings
        with self.export_folder(folder) as partial:
            save_gendr(
                partial / EXPORT_CHECKPOINT, self.generator, self.embeddings[PROMPT_KEY], alpha=s.gendr_alpha,
                beta=s.gendr_beta, timestep=s.t_s, vae=self.vae_entry,
            )  # fmt: skip
            self.vae.save_pretrained(partial / EXPORT_VAE)
        return folder


__all__ = [
    "GENDR_PROMPT",
    "SETTINGS",
    "TRAINING",
    "CiDRecipeSettings",
    "GenDRDistillRecipe",
    "GenDRDistillSettings",
    "build",
]
