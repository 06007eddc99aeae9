"""GenDR's CiDA (arXiv 2503.06790 §4.3, Eq. 11, §5.1): the CiD recipe (cid.py) with the paper's CiDA weights,
λ₁ = 10 for the first 10k steps then 1, λ₂ = 0.01 (adversarial head on the real score's features) and λ₃ = 0.1
(REPA alignment of the generator with DINOv2 tokens of the HR image). This is how the paper trains GenDR."""

from __future__ import annotations

from dataclasses import dataclass

from srkit.train.recipes import RecipeInputs
from srkit.train.recipes.cid import TRAIN_DEFAULTS, CiDRecipeSettings, GenDRDistillRecipe
from srkit.train.recipes.cid import build as build_cid


@dataclass
class CiDARecipeSettings(CiDRecipeSettings):
    lambda_cid: float = 10.0
    """λ₁ for the first lambda_cid_steps steps [paper §5.1: 10]."""
    lambda_cid_final: float = 1.0
    """λ₁ afterwards [paper §5.1: 1]."""
    lambda_adv: float = 0.01
    """λ₂, adversarial term; 0: off [paper §5.1: 0.01]."""
    lambda_repa: float = 0.1
    """λ₃, REPA term on the generator; 0: off [paper §5.1: 0.1]."""


SETTINGS = CiDARecipeSettings


def build(settings: CiDARecipeSettings, inputs: RecipeInputs) -> GenDRDistillRecipe:
    return build_cid(settings, inputs, name="cida")


__all__ = ["SETTINGS", "TRAIN_DEFAULTS", "CiDARecipeSettings", "build"]
