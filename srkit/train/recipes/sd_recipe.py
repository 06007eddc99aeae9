"""What the Stable-Diffusion recipes share: the model folder they start from, the noise schedule and the fixed
prompts of its text side, optimiser groups, device moves and a self-contained export folder.

A recipe subclasses `SDRecipe` (setting `name`, the `engine` that runs its export and a `licence` note),
builds its networks in `__init__` after calling the base, fills `self.groups`, and writes its own networks in
`export` inside `self.export_folder(folder)`.  That folder also gets the export config
(srkit.registry.EXPORT_CONFIG), so `srkit weights add NAME --path EXPORT` needs nothing more.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch

from srkit import registry
from srkit.common import atomic_folder
from srkit.diffusion.denoiser import Conditioning
from srkit.diffusion.loading import load_noise_schedule
from srkit.diffusion.text import prompt_embeddings
from srkit.train.recipes import TextSide

PERCEPTUAL_NETWORK = "a perceptual loss (LPIPS-VGG)"
REPA_NETWORK = "an encoder (DINOv2)"


def require_network(weight: float, network: object, term: str, network_name: str, setting: str) -> None:
    """A loss term with a positive weight needs its network (passed in, so tests can give a small one): refuse
    with one line, naming what to pass or which weight to zero, before any network loads."""
    if weight > 0 and network is None:
        raise ValueError(f"{term} needs {network_name}; pass one or set {setting} 0")


class SDRecipe:
    name: ClassVar[str]
    engine: ClassVar[str]
    """The model (`--model`) that runs this recipe's export."""
    licence: ClassVar[str]
    """Licence note of the export when its base names none (weights trained from a base carry the base's terms)."""

    def __init__(
        self,
        base: str | Path,
        *,
        text: TextSide,
        prompts: Mapping[str, str],
        timesteps: Iterable[int],
    ) -> None:
        """`text.folder` (tokenizer, text encoder, scheduler) defaults to `base`; `prompts` are embedded once (or
        read from `text.prompt_embeds`); `timesteps` the recipe will use are range-checked before any network
        loads."""
        self.base = Path(base)
        text_side = Path(text.folder or self.base)
        self.scheduler_folder = text_side / "scheduler"
        self.schedule = load_noise_schedule(text_side)
        for t in timesteps:
            self.schedule.alpha_bar(t)
        self.embeddings = prompt_embeddings(prompts, folder=text_side, precomputed=text.prompt_embeds)
        self.groups: dict[str, dict[str, torch.nn.Parameter]] = {}
        base_licence = registry.read_export_config(self.base).get("licence")  # a base that is an export
        self.export_config = {"engine": self.engine, "recipe": self.name, "base": str(self.base.absolute()),
                              "licence": base_licence or self.licence, "format": "diffusers-folder"}  # fmt: skip

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
        recipe can start from it) and the export config."""
        with atomic_folder(folder) as partial:
            if self.scheduler_folder.is_dir():
                shutil.copytree(self.scheduler_folder, partial / "scheduler")
            registry.write_export_config(partial, self.export_config)
            yield partial


__all__ = ["PERCEPTUAL_NETWORK", "REPA_NETWORK", "SDRecipe", "require_network"]
