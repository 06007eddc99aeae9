"""Loading SeeSR's released diffusers folders (`seesr/unet`, `seesr/controlnet`) and the SD2-base UNet.

Released layout (cswry/SeeSR, `preset/models/`): `seesr/unet/` and `seesr/controlnet/`, diffusers folders
(`config.json` + `diffusion_pytorch_model.safetensors`) whose configs carry `use_image_cross_attention: true`.
Stock diffusers would drop that flag and the image-attention weights with only a warning, so the models are
built here: the stock class from the config, plus SeeSR's image attentions (`srkit.nn.image_cross_attention`),
then every tensor is checked against the file.  Models are built on the meta device and take the file's
tensors as their parameters (no random initialisation of an 865M-parameter UNet only to overwrite it).
Weights come out in float32 on the CPU; the caller moves and casts them.

A missing folder or file, or keys that do not match, give one-line `WeightsError`s naming the first keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import ControlNetModel, ModelMixin, UNet2DConditionModel

from srkit.diffusion.control.diffusers import unsupported_options
from srkit.nn.image_cross_attention import CONFIG_FLAG, add_image_cross_attention
from srkit.nn.seesr import SeeSRNets
from srkit.registry import WeightsError

Model = TypeVar("Model", bound=ModelMixin)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
"""Weight files of a diffusers folder, in the order they are looked for."""

IMAGE_ATTENTIONS = "image_attentions"
"""In the name of every image-attention parameter: what SeeSR trains and `from_pretrained_orig` copies."""

SHOWN_KEYS = 3
"""How many offending keys an error names."""


def _folder(root: str | Path, subfolder: str) -> Path:
    folder = Path(root) / subfolder
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} has no config.json; expected a diffusers folder like seesr/{subfolder}")
    return folder


def read_config(folder: Path) -> dict:
    """The model config without the SeeSR flag (stock diffusers classes would warn about it)."""
    config = json.loads((folder / "config.json").read_text())
    config.pop(CONFIG_FLAG, None)
    return config


def read_state_dict(folder: Path, containing: str = "") -> dict[str, torch.Tensor]:
    """The folder's weights whose names contain `containing` (all by default), floats as float32.

    The file is a safetensors file, else a `.bin` read without unpickling objects.  From safetensors only the
    selected tensors are read, so taking SeeSR's image attentions out of a full UNet file costs their size,
    not the file's 3.4 GB.
    """
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(path, framework="pt") as file:
                    names = [key for key in file.keys() if containing in key]  # noqa: SIM118 (not a dict)
                    state = {key: file.get_tensor(key) for key in names}
            else:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
                state = {key: value for key, value in loaded.items() if containing in key}
            return {key: v.float() if v.is_floating_point() else v for key, v in state.items()}
    raise WeightsError(f"{folder} has none of {', '.join(WEIGHT_FILES)}")


def _first(keys) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def assign_strict(model: Model, state: dict[str, torch.Tensor], source: str) -> Model:
    """Make `state` the model's parameters after checking that names and shapes match exactly."""
    expected, name = model.state_dict(), type(model).__name__
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({_first(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_first(unexpected)})"] if unexpected else []
        raise WeightsError(f"{source} does not fit {name}: keys {'; '.join(parts)}")
    wrong = [k for k in sorted(state) if state[k].shape != expected[k].shape]
    if wrong:
        shown = ", ".join(f"{k} {list(state[k].shape)}≠{list(expected[k].shape)}" for k in wrong[:SHOWN_KEYS])
        raise WeightsError(f"{source} does not fit {name}: {len(wrong)} shapes differ ({shown})")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _build(cls: type[Model], config: dict, image_cross_attention: bool) -> Model:
    with torch.device("meta"):
        model = cls.from_config(config)
        return add_image_cross_attention(model) if image_cross_attention else model


def load_seesr_unet(root: str | Path, subfolder: str = "unet") -> UNet2DConditionModel:
    """SeeSR's UNet from its released folder (upstream: `from_pretrained(seesr, subfolder="unet")`)."""
    folder = _folder(root, subfolder)
    unet = _build(UNet2DConditionModel, read_config(folder), image_cross_attention=True)
    return assign_strict(unet, read_state_dict(folder), str(folder))


def load_seesr_unet_from_base(
    base_root: str | Path, seesr_root: str | Path, subfolder: str = "unet"
) -> UNet2DConditionModel:
    """SeeSR's UNet as train_seesr.py / RFSR build it (upstream `from_pretrained_orig`).

    The SD2-base config and weights, plus only the `image_attentions.*` tensors of the SeeSR folder (the only
    UNet part SeeSR trains).  Unlike upstream (`strict=False`), every key must be covered.
    """
    base, seesr = _folder(base_root, subfolder), _folder(seesr_root, subfolder)
    image_state = read_state_dict(seesr, containing=IMAGE_ATTENTIONS)
    if not image_state:
        raise WeightsError(f"{seesr} holds no image_attentions.* weights; is it a SeeSR UNet folder?")
    state = {**read_state_dict(base), **image_state}
    unet = _build(UNet2DConditionModel, read_config(base), image_cross_attention=True)
    return assign_strict(unet, state, f"{base} + image attentions of {seesr}")


def load_base_unet(root: str | Path, subfolder: str = "unet") -> UNet2DConditionModel:
    """The vanilla SD2-base UNet, without image attention (RFSR's frozen KL reference, `unet_copy`)."""
    folder = _folder(root, subfolder)
    unet = _build(UNet2DConditionModel, read_config(folder), image_cross_attention=False)
    return assign_strict(unet, read_state_dict(folder), str(folder))


def load_seesr_controlnet(root: str | Path, subfolder: str = "controlnet") -> ControlNetModel:
    """SeeSR's ControlNet (pixel-space hint, image cross-attention) from its released folder."""
    folder = _folder(root, subfolder)
    config = read_config(folder)
    if unsupported := unsupported_options(config):
        raise WeightsError(f"{folder}: ControlNet options that SeeSR does not use: {unsupported}")
    controlnet = _build(ControlNetModel, config, image_cross_attention=True)
    return assign_strict(controlnet, read_state_dict(folder), str(folder))


def load_seesr(seesr_root: str | Path, base_root: str | Path | None = None) -> SeeSRNets:
    """SeeSR's networks from the released `seesr/{unet,controlnet}` folders.  With `base_root` the UNet is built the
    training way: SD2-base weights + SeeSR's image attentions (upstream `from_pretrained_orig`)."""
    unet = load_seesr_unet(seesr_root) if base_root is None else load_seesr_unet_from_base(base_root, seesr_root)
    return SeeSRNets(unet=unet, controlnet=load_seesr_controlnet(seesr_root))
