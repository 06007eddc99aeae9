"""LoRA for training through peft, on diffusers models, with the target rules of the OSEDiff family, and export by
folding the adapters into a fresh copy of the base weights (srkit/nn/lora_merge.py).

Several named adapters can share one frozen base (GenDR's real and fake scores): `use_adapter` switches between them
without peft's side effect of changing which parameters require gradients, and `frozen` takes weight gradients
away for one forward pass while the inputs keep their graph (SiD's generator step).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from srkit.nn.dg_lora import match_list
from srkit.nn.lora_sites import PEFT_DEFAULT_ALPHA


def target_modules(model: nn.Module, patterns: Iterable[str], prefix: str = "", exclude: Iterable[str] = ()) -> list[str]:
    """Linear/Conv2d module names under `prefix` that equal a pattern or end with "." + pattern (peft's rule)."""
    exclude = set(exclude)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name.startswith(prefix) and name not in exclude
    ]
    return match_list(names, patterns)


def add_lora(
    model: nn.Module, targets: list[str], rank: int, adapter: str = "default", alpha: float | None = None
) -> dict[str, nn.Parameter]:
    """Attach a fresh peft LoRA (gaussian A, zero B: the model is unchanged at step 0); its parameters by name.
    `alpha` None keeps peft's default lora_alpha (scaling 8/rank, what the OSEDiff family relies on)."""
    from peft import LoraConfig

    extra = {} if alpha is None else {"lora_alpha": alpha}
    config = LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets, **extra)
    with warnings.catch_warnings():  # a second named adapter on one model is what GenDR's scores are
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(config, adapter_name=adapter)
    return {name: p for name, p in model.named_parameters() if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name}


def use_adapter(model: nn.Module, adapter: str) -> None:
    """Make `adapter` the active one; which parameters require gradients stays as it was (peft's set_adapter
    would make the active adapter trainable and the others frozen)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """No weight gradients for `modules` inside the block (their inputs keep the graph); flags restored after.
    Autograd decides at forward time, so a loss built inside never reaches these weights, even when it is
    back-propagated after the block."""
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def lora_scaling(rank: int) -> float:
    return PEFT_DEFAULT_ALPHA / rank


@torch.no_grad()
def merged_copy(fresh: nn.Module, trained: nn.Module, rank: int) -> nn.Module:
    """`fresh` (the base model, freshly loaded) with `trained`'s full tensors and LoRA folded in: W + (8/r)·B·A."""
    from srkit.nn.lora_merge import merge_peft_state

    state = {k: v for k, v in trained.state_dict().items() if ".lora_" in k or k.startswith("conv_in.")}
    merge_peft_state(fresh, state, lora_scaling(rank))
    return fresh
