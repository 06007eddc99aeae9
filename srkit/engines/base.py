"""The engine contract: one small class per published method, registered under the model names users type.

An engine only knows how to build its networks from resolved weight files (`from_weights`) and how to turn a
batch of RGB tensors in [0, 1] into upscaled tensors (`upscale`).  Reading images, tiling in pixel space, alpha,
bit depth, final resizing and writing are done around it by `srkit.api`, so no engine re-implements them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from srkit import registry

TilingSpace = Literal["pixel", "latent"]
Progress = Callable[[str, int, int], None]
"""(what, done, total): engines report sampler "steps" and latent "tiles"; the api reports pixel "tiles"."""


@dataclass(frozen=True)
class EngineSpec:
    """What a model is, independent of its weights: what `srkit models` prints and the api plans with."""

    name: str
    scale: int
    steps: int
    weights: tuple[str, ...]
    """Registry keys (weights.toml) the model needs, main checkpoint first."""
    licence: str
    description: str
    tiling: TilingSpace = "pixel"
    cuda_dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    stochastic: bool = False
    parts: tuple[str, ...] = ("other",)
    """Its network parts as `srkit.cpu_features` names them ("gan", "unet", "vae", ...): what `srkit info` lists
    with the dtype and CPU kernels each gets (the engine prepares each part under that name)."""


@dataclass
class EngineOptions:
    """Options every engine accepts; engines subclass this with their own typed fields (CLI `--name value` and
    `-O name=value`).  Values are checked when the options are built, before any weights are read."""

    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (one line, naming the option) for a bad value; subclasses extend it."""


@dataclass(frozen=True)
class WeightsSet:
    """Local files for a model: registry key -> path (a file, or a folder for diffusers-style bases).

    `resolve` (the api passes the registry's, with its offline and log settings) fetches a key that was not
    resolved up front: weights that only some checkpoints need (GenDR's checkpoint names its VAE)."""

    paths: dict[str, Path]
    resolve: Callable[[str], Path] | None = None

    def __getitem__(self, key: str) -> Path:
        if key not in self.paths and self.resolve is not None:
            self.paths[key] = self.resolve(key)
        try:
            return self.paths[key]
        except KeyError:
            raise KeyError(f"weights '{key}' were not resolved for this engine") from None


class Engine:
    """Base class of every engine. Subclasses set `options_class` and implement the two methods below."""

    spec: ClassVar[EngineSpec]
    options_class: ClassVar[type[EngineOptions]] = EngineOptions

    def __init__(self, device: torch.device, dtype: torch.dtype, options: EngineOptions) -> None:
        self.device = device
        self.dtype = dtype
        self.options = options
        self.notices: list[str] = []
        """One-line messages for the user about choices made while building (the api prints them)."""

    @classmethod
    def weights_for(cls, options: EngineOptions) -> tuple[str, ...]:
        """Registry keys to resolve for these options: the spec's, plus any an option brings in (ConsisSR's
        `--start gan` needs its GAN model's weights)."""
        return cls.spec.weights

    @classmethod
    def from_weights(
        cls, weights: WeightsSet, device: torch.device, dtype: torch.dtype, options: EngineOptions
    ) -> Engine:
        """Build the networks; the only place an engine reads files."""
        raise NotImplementedError

    def upscale(
        self, batch: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        """Tensor[B,3,h,w] in [0,1] on `self.device` -> Tensor[B,3,h*scale,w*scale] in [0,1].

        `progress(what, done, total)` is called per sampler step and per latent tile."""
        raise NotImplementedError

    def to_dtype(self, dtype: torch.dtype) -> None:
        """Switch precision in place (used for the fp32 retry after a NaN output on CUDA)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# Registry of model names.  Engine modules are imported lazily so that `import srkit` and the embedded GAN default
# never import diffusers/transformers.

_MODULES: dict[str, str] = {}
"""model name -> module that registers it (filled by `declare`)."""
_ENGINES: dict[str, tuple[type[Engine], EngineSpec]] = {}


def declare(module: str, *names: str) -> None:
    """Tell the registry which module registers which model names, without importing it."""
    for name in names:
        _MODULES[name] = module


def register(spec: EngineSpec):
    """Class decorator: register `cls` under `spec.name` (apply several times for several model names)."""

    def wrap(cls: type[Engine]) -> type[Engine]:
        _ENGINES[spec.name] = (cls, spec)
        return cls

    return wrap


def model_names() -> list[str]:
    """The built-in models (user models: `user_models`)."""
    return sorted(_MODULES)


def user_models() -> list[str]:
    """Your registry entries (not overrides of built-in ones) that name a model as their engine: each is a model
    of its own (`--model NAME`)."""
    reg = registry.load_registry()
    builtin = reg.builtin_names | _MODULES.keys()
    return sorted(n for n, e in reg.entries.items() if n not in builtin and e.engine in _MODULES)


def get_engine(name: str) -> tuple[type[Engine], EngineSpec]:
    """The engine class and spec of a model name, or of a user model; a clear error lists the known names."""
    if name not in _ENGINES:
        module = _MODULES.get(name)
        if module is None:
            return _user_model(name)
        importlib.import_module(module)
        if name not in _ENGINES:
            raise RuntimeError(f"module {module} did not register model '{name}'")
    return _ENGINES[name]


def _user_model(name: str) -> tuple[type[Engine], EngineSpec]:
    """A user entry run by the engine it names, with the entry as the main checkpoint (the engine's other weights
    come from their own entries).  The engine class reads the main checkpoint under its own key; the api
    resolves it from `spec.weights[0]`, the user's entry."""
    reg = registry.load_registry()
    entry = reg.entries.get(name)
    if entry is None or name in reg.builtin_names:
        known = ", ".join(model_names() + user_models())
        raise KeyError(f"unknown model '{name}'; known models: {known}")
    if entry.engine not in _MODULES:
        raise KeyError(f"'{name}' ({entry.where}) names engine '{entry.engine}', which is not a model; "
                       f"use one of: {', '.join(model_names())}")  # fmt: skip
    engine_class, spec = get_engine(entry.engine)
    description = f"your {entry.engine} model" + (f": {entry.notes}" if entry.notes else "")
    user_spec = dataclasses.replace(
        spec, name=name, weights=(name, *spec.weights[1:]), licence=entry.licence, description=description
    )
    return engine_class, user_spec


__all__ = [
    "Engine",
    "EngineOptions",
    "EngineSpec",
    "Progress",
    "WeightsSet",
    "declare",
    "get_engine",
    "model_names",
    "register",
    "user_models",
]
