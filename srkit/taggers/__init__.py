"""Image taggers that turn an image into the tag prompt (and image tokens) of prompt-conditioned SR models.

Every tagger takes [0, 1] float images (B, 3, H, W); which image (the ×4-upsampled input or the raw LR) is the
caller's choice, because upstream methods differ.  `srkit.taggers.ram` holds RAM/DAPE; the prompt texts built from
tags are composed by `srkit.diffusion.text.compose_prompt`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from srkit.common import check_choice

TAGGER_WEIGHTS: dict[str, tuple[str, ...]] = {
    "dape": ("ram-swin-large-14m", "ram-tag-list", "ram-tag-thresholds", "dape"),
    "ram": ("ram-swin-large-14m", "ram-tag-list", "ram-tag-thresholds"),
    "none": (),
}
"""Registry entries each tagger reads."""
NO_TAGS_NOTICE = (
    "no tagger weights cached: prompting without image tags (the model was trained with DAPE tags, so expect "
    "fewer object-specific details); `srkit weights pull dape` enables them"
)


class Tagger(Protocol):
    def tags(self, images: torch.Tensor) -> list[str]:
        """One tag string per image, names joined as the method's prompts use them ("" when nothing fires)."""
        ...

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """The image tokens a model may cross-attend to (RAM: (B, 145, 512), what SeeSR uses)."""
        ...

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) class logits before the thresholds, for inspection and tests."""
        ...


def build_tagger(kind: str, weights: Mapping[str, Path], device: torch.device) -> Tagger | None:
    """The tagger `kind` (dape or ram) from its resolved registry files, on `device`; None for none."""
    check_choice(kind, ("none", *TAGGER_WEIGHTS), "tagger")
    if kind == "none":
        return None
    from srkit.taggers.ram_weights import load_ram_tagger

    return load_ram_tagger(
        weights["ram-swin-large-14m"],
        weights["ram-tag-list"],
        weights["ram-tag-thresholds"],
        weights["dape"] if kind == "dape" else None,
        device=device,
    )
