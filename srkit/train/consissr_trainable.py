"""ConsisSR's trainable sets, selected as upstream selects them: by rules on the official parameter names
(Gujojo/ConsisSR `model/clip_distill.py` and `model/cldm.py` `configure_optimizers`), applied through the
checkpoint name map (`srkit.convert.consissr`), so srkit's diffusers names cannot bend a rule.  (A rule on the
diffusers names would, for example, drop the ControlNet ResNets' `norm2` GroupNorms, which upstream names
`out_layers.0` and trains.)  One copy for the ConsisSR recipes and RFSR's ConsisSR adapter.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def stage1_trainable(key: str) -> bool:
    """Stage 1 (CLIP distillation): the OpenCLIP visual tower, `cond_stage_model` names containing `visual`."""
    return key.startswith("cond_stage_model.") and "visual" in key


def stage2_trainable(key: str) -> bool:
    """Stage 2 (TALA): the ControlNet except names with `attn2` or `norm2` (its text cross-attention) but with
    `to_out_ip`; the UNet's `attn1.position_emb`, `attnT`, `normT`, `to_out_ip`; the image-token MLP
    `ft_layers_4`."""
    if key.startswith("control_model."):
        return not (("attn2" in key or "norm2" in key) and "to_out_ip" not in key)
    if key.startswith("model.diffusion_model."):
        return any(part in key for part in ("attn1.position_emb", "attnT", "normT", "to_out_ip"))
    return key.startswith("cond_stage_model.") and "ft_layers" in key


def select_trainable(nets: nn.Module, rule: Callable[[str], bool]) -> dict[str, nn.Parameter]:
    """`ConsisSRNets` parameters (native name -> parameter) whose official name `rule` selects; those alone
    require grad afterwards."""
    from srkit.convert.consissr import checkpoint_key, key_map

    keys = key_map(nets.architecture)
    chosen = {}
    for name, param in nets.named_parameters():
        param.requires_grad_(rule(checkpoint_key(keys, name)))
        if param.requires_grad:
            chosen[name] = param
    return chosen


__all__ = ["select_trainable", "stage1_trainable", "stage2_trainable"]
