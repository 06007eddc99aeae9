"""Training recipes as a table, like engines and metrics: one module per paper, each defining its settings (the
paper's hyper-parameters), the trainable parameters, the losses of one batch and the export in the format its engine
loads (see srkit/train/trainer.py for the contract).

A recipe module exposes `SETTINGS` (a dataclass with the paper's defaults; the docstring under a field says where
its value comes from) and `build(settings, inputs: RecipeInputs) -> Recipe`, and may expose `TRAINING` (a
`TrainingSetup`: the released optimisation and data settings, used where the user gives none).
`srkit finetune --recipe NAME` / `srkit distill --recipe NAME` and their --help read this table; planned recipes
are listed with what they are waiting for.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from srkit.common import field_docs
from srkit.degrade.config import DegradationConfig


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    module: str
    """Module defining `SETTINGS` and `build`; empty for a planned recipe."""
    description: str
    command: str = "finetune"
    """The CLI command that runs it: "finetune" or "distill"."""


@dataclass(frozen=True)
class TrainingSetup:
    """A recipe's released training setup: what `srkit finetune` uses for every option the user leaves out."""

    train: Mapping[str, Any] = field(default_factory=dict)
    """TrainConfig fields (lr, batch_size, grad_accum, steps, max_grad_norm, weight_decay, checkpoint_every)."""
    crop: int = 512
    """HR crop side."""
    degradation: DegradationConfig | None = None
    """The LR synthesis; None: Real-ESRGAN's published values (DegradationConfig's defaults)."""
    hflip: bool = False
    """Mirror half of the crops."""
    degrade: bool = True
    """False: the recipe reads HR crops alone (a text-to-image base), so no LR is synthesised."""
    source: str = ""
    """Where the values come from (shown in --help)."""


@dataclass(frozen=True)
class TextSide:
    """Where a recipe's fixed prompts are embedded: a folder with tokenizer/text_encoder/scheduler (None: the base
    folder), or precomputed embeddings (the scheduler then still comes from the folder)."""

    folder: Path | None = None
    prompt_embeds: Path | None = None


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

    def text_side(self, registry_entry: str | None) -> TextSide:
        """--text/--prompt-embeds as given; without either, the registry's `registry_entry` (None: the base's own
        text side)."""
        folder = self.text
        if registry_entry is not None and self.prompt_embeds is None:
            folder = local_or_registry(self.text, registry_entry, self.offline)
        return TextSide(folder, self.prompt_embeds)


RECIPES: dict[str, RecipeSpec] = {
    spec.name: spec
    for spec in (
        RecipeSpec("naosd", "srkit.train.recipes.naosd",
                   "NAOSD pre-training (GDPO-SR stage 1): one-step SD2.1 with noise injection, MSE + LPIPS + VSD"),
        RecipeSpec("gdpo", "srkit.train.recipes.gdpo",
                   "GDPO-SR: group preference optimisation of a NAOSD model with the ARF reward"),
        RecipeSpec("s3diff", "srkit.train.recipes.s3diff",
                   "S3Diff: degradation-guided LoRA on SD-Turbo, MSE + LPIPS + vision-aided GAN, online negative "
                   "prompting; upstream bugs fixed: #25 (the generator step leaves no gradient in the "
                   "discriminator), #27 (degradations drawn per sample), #31 (the degradation score always "
                   "describes the input)"),
        RecipeSpec("consissr-clip", "srkit.train.recipes.consissr_clip",
                   "ConsisSR stage 1: the CLIP visual tower tuned so LQ features match a frozen copy's HQ features"),
        RecipeSpec("consissr", "srkit.train.recipes.consissr",
                   "ConsisSR stage 2: ControlNet + HPA with the timestep-aware latent augmentation (TALA)"),
        RecipeSpec("rfsr", "srkit.train.recipes.rfsr",
                   "RFSR: timestep-aware reward feedback (structure early, rewards + Gram late) for SeeSR/ConsisSR"),
        RecipeSpec("vae16", "srkit.train.recipes.vae16",
                   "GenDR's teacher: an SD2.1 UNet adapted to the 16-channel VAE vae-kl-f8-d16 with REPA"),
        RecipeSpec("cid", "srkit.train.recipes.cid",
                   "GenDR's CiD: one-step student by consistent score identity distillation", "distill"),
        RecipeSpec("cida", "srkit.train.recipes.cida",
                   "GenDR's CiDA: CiD + adversarial head + REPA alignment (the paper's GenDR)", "distill"),
    )
}  # fmt: skip


def local_or_registry(path: Path | None, entry: str, offline: bool) -> Path:
    """`path` when given, else the registry entry's local copy (pulled unless offline: `offline` or
    SRKIT_OFFLINE=1)."""
    if path is not None:
        return path
    from srkit import registry

    return registry.resolve(entry, offline=offline or None)


def built_recipes(command: str | None = None) -> list[str]:
    """Built recipes, those of one CLI command when given."""
    return [name for name, spec in RECIPES.items() if spec.module and command in (None, spec.command)]


def recipe_names(command: str) -> list[str]:
    """Every recipe of a CLI command, built or planned."""
    return [name for name, spec in RECIPES.items() if spec.command == command]


def recipe_module(name: str, command: str | None = None) -> ModuleType:
    """The module of a built recipe; a clear error for planned and unknown names, and for a recipe of the other
    command (`command`: the one it is run from)."""
    return importlib.import_module(check_recipe(name, command).module)


def check_recipe(name: str, command: str | None = None) -> RecipeSpec:
    """The spec of a built recipe run from `command`, or a one-line ValueError; no recipe module (and no PyTorch)
    is imported, so the command line refuses a wrong name at once."""
    spec = RECIPES.get(name)
    if spec is None:
        raise ValueError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}")
    if command is not None and spec.command != command:
        raise ValueError(f"recipe '{name}' is run by `srkit {spec.command}`, not `srkit {command}`")
    if not spec.module:
        raise ValueError(
            f"recipe '{name}' is not built yet in this version of srkit (built: {', '.join(built_recipes())})"
        )
    return spec


def describe_settings(name: str) -> str:
    """One line per hyper-parameter: its default (the paper's or the release's) and where it comes from, for
    --help (the field's docstring, first sentence: a period followed by a capital letter ends it, so "Eq. 8"
    does not)."""
    settings = recipe_module(name).SETTINGS
    docs = field_docs(settings)
    lines = []
    for fld in dataclasses.fields(settings):
        value = str(fld.default if fld.default is not dataclasses.MISSING else fld.default_factory())
        value = value if len(value) <= 40 else value[:37] + "..."
        doc = re.split(r"\.\s+(?=[A-Z])", docs.get(fld.name, ""), maxsplit=1)[0].rstrip(".")
        lines.append(f"{fld.name}={value}" + (f" ({doc})" if doc else ""))
    return "\n".join(lines)


def training_setup(name: str) -> TrainingSetup:
    """The recipe's released training setup (the trainer's defaults when it states none)."""
    return getattr(recipe_module(name), "TRAINING", TrainingSetup())


def describe_training(name: str) -> str:
    """The released optimisation and data settings of a recipe in one line, for --help."""
    setup = training_setup(name)
    if not setup.train and not setup.source:
        return ""
    values = {**setup.train, "crop": setup.crop, "hflip": setup.hflip}
    if setup.degradation is not None:
        values["degradation"] = "Real-ESRGAN's values but " + " ".join(_changes(setup.degradation, DegradationConfig()))
    text = ", ".join(f"{key}={value}" for key, value in values.items())
    return text + (f" ({setup.source})" if setup.source else "")


def _changes(config: Any, default: Any) -> list[str]:
    """`key=value` for every field of a settings dataclass that differs from `default`, nested ones as a.b."""
    changed = []
    for fld in dataclasses.fields(config):
        value, base = getattr(config, fld.name), getattr(default, fld.name)
        if dataclasses.is_dataclass(value):
            changed += [f"{fld.name}.{part}" for part in _changes(value, base)]
        elif value != base:
            changed.append(f"{fld.name}={value}")
    return changed


__all__ = [
    "RECIPES",
    "RecipeInputs",
    "RecipeSpec",
    "TextSide",
    "TrainingSetup",
    "built_recipes",
    "check_recipe",
    "describe_settings",
    "describe_training",
    "local_or_registry",
    "recipe_module",
    "recipe_names",
    "training_setup",
]
