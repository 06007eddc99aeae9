"""One-step distillation maths: SiD (EDM σ and DDPM ᾱ forms), GenDR's CiD and CiDA, as functions over networks
the recipe plugs in.

- vp.py: z_t = √ᾱ·z + √(1−ᾱ)·ε, x0 from ε, classifier-free guidance, prompt dropout (dtype-generic).
- sid.py: SiD's generator and fake-score losses, weight factor, reduction.
- cid.py: CiD (Eqs. 7–9) and its settings.
- cida.py: the adversarial and REPA terms, Eq. 11, and CiDA's settings.
- toy.py: a 2-D distillation that shows the losses learn (tests, benchmarks/toy_distill.py).
"""

from srkit.train.distill.cid import CiDSettings, cid_generator_loss, sample_timesteps
from srkit.train.distill.cida import (
    CiDALoss,
    CiDASettings,
    DiscriminatorHead,
    RepaProjector,
    cida_generator_loss,
    discriminator_loss,
    feature_tokens,
    generator_adversarial_loss,
    repa_alignment_loss,
)
from srkit.train.distill.sid import (
    ScoreIdentityTerms,
    edm_fake_score_loss,
    reduce_loss,
    score_identity_loss,
    score_matching_loss,
    sid_generator_loss_edm,
    sid_generator_loss_vp,
    sid_generator_sigma,
    sid_weight_factor,
)
from srkit.train.distill.vp import EpsModel, PromptGuidance, drop_prompts, guided_x0, x0_from_eps

__all__ = [
    "CiDALoss",
    "CiDASettings",
    "CiDSettings",
    "DiscriminatorHead",
    "EpsModel",
    "PromptGuidance",
    "RepaProjector",
    "ScoreIdentityTerms",
    "cid_generator_loss",
    "cida_generator_loss",
    "discriminator_loss",
    "drop_prompts",
    "edm_fake_score_loss",
    "feature_tokens",
    "generator_adversarial_loss",
    "guided_x0",
    "reduce_loss",
    "repa_alignment_loss",
    "sample_timesteps",
    "score_identity_loss",
    "score_matching_loss",
    "sid_generator_loss_edm",
    "sid_generator_loss_vp",
    "sid_generator_sigma",
    "sid_weight_factor",
    "x0_from_eps",
]
