"""`srkit finetune`'s body: build a recipe from names and paths, the degraded-HR dataset and the trainer; train.

Kept out of the CLI (which only parses) so that Python users and tests call the same thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from srkit.engines.base import build_options
from srkit.train.data import DegradedHRDataset
from srkit.train.trainer import TrainConfig, Trainer

RECIPES = ("naosd", "gdpo")
PLANNED = ("s3diff", "rfsr", "consissr")


def settings_class(recipe: str) -> type:
    if recipe == "naosd":
        from srkit.train.recipes.naosd import NAOSDSettings

        return NAOSDSettings
    if recipe == "gdpo":
        from srkit.train.recipes.gdpo import GDPOSettings

        return GDPOSettings
    if recipe in PLANNED:
        raise ValueError(f"recipe '{recipe}' is not built yet in this version of srkit (built: {', '.join(RECIPES)})")
    raise ValueError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPES + PLANNED)}")


def describe_settings(recipe: str) -> str:
    """One line per hyper-parameter with its default (the paper's), for --help and `srkit finetune --list`."""
    lines = []
    for field in dataclasses.fields(settings_class(recipe)):
        value = str(field.default)
        lines.append(f"{field.name}={value if len(value) <= 40 else value[:37] + '...'}")
    return "\n".join(lines)


def finetune(
    recipe: str,
    *,
    data: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    text: str | Path | None = None,
    prompt_embeds: str | Path | None = None,
    crop: int = 512,
    config: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    device: str = "auto",
    offline: bool = False,
    reward_metrics: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] | None = None,
) -> Path:
    """Train `recipe` on the HR images in `data`; returns the exported model folder (load with --weights).

    `reward_metrics` (gdpo, Python only) replaces the metrics named by the `reward_metrics` setting.
    """
    from srkit import registry

    values = build_options(settings_class(recipe), settings or {})
    train_config = TrainConfig(out=Path(out), **(config or {}))
    dataset = DegradedHRDataset(data, crop=crop, scale=4, seed=train_config.seed)
    if text is None and prompt_embeds is None:  # both recipes read SD2.1's scheduler and prompts from it
        text = registry.resolve("sd21-text", offline=offline)
    if recipe == "naosd":
        from srkit.train.perceptual import lpips_vgg
        from srkit.train.recipes.naosd import NAOSDRecipe

        base = Path(base) if base else registry.resolve("sd21-base", offline=offline)
        perceptual = lpips_vgg() if values.lambda_lpips > 0 else None
        built = NAOSDRecipe(base, values, text_folder=text, prompt_embeds=prompt_embeds, perceptual=perceptual)
    else:
        from srkit.train.recipes.gdpo import GDPORecipe

        if base is None:
            raise ValueError("gdpo starts from a NAOSD model: pass --base DIR (the export of `srkit finetune "
                             "--recipe naosd`, or a merged NAOSD/GDPO diffusers folder)")
        built = GDPORecipe(base, values, text_folder=text, prompt_embeds=prompt_embeds, metrics=reward_metrics)
    return Trainer(built, dataset, train_config, device=device).train()
