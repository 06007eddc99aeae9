"""The engine contract: one small class per published method, registered under the model names users type.

An engine only knows how to build its networks from resolved weight files (`from_weights`) and how to turn a
batch of RGB tensors in [0, 1] into upscaled tensors (`upscale`).  Reading images, tiling in pixel space, alpha,
bit depth, final resizing and writing are done around it by `srkit.api`, so no engine re-implements them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

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
    """Local files for a model: registry key -> path (a file, or a folder for diffusers-style bases)."""

    paths: dict[str, Path]

    def __getitem__(self, key: str) -> Path:
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
    return sorted(_MODULES)


def get_engine(name: str) -> tuple[type[Engine], EngineSpec]:
    """The engine class and spec of a model name; a clear error lists the known names."""
    if name not in _ENGINES:
        module = _MODULES.get(name)
        if module is None:
            known = ", ".join(model_names())
            raise KeyError(f"unknown model '{name}'; known models: {known}")
        importlib.import_module(module)
        if name not in _ENGINES:
            raise RuntimeError(f"module {module} did not register model '{name}'")
    return _ENGINES[name]


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
]
