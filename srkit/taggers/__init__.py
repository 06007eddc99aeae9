"""Image taggers that turn an image into the tag prompt (and image tokens) of prompt-conditioned SR models.

Every tagger takes [0, 1] float images (B, 3, H, W); which image (the ×4-upsampled input or the raw LR) is the
caller's choice, because upstream methods differ.  `srkit.taggers.ram` holds RAM/DAPE; the prompt texts built from
tags are composed by `srkit.diffusion.text.compose_prompt`.
"""

from __future__ import annotations

from typing import Protocol

import torch


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
