"""REPA's target side (Yu et al. 2024, "Representation Alignment"): a frozen self-supervised vision encoder whose
patch tokens a diffusion UNet's intermediate features are aligned to, and the hook that reads those features.

GenDR uses REPA twice (notes/gendr-cid.md A.1, A.5): to build its SD2.1-VAE16 teacher (`srkit finetune --recipe
vae16`) and as CiDA's regulariser on the one-step generator (`srkit distill --recipe cida`). The paper names the
encoder only as "e.g. DINOv2"; srkit's default is DINOv2 ViT-B/14 (registry `dinov2-vitb14`, REPA's usual choice)
[proposal]. Any transformers DINOv2 folder works (`-O repa_encoder=FOLDER`), which is also how tests plug in a
tiny randomly initialised one.

The encoder sees the HR image resized so that its patch grid equals the UNet feature grid (32×32 tokens for a
512-px crop read after the UNet's first down block: 448 px for patch 14) after ImageNet normalisation [proposal].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPA_ENCODER = "dinov2-vitb14"
"""Registry entry of the default REPA encoder."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepaEncoder(nn.Module):
    """A frozen DINOv2 (transformers `Dinov2Model`): images in [0, 1] → (B, h·w, D) patch tokens on an h×w grid."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.patch = int(model.config.patch_size)
        self.dim = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_folder(cls, folder: str | Path) -> RepaEncoder:
        from transformers import Dinov2Model

        return cls(Dinov2Model.from_pretrained(str(folder), local_files_only=True))

    def train(self, mode: bool = True) -> RepaEncoder:
        """Always in eval mode: it is a fixed target."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = (grid[0] * self.patch, grid[1] * self.patch)
        pixels = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        pixels = (pixels.clamp(0, 1) - self.mean) / self.std
        tokens = self.model(pixel_values=pixels.to(next(self.model.parameters()).dtype)).last_hidden_state
        return tokens[:, -grid[0] * grid[1] :].float()  # the patch tokens follow the CLS (and register) tokens


def load_repa_encoder(source: str, offline: bool = False) -> RepaEncoder:
    """The encoder from a local transformers folder, or from the registry entry of that name (one-line error when
    it is not cached and cannot be fetched)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        from srkit import registry

        path = registry.resolve(source, offline=offline)
    return RepaEncoder.from_folder(path)


@contextmanager
def module_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect `module`'s outputs (the first element of a tuple output: a diffusers down block returns
    (hidden states, skip connections)) during the block, with their graph."""
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


__all__ = ["REPA_ENCODER", "RepaEncoder", "load_repa_encoder", "module_output"]
