"""What the Stable-Diffusion recipes share: the model folder they start from, the noise schedule and the fixed
prompts of its text side, optimiser groups, device moves and a self-contained export folder.

A recipe subclasses `SDRecipe`, builds its networks in `__init__` after calling the base, fills `self.groups`, and
writes its own networks in `export` inside `self.export_folder(folder)`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch

from srkit.common import atomic_folder
from srkit.diffusion.denoiser import Conditioning
from srkit.diffusion.loading import load_noise_schedule
from srkit.diffusion.text import prompt_embeddings


class SDRecipe:
    name: ClassVar[str]

    def __init__(
        self,
        base: str | Path,
        *,
        text_folder: str | Path | None,
        prompt_embeds: str | Path | None,
        prompts: Mapping[str, str],
        timesteps: Iterable[int],
    ) -> None:
        """`text_folder` (tokenizer, text encoder, scheduler) defaults to `base`; `prompts` are embedded once
        (or read from `prompt_embeds`); `timesteps` the recipe will use are range-checked before any network loads."""
        self.base = Path(base)
        text_side = Path(text_folder or self.base)
        self.scheduler_folder = text_side / "scheduler"
        self.schedule = load_noise_schedule(text_side)
        for t in timesteps:
            self.schedule.alpha_bar(t)
        self.embeddings = prompt_embeddings(prompts, folder=text_side, precomputed=prompt_embeds)
        self.groups: dict[str, dict[str, torch.nn.Parameter]] = {}

    def parameter_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return self.groups

    def condition(self, key: str) -> Conditioning:
        """The fixed prompt `key` as a denoiser's conditioning."""
        return Conditioning({"text": self.embeddings[key]})

    def to(self, device: torch.device) -> SDRecipe:
        """Every network attribute and the prompt embeddings to `device`."""
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        self.embeddings = {key: value.to(device) for key, value in self.embeddings.items()}
        return self

    @contextmanager
    def export_folder(self, folder: Path) -> Iterator[Path]:
        """An atomic export folder that already holds the scheduler config (self-contained: it loads, and a later
        recipe can start from it)."""
        with atomic_folder(folder) as partial:
            if self.scheduler_folder.is_dir():
                shutil.copytree(self.scheduler_folder, partial / "scheduler")
            yield partial


__all__ = ["SDRecipe"]
