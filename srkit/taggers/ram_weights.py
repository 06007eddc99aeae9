"""Load RAM (`ram_swin_large_14m.pth`), its tag list and thresholds, and the DAPE LoRA (`DAPE.pth`), strictly.

Upstream (`load_checkpoint_swinlarge`, then `load_state_dict(DAPE, strict=False)` and `eval()`):
- takes `checkpoint["model"]`; resamples every `relative_position_bias_table` to the configured window;
  drops the derived Swin buffers `relative_position_index` / `attn_mask`; renames `vision_multi` →
  `tagging_head`;
- loads that with strict=False, so a wrong file passes silently.  Here every key must be used, except the
  parts tagging provably never reads (`UNUSED_PREFIXES`); anything else missing or unexpected is a one-line
  error;
- loads DAPE's loralib pairs on top and lets `eval()` merge them: W += (B·A)·alpha/r with alpha = 1.  Here
  they are merged once, at load time, with loralib's fp32 order of operations, which reproduces upstream's
  merged weights bit for bit (a float64 merge is 3e-6 off in the embeddings).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from srkit.nn.swin import resize_relative_position_table
from srkit.registry import WeightsError
from srkit.taggers.ram import RAM, RAM_Q2L, RAM_SWIN_L_384, UPSTREAM_ANTIALIAS, RAMTagger

DERIVED_BUFFERS = ("relative_position_index", "attn_mask")
"""Swin buffers computed from the geometry; upstream deletes them from the checkpoint by substring."""

HEAD_OLD_NAME, HEAD_NAME = "vision_multi", "tagging_head"
"""The tagging head is saved as `vision_multi.*` (the fixture's layout); upstream renames it by substring."""

UNUSED_PREFIXES = re.compile(
    r"tag_encoder\.|text_decoder\.|tagging_head\.(embeddings\.|encoder\.layer\.\d+\.attention\.)"
)
"""Never read by tagging: the caption branch (`tag_encoder`, `text_decoder`) and the head parts upstream
deletes before use (`del_selfattention`: word embeddings and every self-attention).  The lowest tag_encoder
layers are tied to the head and stored twice; upstream loads the head's copy last, so that one is used."""

LORALIB_ALPHA = 1
"""loralib's default `lora_alpha`, which RAMLora keeps: the scaling is 1/r (1/8 for DAPE)."""

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])$")
_TIED_ENCODER_LAYER = re.compile(
    r"^tag_encoder\.encoder\.layer\.(?P<layer>\d+)\.(?P<rest>crossattention\..+)$"
)
_QKV_SLOTS_WITH_LORA = (0, 2)
"""Swin `qkv` is loralib `MergedLinear(enable_lora=[True, False, True])`: q and v rows adapted, k not."""


def read_tag_list(path: str | Path) -> list[str]:
    """`ram_tag_list.txt`: one name per line, class-index order (upstream: `f.read().splitlines()`)."""
    return _read_text(path, "tag list").splitlines()


def read_thresholds(path: str | Path) -> torch.Tensor:
    """`ram_tag_list_threshold.txt`: one float per line → float32 (C,), as upstream stores them."""
    lines = [line.strip() for line in _read_text(path, "threshold list").splitlines() if line.strip()]
    try:
        return torch.tensor([float(line) for line in lines], dtype=torch.float32)
    except ValueError as exc:
        raise WeightsError(f"{path}: not a threshold list ({exc})") from exc


def _read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise WeightsError(f"cannot read the RAM {what} {path}: {exc.strerror or exc}") from exc


def read_torch_file(path: str | Path, what: str) -> Any:
    """`torch.load` with `weights_only=True`, memory-mapped when the file allows it (the RAM file is 5.6 GB
    and tagging uses a fraction of it)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"{path} is not a loadable {what} ({first_line})") from exc


def upstream_key(key: str) -> str | None:
    """The model key upstream loads `key` into, or None when it drops the key or tagging never reads it."""
    if any(name in key for name in DERIVED_BUFFERS):
        return None
    key = key.replace(HEAD_OLD_NAME, HEAD_NAME)
    return None if UNUSED_PREFIXES.match(key) else key


def tagging_state(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of an official RAM checkpoint that tagging uses, under the model's names."""
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{source} is not a RAM checkpoint (no 'model' state dict inside)")
    renamed = {}
    for key, value in state.items():
        name = upstream_key(key)
        if name is not None:
            renamed[name] = value
    return renamed


def load_ram_state(model: RAM, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load: resample bias tables to the model's windows, then every model tensor from `state` and
    nothing else."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not match the RAM architecture: {_key_summary(missing, unexpected)}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            value = state[key]
            if "relative_position_bias_table" in key:
                value = resize_relative_position_table(value, window=(_side(target.shape[0]) + 1) // 2)
            _copy(target, value, key, source)


def _side(rows: int) -> int:
    return round(rows**0.5)


def _key_summary(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    return "; ".join(parts)


def _copy(target: torch.Tensor, value: torch.Tensor, key: str, source: str) -> None:
    if target.shape != value.shape:
        raise WeightsError(
            f"{source}: '{key}' is {tuple(value.shape)} but the configured model needs {tuple(target.shape)}"
        )
    target.copy_(value.to(target.dtype))


def lora_target(module: str, head_layers: int) -> str | None:
    """The model module an upstream loralib adapter changes when `eval()` merges it, or None (caption branch).

    The lowest `head_layers` layers of the caption `tag_encoder` share their weight tensors with the tagging
    head (tied at construction), so their cross-attention adapters merge into the head too.
    """
    module = module.replace(HEAD_OLD_NAME, HEAD_NAME)
    tied = _TIED_ENCODER_LAYER.match(module)
    if tied and int(tied["layer"]) < head_layers:
        return f"{HEAD_NAME}.encoder.layer.{tied['layer']}.{tied['rest']}"
    return None if UNUSED_PREFIXES.match(module) else module


@torch.no_grad()
def merge_dape(model: RAM, dape: Any, source: str) -> int:
    """Fold DAPE's loralib adapters into `model` (W += B·A/r per adapter); returns how many were merged.

    Non-LoRA tensors in the file replace the model's, as upstream's strict=False load does (SeeSR saves only
    the adapters, but a full RAM state in `DAPE.pth` must mean the same thing here).
    """
    if not isinstance(dape, dict) or not all(isinstance(v, torch.Tensor) for v in dape.values()):
        raise WeightsError(f"{source} is not a DAPE checkpoint (expected a flat dict of tensors)")
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in dape.items():
        match = _LORA_KEY.match(key)
        if match:
            adapters.setdefault(match["module"], {})[match["part"]] = value
        elif (name := upstream_key(key)) is not None:
            plain[name] = value
    expected = model.state_dict()
    unexpected = [key for key in plain if key not in expected]
    if unexpected:
        raise WeightsError(f"{source} does not match the RAM architecture: {_key_summary([], unexpected)}")
    for key, value in plain.items():
        _copy(expected[key], value, key, source)

    head_layers = len(model.tagging_head.encoder["layer"])
    merged = 0
    for module, parts in adapters.items():
        if set(parts) != {"A", "B"}:
            raise WeightsError(f"{source}: LoRA adapter '{module}' lacks lora_A or lora_B")
        target = lora_target(module, head_layers)
        if target is None:
            continue
        weight = expected.get(f"{target}.weight")
        if weight is None:
            raise WeightsError(
                f"{source}: LoRA adapter '{module}' targets '{target}', which RAM does not have"
            )
        delta = _adapter_delta(parts["A"], parts["B"], weight.shape, merged_qkv=target.endswith(".attn.qkv"))
        if delta is None:
            shapes = f"A {tuple(parts['A'].shape)}, B {tuple(parts['B'].shape)}"
            needed = f"'{target}.weight' {tuple(weight.shape)}"
            raise WeightsError(f"{source}: LoRA adapter '{module}' ({shapes}) does not fit {needed}")
        weight.add_(delta.to(weight.dtype))
        merged += 1
    return merged


def _loralib_delta(down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B·A)·scaling in fp32, product first, as loralib's merge computes it."""
    return (up.float() @ down.float()) * scaling


def _adapter_delta(
    down: torch.Tensor, up: torch.Tensor, shape: torch.Size, merged_qkv: bool
) -> torch.Tensor | None:
    """loralib's weight change (fp32), or None when the shapes do not fit.

    `Linear`: (B·A)/r.  `MergedLinear` (Swin qkv): A = [A_q; A_v] (2r, C), B = [B_q; B_v] (2C, r); the q rows
    get B_q·A_q/r, the v rows B_v·A_v/r, the k rows nothing (what loralib's grouped conv1d computes).
    """
    rank = up.shape[1]
    scaling = LORALIB_ALPHA / rank
    if not merged_qkv:
        return _loralib_delta(down, up, scaling) if (up.shape[0], down.shape[1]) == tuple(shape) else None
    slots = 3
    rows = shape[0] // slots
    groups = len(_QKV_SLOTS_WITH_LORA)
    if down.shape != (groups * rank, shape[1]) or up.shape != (groups * rows, rank):
        return None
    delta = torch.zeros(shape)
    for group, slot in enumerate(_QKV_SLOTS_WITH_LORA):
        group_down = down[group * rank : (group + 1) * rank]
        group_up = up[group * rows : (group + 1) * rows]
        delta[slot * rows : (slot + 1) * rows] = _loralib_delta(group_down, group_up, scaling)
    return delta


_STAGE_BLOCK = re.compile(r"^visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
_HEAD_LAYER = re.compile(r"^tagging_head\.encoder\.layer\.(\d+)\.")


def infer_configs(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Swin and tagging-head sizes of a RAM checkpoint's tagging state, from its tensor shapes (the way
    spandrel recognises architectures): stage depths and head counts from the blocks' relative-position tables,
    widths from the patch embedding and the head's layers.  What shapes cannot tell (image size, window, head
    count of the tagging head) stays at the released model's values, which every known RAM checkpoint shares."""
    try:
        blocks = [tuple(map(int, m.groups())) for key in state if (m := _STAGE_BLOCK.match(key))]
        stages = max(stage for stage, _ in blocks) + 1
        swin = {
            **RAM_SWIN_L_384,
            "embed_dim": int(state["visual_encoder.patch_embed.proj.weight"].shape[0]),
            "depths": [max(block for stage, block in blocks if stage == i) + 1 for i in range(stages)],
            "num_heads": [
                int(state[f"visual_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1])
                for i in range(stages)
            ],
            "vision_width": int(state["image_proj.weight"].shape[1]),
        }
        layers = {int(m.group(1)) for key in state if (m := _HEAD_LAYER.match(key))}
        q2l = {
            **RAM_Q2L,
            "hidden_size": int(state["tagging_head.encoder.layer.0.crossattention.self.query.weight"].shape[0]),
            "intermediate_size": int(state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "num_hidden_layers": max(layers) + 1,
        }
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"not a RAM Swin checkpoint: cannot tell its sizes ({exc})") from exc
    return swin, q2l


def load_ram_tagger(
    ram_checkpoint: str | Path,
    tag_list: str | Path,
    thresholds: str | Path,
    dape_checkpoint: str | Path | None = None,
    *,
    swin_config: Mapping[str, Any] | None = None,
    q2l_config: Mapping[str, Any] | None = None,
    antialias: bool = UPSTREAM_ANTIALIAS,
    separator: str = ", ",
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> RAMTagger:
    """RAM (plus DAPE when `dape_checkpoint` is given) ready to tag; fp32 weights on `device`.

    `swin_config` / `q2l_config` are dicts in upstream's JSON format (`configs/swin/config_swinL_384.json`,
    `configs/q2l_config.json`); by default they are read off the checkpoint's shapes (`infer_configs`).
    """
    tag_names = read_tag_list(tag_list)
    class_thresholds = read_thresholds(thresholds)
    if len(class_thresholds) != len(tag_names):
        raise WeightsError(
            f"{thresholds} has {len(class_thresholds)} thresholds but {tag_list} {len(tag_names)} tags"
        )
    source = str(ram_checkpoint)
    state = tagging_state(read_torch_file(ram_checkpoint, "RAM checkpoint"), source)
    inferred_swin, inferred_q2l = infer_configs(state)
    model = RAM(len(tag_names), swin_config or inferred_swin, q2l_config or inferred_q2l)
    load_ram_state(model, state, source)
    if dape_checkpoint is not None:
        merge_dape(model, read_torch_file(dape_checkpoint, "DAPE checkpoint"), str(dape_checkpoint))
    return RAMTagger(
        model.to(device),
        tag_names,
        class_thresholds,
        antialias=antialias,
        separator=separator,
        autocast_dtype=autocast_dtype,
    )
