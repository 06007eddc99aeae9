"""SeeSR's image cross-attention, added to a stock diffusers UNet or ControlNet.

SeeSR (cswry/SeeSR, `models/unet_2d_blocks.py`) conditions the SD2 UNet and its ControlNet on RAM image
tokens.  Every cross-attention block (the mid block too) gets an `image_attentions.{i}` Transformer2DModel
that runs right after the block's text Transformer2DModel `attentions.{i}`: resnet → text attention → image
attention.  The image module is the text module's twin (same heads, width, norm groups, projections) except
that it attends to 512-wide tokens; that width is hard-coded upstream, not a config key.

Rather than forking diffusers' blocks, each text Transformer2DModel becomes a `TextThenImageTransformer2D`,
which runs the text pass and then its twin, so diffusers' own UNet, ControlNet and block forwards stay in use.
The twins are registered on the block as `image_attentions`, so parameter names and checkpoints keep the
released layout; the text module holds an unregistered reference (registering it there too would put every
twin parameter into the state dict twice).  The RAM tokens travel in `cross_attention_kwargs`, which diffusers
hands from the model to every cross-attention block unchanged (`image_token_kwargs`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from torch import nn

IMAGE_TOKEN_DIM = 512
"""Width of the RAM image tokens (`image_cross_attention_dim` upstream)."""

IMAGE_TOKENS_KEY = "image_encoder_hidden_states"
"""The `cross_attention_kwargs` entry that carries the image tokens (upstream's argument name)."""

CONFIG_FLAG = "use_image_cross_attention"
"""The released configs' flag for the image attentions; stock diffusers does not know it."""


def image_token_kwargs(tokens: torch.Tensor, cross_attention_kwargs: dict[str, Any] | None = None) -> dict:
    """`cross_attention_kwargs` for a model with image cross-attention: the (B, N, 512) tokens added."""
    return {**(cross_attention_kwargs or {}), IMAGE_TOKENS_KEY: tokens}


class TextThenImageTransformer2D(Transformer2DModel):
    """A block's text Transformer2DModel followed by its image twin (which the block owns, see the module).

    Adds behaviour only (no parameters, no `__init__`): that is what lets `add_image_cross_attention` convert
    the stock modules in place.
    """

    image_attention: Transformer2DModel

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        attention_kwargs = dict(cross_attention_kwargs or {})
        image_tokens = attention_kwargs.pop(IMAGE_TOKENS_KEY, None)
        if image_tokens is None:
            raise ValueError("a SeeSR model needs cross_attention_kwargs=image_token_kwargs(ram_tokens)")
        hidden_states = super().forward(
            hidden_states,
            encoder_hidden_states,
            cross_attention_kwargs=attention_kwargs or None,
            attention_mask=attention_mask,
            return_dict=False,
            **kwargs,
        )[0]
        # Upstream also hands the text tokens' `encoder_attention_mask` to the image pass; it is always None
        # there and would not fit the image tokens, so only the spatial mask is passed on.
        hidden_states = self.image_attention(
            hidden_states,
            image_tokens,
            cross_attention_kwargs=attention_kwargs or None,
            attention_mask=attention_mask,
            return_dict=False,
        )[0]
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def _twin_config(text: Transformer2DModel) -> dict[str, Any]:
    """The text module's constructor arguments with the image token width.

    Private config entries are dropped: diffusers lists positionally passed arguments (heads, head width) in
    `_use_default_values`, and `from_config` would reset those to their defaults.
    """
    arguments = {key: value for key, value in text.config.items() if not key.startswith("_")}
    return {**arguments, "cross_attention_dim": IMAGE_TOKEN_DIM}


def add_image_cross_attention(model: ModelMixin) -> ModelMixin:
    """Give every cross-attention block of a diffusers UNet/ControlNet SeeSR's image attentions (new weights).

    Under `torch.device("meta")` the new modules are meta too, awaiting a state dict.  The model's config gets
    the released flag, so that `save_pretrained` writes SeeSR's folder layout.
    """
    blocks = [block for block in model.modules() if getattr(block, "has_cross_attention", False)]
    for block in blocks:
        texts = list(block.attentions)
        if not all(type(text) is Transformer2DModel for text in texts):
            raise ValueError(f"{type(block).__name__} does not hold plain Transformer2DModels (not SD-style)")
        twins = [Transformer2DModel.from_config(_twin_config(text)) for text in texts]
        block.image_attentions = nn.ModuleList(twins)
        for text, twin in zip(texts, twins):
            text.__class__ = TextThenImageTransformer2D
            object.__setattr__(text, "image_attention", twin)  # unregistered: block.image_attentions owns it
    model.register_to_config(**{CONFIG_FLAG: True})
    return model
