"""Real-ESRGAN family through spandrel: x4plus (the embedded default), RealESRNet, anime 6B, x2plus,
animevideov3 and general-x4v3 with denoise-strength weight interpolation (DNI) against its wdn twin.

spandrel recognises each checkpoint from its keys, builds the network, and loads `.pth` files with a restricted
unpickler (never arbitrary objects).  The engine adds only what spandrel lacks: DNI and dtype handling; tiling,
alpha, gray and bit depth are the api's job.
"""

from __future__ import annotations

from pathlib import Path

import torch
from spandrel import ImageModelDescriptor, ModelLoader

from srkit.diffusion.runtime import module_dtype, prepare_module
from srkit.engines.base import Engine, Progress, WeightsSet, register
from srkit.engines.catalogue import CATALOGUE
from srkit.engines.options import DenoiseOptions, GanOptions


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


for _name, _model in CATALOGUE.items():
    if _model.module == __name__:
        register(_name)(type(f"Gan_{_name.replace('-', '_')}", (GanEngine,), {}))
