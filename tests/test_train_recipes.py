"""The recipe table's contract, over every built recipe: settings that build with their defaults, a `build`, and a
released training setup the trainer and the dataset accept (no misspelt option waits for the first real run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from srkit.degrade.config import DegradationConfig
from srkit.train.recipes import TrainingSetup, built_recipes, describe_settings, recipe_module, training_setup
from srkit.train.trainer import TrainConfig


@pytest.mark.parametrize("name", built_recipes())
def test_every_built_recipe_has_settings_build_and_a_usable_training_setup(name):
    module = recipe_module(name)
    settings = module.SETTINGS()
    assert dataclasses.is_dataclass(settings) and callable(module.build)
    setup = training_setup(name)
    assert isinstance(setup, TrainingSetup)
    TrainConfig(out=Path("unused"), **setup.train)  # every key is a trainer option
    assert setup.crop % 4 == 0 and (setup.degradation is None or isinstance(setup.degradation, DegradationConfig))
    assert len(describe_settings(name).splitlines()) == len(dataclasses.fields(settings))
