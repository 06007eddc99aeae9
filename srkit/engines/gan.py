"""Real-ESRGAN family through spandrel: x4plus (the embedded default), RealESRNet, anime 6B, x2plus,
animevideov3 and general-x4v3 with denoise-strength weight interpolation (DNI) against its wdn twin.

spandrel recognises each checkpoint from its keys, builds the network, and loads `.pth` files with a restricted
unpickler (never arbitrary objects).  The engine adds only what spandrel lacks: DNI and dtype handling; tiling,
alpha, gray and bit depth are the api's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from spandrel import ImageModelDescriptor, ModelLoader

from srkit.diffusion.runtime import module_dtype, prepare_module
from srkit.engines.base import Engine, EngineOptions, EngineSpec, Progress, WeightsSet, register

BSD = "BSD-3-Clause"


@dataclass
class GanOptions(EngineOptions):
    """A feed-forward GAN has no options of its own (only the seed every engine accepts)."""


@dataclass
class DenoiseOptions(GanOptions):
    """realesr-general-x4v3, the one GAN with a twin to blend with, so the only one that takes a strength."""

    denoise_strength: float = 0.5
    """1 = the strong-denoise model, 0 = its weak-denoise (wdn) twin."""

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.denoise_strength <= 1.0:
            raise ValueError(f"--denoise-strength must be in [0, 1], got {self.denoise_strength}")


def _spec(name: str, scale: int, description: str, weights: tuple[str, ...] | None = None) -> EngineSpec:
    return EngineSpec(
        name=name,
        scale=scale,
        steps=1,
        weights=weights or (name,),
        licence=BSD,
        description=description,
        parts=("gan",),
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a `.pth` (restricted unpickling) or `.safetensors` file, unwrapped from params_ema/params."""
    return ModelLoader().load_state_dict_from_file(path)


def interpolate_state_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight_a: float) -> dict:
    """DNI: weight_a·a + (1−weight_a)·b, key by key (the networks must share one architecture)."""
    if a.keys() != b.keys():
        raise ValueError("cannot interpolate checkpoints of different architectures")
    return {k: weight_a * a[k].float() + (1 - weight_a) * b[k].float() for k in a}


class GanEngine(Engine):
    """Feed-forward SR network: one call per tile, no randomness."""

    options_class = GanOptions

    def __init__(self, descriptor: ImageModelDescriptor, device, dtype, options: GanOptions) -> None:
        super().__init__(device, dtype, options)
        if descriptor.scale != self.spec.scale:
            raise ValueError(
                f"the checkpoint is a x{descriptor.scale} model, but '{self.spec.name}' is x{self.spec.scale}"
            )
        self.descriptor = descriptor.eval()
        self.to_dtype(dtype)

    @classmethod
    def from_weights(cls, weights: WeightsSet, device, dtype, options: GanOptions) -> GanEngine:
        state = load_state_dict(weights[cls.spec.weights[0]])
        if isinstance(options, DenoiseOptions) and options.denoise_strength != 1.0:
            twin = load_state_dict(weights[cls.spec.weights[1]])
            state = interpolate_state_dicts(state, twin, options.denoise_strength)
        return cls(ModelLoader().load_from_state_dict(state), device, dtype, options)

    def to_dtype(self, dtype: torch.dtype) -> None:
        # The dtype and CPU kernels chosen for GAN nets (srkit/cpu_features.py): bf16 + channels-last where measured.
        prepare_module(self.descriptor.model, self.device, dtype, part="gan")
        self.dtype = dtype

    @torch.inference_mode()
    def upscale(
        self, batch: torch.Tensor, *, generator: torch.Generator | None = None, progress: Progress | None = None
    ) -> torch.Tensor:
        # One network call: nothing to report (the api reports its pixel tiles).
        # The descriptor pads to the network's size rules (x2plus needs even sides), runs, clamps and crops.
        return self.descriptor(batch.to(self.device, module_dtype(self.descriptor.model)))


_MODELS = [
    ("realesrgan-x4plus", 4, "Real-ESRGAN x4plus: general photos (RRDBNet 23 blocks); the embedded default", None),
    ("realesrnet-x4plus", 4, "RealESRNet x4plus: the L1-only stage, smoother and more faithful", None),
    ("realesrgan-x4plus-anime-6b", 4, "Real-ESRGAN anime 6B: illustrations (RRDBNet 6 blocks)", None),
    ("realesrgan-x2plus", 2, "Real-ESRGAN x2plus: general photos at 2x", None),
    ("realesr-animevideov3", 4, "realesr-animevideov3: fast compact net for anime video frames", None),
    (
        "realesr-general-x4v3",
        4,
        "realesr-general-x4v3: small, fast general model; --denoise-strength 0..1",
        ("realesr-general-x4v3", "realesr-general-wdn-x4v3"),
    ),
]

for _name, _scale, _description, _weights in _MODELS:
    _spec_value = _spec(_name, _scale, _description, _weights)
    _attributes = {"spec": _spec_value, "options_class": DenoiseOptions if _weights else GanOptions}
    register(_spec_value)(type(f"Gan_{_name.replace('-', '_')}", (GanEngine,), _attributes))
