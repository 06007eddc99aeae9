"""Fold peft-format LoRA adapters into a model's base weights at load time: W' = W + (alpha / r)·B·A.

Why merge instead of injecting peft layers: a one-step SR model runs every layer once per tile, so an unmerged
adapter only adds two small products per layer and keeps peft in the inference path.  Merged, the model is a
plain diffusers model that casts, compiles and tiles like any other.  The merge is exact in real arithmetic; it is
done in float64 so the only difference from upstream's unmerged fp32 forward is one rounding of each weight.

Checkpoint keys follow peft's naming: `<module>.lora_A.<adapter>.weight`, `<module>.lora_B.<adapter>.weight`,
and `<module>.base_layer.<param>` for base tensors that were trained along with the adapter.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import torch
from torch import nn

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")


def lora_delta(down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight change of one adapter, in float64.

    Linear: A is [r, in], B is [out, r].  Conv: A is a conv with the base layer's kernel and r output channels
    ([r, in, kh, kw]) and B a 1×1 conv ([out, r, 1, 1]), so the delta is B contracted with A over r.
    """
    down, up = down.double(), up.double()
    if down.ndim == 2:
        return scaling * (up @ down)
    return scaling * torch.einsum("or,rihw->oihw", up.flatten(1), down)


def split_peft_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[tuple[str, str], dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module, adapter) -> {"A": ..., "B": ...}, and the remaining tensors renamed to the plain model's keys."""
    adapters: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            adapters.setdefault((match["module"], match["adapter"]), {})[match["part"]] = value
        else:
            plain[key.replace(".base_layer.", ".")] = value
    incomplete = [f"{m} ({a})" for (m, a), parts in adapters.items() if set(parts) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"LoRA adapters without both A and B matrices: {', '.join(incomplete[:5])}")
    return adapters, plain


@torch.no_grad()
def merge_peft_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    scaling: float,
    adapters: Collection[str] | None = None,
) -> set[str]:
    """Load trained base tensors from `state`, then fold its LoRA adapters into `model`; returns merged modules.

    Base tensors go first because a layer can be both retrained and adapted (OSEDiff's UNet conv_in).
    `adapters` limits the merge to the adapters upstream activates (None: all of them).
    """
    lora, plain = split_peft_state(state)
    params = dict(model.named_parameters())
    unknown = sorted(set(plain) - set(params))
    if unknown:
        raise ValueError(f"checkpoint tensors that match no model parameter: {', '.join(unknown[:5])}")
    for key, value in plain.items():
        _assign(params[key], value, key)
    merged: set[str] = set()
    for (module, adapter), parts in lora.items():
        if adapters is not None and adapter not in adapters:
            continue
        key = f"{module}.weight"
        if key not in params:
            raise ValueError(f"LoRA adapter '{adapter}' targets '{module}', which the model does not have")
        weight = params[key]
        delta = lora_delta(parts["A"], parts["B"], scaling)
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA on '{module}' gives shape {tuple(delta.shape)}, weight is {tuple(weight.shape)}")
        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
        merged.add(module)
    return merged


def _assign(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"'{key}' is {tuple(value.shape)} in the checkpoint but {tuple(param.shape)} in the model")
    param.copy_(value.to(param.device, param.dtype))
