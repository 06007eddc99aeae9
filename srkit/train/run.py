"""`srkit finetune`'s and `srkit distill`'s body: build a recipe from the table by name, the degraded-HR dataset and
the trainer; train.

Kept out of the CLI (which only parses) so that Python users and tests call the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srkit.common import build_options
from srkit.train.data import DegradedHRDataset
from srkit.train.recipes import RecipeInputs, recipe_module, training_setup
from srkit.train.trainer import TrainConfig, Trainer


def finetune(
    recipe: str,
    *,
    data: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    text: str | Path | None = None,
    prompt_embeds: str | Path | None = None,
    crop: int | None = None,
    config: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    device: str = "auto",
    offline: bool = False,
    reward_metrics: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] | None = None,
    command: str | None = None,
) -> Path:
    """Train `recipe` on the HR images in `data`; returns the exported model folder (load with --weights).

    `crop` and the `config` entries (TrainConfig fields) left out take the recipe's released values
    (`TrainingSetup`), then the trainer's defaults.  `reward_metrics` (gdpo, Python only) replaces the metrics
    named by the `reward_metrics` setting. `command` ("finetune" or "distill") refuses the other command's recipes.
    """
    module = recipe_module(recipe, command)
    values = build_options(module.SETTINGS, settings or {}, owner=f"recipe '{recipe}'")
    setup = training_setup(recipe)
    train_config = TrainConfig(out=Path(out), **{**setup.train, **(config or {})})
    torch.manual_seed(train_config.seed)  # the same initial weights (LoRA, heads) in every process and every run
    dataset = DegradedHRDataset(data, crop=crop or setup.crop, scale=4, seed=train_config.seed,
                                config=setup.degradation, hflip=setup.hflip, degrade=setup.degrade)
    inputs = RecipeInputs(
        base=Path(base) if base else None,
        text=Path(text) if text else None,
        prompt_embeds=Path(prompt_embeds) if prompt_embeds else None,
        offline=offline,
        extras={"reward_metrics": reward_metrics} if reward_metrics is not None else {},
    )
    return Trainer(module.build(values, inputs), dataset, train_config, device=device).train()
