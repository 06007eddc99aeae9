"""Training recipes as a table, like engines and metrics: one module per paper, each defining its settings (the
paper's hyper-parameters), the trainable parameters, the losses of one batch and the export in the format its engine
loads (see srkit/train/trainer.py for the contract).

A recipe module exposes `SETTINGS` (a dataclass with the paper's defaults) and
`build(settings, inputs: RecipeInputs) -> Recipe`, and may set `TRAIN_DEFAULTS` (trainer settings of its release,
e.g. a learning rate) that `srkit finetune` options override.  `srkit finetune --recipe NAME` and `srkit finetune --help` read
this table; planned recipes are listed with what they are waiting for.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from srkit.common import field_docs


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    module: str
    """Module defining `SETTINGS` and `build`; empty for a planned recipe."""
    description: str


@dataclass(frozen=True)
class RecipeInputs:
    """What `srkit finetune` hands every recipe besides its settings."""

    base: Path | None = None
    """The model to start from (a diffusers folder or an export); None: the recipe's registry default."""
    text: Path | None = None
    """A folder with tokenizer/text_encoder/scheduler; None: the recipe's registry default."""
    prompt_embeds: Path | None = None
    """Precomputed prompt embeddings instead of a text encoder."""
    offline: bool = False
    extras: Mapping[str, Any] = field(default_factory=dict)
    """Python-only hooks (gdpo: `reward_metrics`, callables replacing the named metrics)."""


RECIPES: dict[str, RecipeSpec] = {
    spec.name: spec
    for spec in (
        RecipeSpec("naosd", "srkit.train.recipes.naosd",
                   "NAOSD pre-training (GDPO-SR stage 1): one-step SD2.1 with noise injection, MSE + LPIPS + VSD"),
        RecipeSpec("gdpo", "srkit.train.recipes.gdpo",
                   "GDPO-SR: group preference optimisation of a NAOSD model with the ARF reward"),
        RecipeSpec("s3diff", "", "S3Diff training (DG-LoRA, GAN loss): planned"),
        RecipeSpec("consissr-clip", "", "ConsisSR stage 1 (CLIP distillation): planned"),
        RecipeSpec("consissr", "", "ConsisSR stage 2 (TALA): planned"),
        RecipeSpec("rfsr", "srkit.train.recipes.rfsr",
                   "RFSR: timestep-aware reward feedback (structure early, rewards + Gram late) for SeeSR/ConsisSR"),
        RecipeSpec("vae16", "", "SD2.1 UNet adapted to the 16-channel VAE (GenDR's teacher): planned"),
    )
}  # fmt: skip


def local_or_registry(path: Path | None, entry: str, offline: bool) -> Path:
    """`path` when given, else the registry entry's local copy (pulled unless offline)."""
    if path is not None:
        return path
    from srkit import registry

    return registry.resolve(entry, offline=offline)


def built_recipes() -> list[str]:
    return [name for name, spec in RECIPES.items() if spec.module]


def recipe_module(name: str) -> ModuleType:
    """The module of a built recipe; a clear error for planned and unknown names."""
    spec = RECIPES.get(name)
    if spec is None:
        raise ValueError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}")
    if not spec.module:
        raise ValueError(
            f"recipe '{name}' is not built yet in this version of srkit (built: {', '.join(built_recipes())})"
        )
    return importlib.import_module(spec.module)


def describe_settings(name: str) -> str:
    """One line per hyper-parameter: its default (the paper's or the release's) and where it comes from, for
    --help (the field's docstring, first sentence)."""
    settings = recipe_module(name).SETTINGS
    docs = field_docs(settings)
    lines = []
    for fld in dataclasses.fields(settings):
        value = str(fld.default if fld.default is not dataclasses.MISSING else fld.default_factory())
        value = value if len(value) <= 40 else value[:37] + "..."
        doc = docs.get(fld.name, "").split(". ")[0].rstrip(".")
        lines.append(f"{fld.name}={value}" + (f" ({doc})" if doc else ""))
    return "\n".join(lines)


__all__ = [
    "RECIPES",
    "RecipeInputs",
    "RecipeSpec",
    "built_recipes",
    "describe_settings",
    "local_or_registry",
    "recipe_module",
]
