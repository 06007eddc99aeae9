"""Prompt embeddings, computed once per engine (never per image), and prompt composition as upstream writes it.

A precomputed `.safetensors` file can stand in for the text encoder (tests, or machines without it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from srkit.diffusion.loading import SDLoadError, has_text_encoder, require_part
from srkit.option_values import QUALITY_PROMPT

PROMPT_KEY = "prompt"
"""Key of the positive prompt in a precomputed embeddings file of the OSEDiff family."""
NEGATIVE_KEY = "neg"
"""Key of the negative prompt in a precomputed embeddings file."""


def compose_prompt(tags: str, prompt: str, added: str = "") -> str:
    """Upstream's prompt text, byte for byte (the text encoder sees every comma): `"{tags}, {prompt},"` for
    OSEDiff / NAOSD / GDPO-SR (no tags, no prompt: ", ,"), with SeeSR's `added` prompt right after the comma."""
    return f"{tags}, {prompt},{added}"


class TextEncoder:
    """Tokenizer + CLIP text model of a diffusers folder: prompt -> last hidden state (1, max_length, D).

    Padding to the tokenizer's max length (77) with truncation and no attention mask, as SD pipelines and the
    one-step SR repos do.
    """

    def __init__(self, tokenizer, model) -> None:
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextEncoder:
        from transformers import AutoTokenizer, CLIPTextModel

        require_part(folder, "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
        model = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True)
        return cls(tokenizer, model.eval().requires_grad_(False))

    @torch.inference_mode()
    def __call__(self, prompt: str) -> torch.Tensor:
        length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        tokens = self.tokenizer(
            [prompt],
            max_length=length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.model.parameters()).device
        return self.model(tokens.to(device))[0].float()


def load_prompt_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """A precomputed embeddings file: safetensors, one (1, L, D) tensor per key (e.g. `pos`, `neg`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SDLoadError(f"prompt embeddings file {path} does not exist")
    return {key: value.float() for key, value in load_file(str(path)).items()}


def save_prompt_embeddings(path: str | Path, embeddings: Mapping[str, torch.Tensor]) -> Path:
    """Write embeddings so that a machine without the text encoder can use them (`load_prompt_embeddings`)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in embeddings.items()}, str(path))
    return Path(path)


def prompt_embeddings(
    prompts: Mapping[str, str],
    *,
    folder: str | Path | None = None,
    precomputed: str | Path | Mapping[str, torch.Tensor] | None = None,
    encoder: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Embeddings for named prompts ({"pos": "...", "neg": "..."}), computed once at engine build time.

    Sources, in order: `precomputed` (a file or mapping with the same keys; used *instead of* a text encoder),
    then `encoder`, then the text encoder of `folder` (loaded on the CPU in float32, used, and dropped, so an
    engine does not keep ~1.4 GB of CLIP alive for two fixed prompts).  Returns float32 CPU tensors (1, L, D),
    outside inference mode (recipes put them into training graphs).
    """
    if precomputed is not None:
        table = load_prompt_embeddings(precomputed) if isinstance(precomputed, (str, Path)) else dict(precomputed)
        missing = [key for key in prompts if key not in table]
        if missing:
            raise SDLoadError(
                f"the precomputed prompt embeddings lack {', '.join(missing)} (have: {', '.join(sorted(table))})"
            )
        return {key: table[key].float().cpu().clone() for key in prompts}
    if encoder is None:
        if folder is None or not has_text_encoder(folder):
            raise SDLoadError(
                f"no text encoder in {folder} and no precomputed prompt embeddings; pull the full base model "
                "(`srkit weights pull <base>`) or pass a prompt_embeds .safetensors file"
            )
        encoder = TextEncoder.from_folder(folder)
    cache: dict[str, torch.Tensor] = {}
    for prompt in set(prompts.values()):
        cache[prompt] = encoder(prompt).cpu().clone()  # clone: out of inference mode
    return {key: cache[prompt] for key, prompt in prompts.items()}


__all__ = [
    "NEGATIVE_KEY",
    "PROMPT_KEY",
    "QUALITY_PROMPT",
    "TextEncoder",
    "compose_prompt",
    "load_prompt_embeddings",
    "prompt_embeddings",
    "save_prompt_embeddings",
]
