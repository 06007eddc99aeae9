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
from typing import TYPE_CHECKING, ClassVar

from srkit.engines.catalogue import CATALOGUE, EngineSpec, TilingSpace, describe, model_names, user_models
from srkit.engines.options import EngineOptions

if TYPE_CHECKING:  # the contract is readable, and the catalogue usable, before PyTorch loads
    import torch

Progress = Callable[[str, int, int], None]
"""(what, done, total): engines report sampler "steps" and latent "tiles"; the api reports pixel "tiles"."""


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
    """Base class of every engine.  Subclasses implement the two methods below; `register` gives each its spec and
    options class from the catalogue."""

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
# Model name -> engine class.  Engine modules are imported on first use, so that `import srkit` and the embedded GAN
# default never import diffusers/transformers.

_ENGINES: dict[str, type[Engine]] = {}


def register(name: str):
    """Class decorator: `cls` runs the catalogue's model `name`, with that model's spec and options class."""

    def wrap(cls: type[Engine]) -> type[Engine]:
        model = CATALOGUE[name]
        cls.spec, cls.options_class = model.spec, model.options
        _ENGINES[name] = cls
        return cls

    return wrap


def get_engine(name: str) -> tuple[type[Engine], EngineSpec]:
    """The engine class and spec of a model name, or of a user model; a clear error lists the known names."""
    engine_name, model = describe(name)
    if engine_name not in _ENGINES:
        importlib.import_module(model.module)
        if engine_name not in _ENGINES:
            raise RuntimeError(f"module {model.module} did not register model '{engine_name}'")
    return _ENGINES[engine_name], model.spec


__all__ = [
    "Engine",
    "EngineOptions",
    "EngineSpec",
    "Progress",
    "TilingSpace",
    "WeightsSet",
    "get_engine",
    "model_names",
    "register",
    "user_models",
]
