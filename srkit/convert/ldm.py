"""ldm (CompVis / Stability) parameter names ↔ diffusers names, key by key and in both directions.

diffusers' single-file loader (`diffusers.loaders.single_file_utils`: `convert_ldm_unet_checkpoint`,
`convert_controlnet_checkpoint`, `convert_ldm_vae_checkpoint`) converts whole state dicts and skips what it
does not recognise.  A strict loader needs more: every checkpoint key maps or is reported, a missing module
parameter is reported under the name the checkpoint should have had, and keys diffusers never heard of (a
fine-tune's extra layers) keep their names inside the renamed block.  So the same renaming rules are written
here as a table of block prefixes built from the layout, each with the renames of what follows the prefix;
tests/test_consissr_nets.py checks the table against diffusers' converters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
"""ldm ResBlock → diffusers ResnetBlock2D."""

VAE_RESNET_RENAMES = (
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
)
VAE_ATTENTION_RENAMES = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)
WHOLE = (("", ""),)
"""Everything below the prefix keeps its name (attention blocks, plain convolutions)."""


@dataclass(frozen=True)
class Rename:
    """Keys under `ldm` ↔ keys under `native`; what follows the prefix starts with a pair of `rest`."""

    ldm: str
    native: str
    rest: tuple[tuple[str, str], ...] = WHOLE


class KeyMap:
    """A bijection between ldm and native parameter names given by block prefixes (see `Rename`)."""

    def __init__(self, renames: Iterable[Rename]) -> None:
        self.renames = tuple(renames)

    def to_native(self, key: str) -> str | None:
        """The native name of an ldm key, or None when no rule covers it."""
        return self._translate(key, forward=True)

    def to_ldm(self, key: str) -> str | None:
        """The ldm name of a native key, or None when no rule covers it."""
        return self._translate(key, forward=False)

    def _translate(self, key: str, forward: bool) -> str | None:
        for rename in self.renames:
            source, target = (rename.ldm, rename.native) if forward else (rename.native, rename.ldm)
            if not key.startswith(source):
                continue
            rest = key[len(source) :]
            for pair in rename.rest:
                old, new = pair if forward else pair[::-1]
                if rest.startswith(old):
                    return target + new + rest[len(old) :]
        return None


def scoped(prefix: tuple[str, str], renames: Iterable[Rename]) -> list[Rename]:
    """The same renames for a sub-model stored under (ldm prefix, native prefix)."""
    ldm, native = prefix
    return [Rename(ldm + r.ldm, native + r.native, r.rest) for r in renames]


@dataclass(frozen=True)
class UNetLayout:
    """What the ldm block numbering depends on: res blocks per level and which levels have attention."""

    layers_per_block: int
    attention_levels: tuple[bool, ...]

    @property
    def levels(self) -> int:
        return len(self.attention_levels)


def unet_encoder_renames(layout: UNetLayout) -> list[Rename]:
    """time embedding, conv_in, input blocks and the middle block (shared by the UNet and a ControlNet)."""
    step = layout.layers_per_block + 1
    renames = [
        Rename("time_embed.0.", "time_embedding.linear_1."),
        Rename("time_embed.2.", "time_embedding.linear_2."),
        Rename("input_blocks.0.0.", "conv_in."),
    ]
    for level in range(layout.levels):
        for j in range(layout.layers_per_block):
            block = 1 + level * step + j
            renames.append(
                Rename(f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET_RENAMES)
            )
            if layout.attention_levels[level]:
                renames.append(Rename(f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level < layout.levels - 1:
            renames.append(
                Rename(
                    f"input_blocks.{(level + 1) * step}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."
                )
            )
    renames += [
        Rename("middle_block.0.", "mid_block.resnets.0.", RESNET_RENAMES),
        Rename("middle_block.1.", "mid_block.attentions.0."),
        Rename("middle_block.2.", "mid_block.resnets.1.", RESNET_RENAMES),
    ]
    return renames


def unet_renames(layout: UNetLayout) -> list[Rename]:
    """A whole ldm UNetModel → diffusers UNet2DConditionModel (up block j holds ldm level levels−1−j)."""
    step = layout.layers_per_block + 1
    renames = unet_encoder_renames(layout)
    for j in range(layout.levels):
        attention = layout.attention_levels[layout.levels - 1 - j]
        for k in range(step):
            block = j * step + k
            renames.append(Rename(f"output_blocks.{block}.0.", f"up_blocks.{j}.resnets.{k}.", RESNET_RENAMES))
            if attention:
                renames.append(Rename(f"output_blocks.{block}.1.", f"up_blocks.{j}.attentions.{k}."))
        if j < layout.levels - 1:
            upsample = f"output_blocks.{j * step + step - 1}.{2 if attention else 1}.conv."
            renames.append(Rename(upsample, f"up_blocks.{j}.upsamplers.0.conv."))
    renames += [Rename("out.0.", "conv_norm_out."), Rename("out.2.", "conv_out.")]
    return renames


def controlnet_renames(layout: UNetLayout, hint_convs: int, hint_embedding: str) -> list[Rename]:
    """An ldm ControlNet → diffusers ControlNetModel; the hint convs (every other layer of `input_hint_block`,
    SiLUs between) go to a ControlNetConditioningEmbedding at `hint_embedding`."""
    renames = unet_encoder_renames(layout)
    blocks = 1 + layout.levels * (layout.layers_per_block + 1) - 1
    renames += [Rename(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(blocks)]
    renames.append(Rename("middle_block_out.0.", "controlnet_mid_block."))
    hint_names = ["conv_in"] + [f"blocks.{i}" for i in range(hint_convs - 2)] + ["conv_out"]
    renames += [
        Rename(f"input_hint_block.{2 * i}.", f"{hint_embedding}.{name}.") for i, name in enumerate(hint_names)
    ]
    return renames


def vae_encoder_renames(levels: int, layers_per_block: int) -> list[Rename]:
    """ldm Encoder + quant_conv → diffusers Encoder + quant_conv (attention only in the middle block)."""
    renames = [
        Rename("encoder.conv_in.", "encoder.conv_in."),
        Rename("encoder.norm_out.", "encoder.conv_norm_out."),
        Rename("encoder.conv_out.", "encoder.conv_out."),
        Rename("quant_conv.", "quant_conv."),
    ]
    for level in range(levels):
        for j in range(layers_per_block):
            renames.append(
                Rename(
                    f"encoder.down.{level}.block.{j}.",
                    f"encoder.down_blocks.{level}.resnets.{j}.",
                    VAE_RESNET_RENAMES,
                )
            )
        if level < levels - 1:
            renames.append(
                Rename(
                    f"encoder.down.{level}.downsample.conv.",
                    f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                )
            )
    return renames + _vae_mid_renames("encoder")


def vae_renames(levels: int, layers_per_block: int) -> list[Rename]:
    """ldm AutoencoderKL → diffusers AutoencoderKL (decoder level i is diffusers up block levels−1−i)."""
    renames = vae_encoder_renames(levels, layers_per_block) + [
        Rename("post_quant_conv.", "post_quant_conv."),
        Rename("decoder.conv_in.", "decoder.conv_in."),
        Rename("decoder.norm_out.", "decoder.conv_norm_out."),
        Rename("decoder.conv_out.", "decoder.conv_out."),
    ]
    for level in range(levels):
        up = levels - 1 - level
        for j in range(layers_per_block + 1):
            renames.append(
                Rename(
                    f"decoder.up.{level}.block.{j}.",
                    f"decoder.up_blocks.{up}.resnets.{j}.",
                    VAE_RESNET_RENAMES,
                )
            )
        if level > 0:
            renames.append(
                Rename(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv.")
            )
    return renames + _vae_mid_renames("decoder")


def _vae_mid_renames(coder: str) -> list[Rename]:
    return [
        Rename(f"{coder}.mid.block_1.", f"{coder}.mid_block.resnets.0.", VAE_RESNET_RENAMES),
        Rename(f"{coder}.mid.attn_1.", f"{coder}.mid_block.attentions.0.", VAE_ATTENTION_RENAMES),
        Rename(f"{coder}.mid.block_2.", f"{coder}.mid_block.resnets.1.", VAE_RESNET_RENAMES),
    ]


def ldm_shape(tensor: torch.Tensor, reference_dims: int) -> torch.Tensor:
    """A native tensor in the checkpoint's layout: a Linear weight stored as ldm's 1×1 conv (VAE attention) when
    the checkpoint keeps it 4-D (`reference_dims`); the inverse of `fit_shape`."""
    return tensor[:, :, None, None] if tensor.dim() == 2 and reference_dims == 4 else tensor


def fit_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`tensor` in the native `shape`: as is, or a 1×1 conv weight (ldm VAE attention) as a Linear weight;
    None when the two cannot be the same parameter."""
    if tensor.shape == shape:
        return tensor
    if len(shape) == 2 and tensor.dim() == 4 and tensor.shape[:2] == shape and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    return None
