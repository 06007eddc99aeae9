"""GenDR's CiDA (arXiv 2503.06790 §4.3, Eq. 11, §5.1): the CiD recipe (cid.py) with the paper's CiDA weights,
λ₁ = 10 for the first 10k steps then 1, λ₂ = 0.01 (adversarial head on the real score's features) and λ₃ = 0.1
(REPA alignment of the generator with DINOv2 tokens of the HR image). This is how the paper trains GenDR."""

from __future__ import annotations

from srkit.train.recipes import RecipeInputs
from srkit.train.recipes.cid import TRAINING, GenDRDistillRecipe, GenDRDistillSettings
from srkit.train.recipes.cid import build as build_cid

SETTINGS = GenDRDistillSettings


def build(settings: GenDRDistillSettings, inputs: RecipeInputs) -> GenDRDistillRecipe:
    return build_cid(settings, inputs, name="cida")


__all__ = ["SETTINGS", "TRAINING", "build"]
