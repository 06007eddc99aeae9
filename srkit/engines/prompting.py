"""Prompts of the tag-prompted SD engines (OSEDiff, NAOSD, GDPO-SR, SeeSR): image tags from a tagger (RAM / DAPE)
joined to the user's text exactly as each codebase composes them, then embedded by the SD text encoder.

Without a tagger the prompt is the same for every image and is embedded once when the engine is built (or read
from a precomputed embeddings file, which needs no text encoder); with one, each image's tags make its own prompt,
so the text encoder stays loaded.  `--tagger auto` (the default) uses DAPE when its weights are cached, as the
official scripts do, and otherwise says once what is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from srkit import registry
from srkit.diffusion.text import TextEncoder, compose_prompt, prompt_embeddings
from srkit.taggers import NO_TAGS_NOTICE, TAGGER_WEIGHTS, Tagger


def chosen_tagger(tagger: str, prompt_embeds: str | None = None) -> str:
    """`auto` -> dape when all its weights are cached, else none; a precomputed prompt has no room for tags."""
    if prompt_embeds is not None:
        if tagger in ("dape", "ram"):
            raise ValueError("a precomputed prompt_embeds file cannot take image tags; use --tagger none")
        return "none"
    if tagger != "auto":
        return tagger
    entries = registry.load_registry().entries
    cached = all(name in entries and registry.is_cached(entries[name]) for name in TAGGER_WEIGHTS["dape"])
    return "dape" if cached else "none"


@dataclass
class TagPrompter:
    """Prompt embeddings (B, 77, D) for a batch of tagged images; `added` follows the user text (SeeSR)."""

    user_prompt: str
    added: str = ""
    fixed: torch.Tensor | None = None
    """The one embedding used when there is no tagger."""
    tagger: Tagger | None = None
    encoder: Callable[[str], torch.Tensor] | None = None

    @classmethod
    def build(
        cls,
        tagger: Tagger | None,
        text_folder: Path,
        user_prompt: str,
        *,
        added: str = "",
        precomputed: str | None = None,
        precomputed_key: str = "prompt",
    ) -> TagPrompter:
        """With a tagger, prompts per image (the text encoder of `text_folder` stays loaded); without, the one
        prompt embedded now (or read from `precomputed`)."""
        if tagger is None:
            text = compose_prompt("", user_prompt, added)
            fixed = prompt_embeddings({precomputed_key: text}, folder=text_folder, precomputed=precomputed)
            return cls(user_prompt, added, fixed=fixed[precomputed_key])
        return cls(user_prompt, added, tagger=tagger, encoder=TextEncoder.from_folder(text_folder))

    def texts(self, tags: list[str]) -> list[str]:
        """The prompt text of each image's tags (what the text encoder reads)."""
        return [compose_prompt(t, self.user_prompt, self.added) for t in tags]

    def from_tags(self, tags: list[str]) -> torch.Tensor:
        """(B, 77, D): each image's prompt embedded."""
        return torch.cat([self.encoder(text) for text in self.texts(tags)]).clone()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings for the images the tagger looks at (the caller chooses them, as upstream differs)."""
        if self.tagger is None:
            return self.fixed
        return self.from_tags(self.tagger.tags(images))


def tag_notice(requested: str, chosen: str, precomputed: str | None = None) -> list[str]:
    """The one-line notice for an automatic choice that found no tagger (not for a chosen precomputed prompt)."""
    return [NO_TAGS_NOTICE] if requested == "auto" and chosen == "none" and precomputed is None else []


__all__ = ["TagPrompter", "chosen_tagger", "tag_notice"]
