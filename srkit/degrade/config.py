"""The degradation settings: Real-ESRGAN's published defaults, overridable from a TOML file.

Defaults are those of `options/train_realesrgan_x4plus.yml` in the official repository (the x2plus file and
OSEDiff's `params_realesrgan.yml` carry the same numbers).  The reference spreads them over the dataset
(kernels) and the model (everything else) with a `2` suffix for the second stage; here each stage is one
`StageConfig` so the two stages read the same way, and the first stage's blur is a stage with `blur_prob` 1.

A TOML file holds any subset of the keys; missing keys keep the defaults:

    final_sinc_prob = 0.8
    [stage1]
    noise_range = [1, 30]
    [stage2]
    blur_prob = 0.8
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

GAUSSIAN_FAMILIES = {"iso": "gaussian", "aniso": "gaussian", "generalized_iso": "generalized",
                     "generalized_aniso": "generalized", "plateau_iso": "plateau", "plateau_aniso": "plateau"}
"""Kernel kinds of the published `kernel_list`, mapped to the formula they use."""
KERNEL_KINDS = (*GAUSSIAN_FAMILIES, "sinc")
"""Every kernel kind (listed here, not with the kernels, so that checking a configuration needs no PyTorch)."""


CROP_MODES = ("center", "random")
"""`srkit degrade --crop-mode`: where `--crop` cuts."""
RESIZE_MODES = ("area", "bilinear", "bicubic")
"""Interpolation modes drawn uniformly for every resize, as in the reference."""
MIXED_KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclass(frozen=True)
class StageConfig:
    """One degradation stage: blur, resize, noise, JPEG.  Ranges are (low, high), sampled uniformly."""

    blur_prob: float = 1.0
    """Probability that this stage blurs at all (stage 1: always; stage 2: `second_blur_prob`)."""
    kernel_size_range: tuple[int, int] = (7, 21)
    """Odd kernel sizes drawn uniformly from this range; 21 is the reference's `blur_kernel_size`."""
    kernel_list: tuple[str, ...] = MIXED_KERNELS
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of (up, down, keep)."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    """Gaussian noise with this probability, Poisson noise otherwise."""
    noise_range: tuple[float, float] = (1.0, 30.0)
    """Gaussian σ on the 0..255 scale."""
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    """Probability that the noise is the same in all channels (luminance noise)."""
    jpeg_range: tuple[int, int] = (30, 95)
    """JPEG quality, an integer drawn uniformly from the closed range."""

    def __post_init__(self) -> None:
        """Reject settings that would only fail (or silently misbehave) in the middle of a run."""
        for name in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        for name in ("kernel_size_range", "blur_sigma", "betag_range", "betap_range", "resize_range",
                     "noise_range", "poisson_scale_range", "jpeg_range"):
            value = getattr(self, name)
            if len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ValueError(f"{name} must be [low, high] with 0 <= low <= high, got {list(value)}")
        low, high = self.kernel_size_range
        if low < 1 or low % 2 == 0 or high % 2 == 0:
            raise ValueError(f"kernel_size_range must hold odd sizes >= 1, got {list(self.kernel_size_range)}")
        if self.blur_sigma[0] <= 0:
            raise ValueError(f"blur_sigma must be positive, got {list(self.blur_sigma)}")
        if not self.resize_range[0] <= 1 <= self.resize_range[1] or self.resize_range[0] <= 0:
            raise ValueError(f"resize_range must satisfy 0 < low <= 1 <= high, got {list(self.resize_range)}")
        if self.jpeg_range[0] < 1 or self.jpeg_range[1] > 100:
            raise ValueError(f"jpeg_range must lie within [1, 100], got {list(self.jpeg_range)}")
        unknown = [kind for kind in self.kernel_list if kind not in KERNEL_KINDS or kind == "sinc"]
        if unknown:
            raise ValueError(f"unknown kernel kind '{unknown[0]}' in kernel_list; use {', '.join(MIXED_KERNELS)}")
        _check_distribution("kernel_prob", self.kernel_prob, len(self.kernel_list))
        _check_distribution("resize_prob", self.resize_prob, 3)


def _check_distribution(name: str, probs: tuple[float, ...], length: int) -> None:
    if len(probs) != length or any(p < 0 for p in probs) or not math.isclose(sum(probs), 1, abs_tol=1e-6):
        raise ValueError(f"{name} must be {length} non-negative numbers summing to 1, got {list(probs)}")


def _default_stage2() -> StageConfig:
    """The published second-stage values (the `*2` keys)."""
    return StageConfig(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
                       noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))


@dataclass(frozen=True)
class DegradationConfig:
    """The whole second-order pipeline: sharpening, two stages and the final sinc filter."""

    usm_sharpen: bool = True
    """Degrade an unsharp-masked copy of the HR, as the reference does (`gt_usm`); the HR written is untouched."""
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=_default_stage2)
    final_sinc_prob: float = 0.8
    """Probability of the sinc filter applied next to the last JPEG (otherwise no filter)."""
    final_sinc_first_prob: float = 0.5
    """Probability of [resize back + sinc] -> JPEG rather than JPEG -> [resize back + sinc]."""
    round_8bit: bool = True
    """Quantise the LR to 8 bits at the end, as Real-ESRGAN does (S3Diff's training keeps the floats; ConsisSR's
    rounds only after resizing the LR back to the HR size)."""

    def __post_init__(self) -> None:
        for name in ("final_sinc_prob", "final_sinc_first_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationConfig:
        """Build from nested plain data (a parsed TOML file); unknown keys are errors, not silently ignored."""
        top = _checked(data, cls(), "the top level")
        stages = {}
        for name, default in (("stage1", StageConfig()), ("stage2", _default_stage2())):
            table = _checked(top.pop(name, {}), default, f"[{name}]")
            stages[name] = replace(default, **_tuples(table))
        return cls(**top, **stages)

    @classmethod
    def from_toml(cls, path: str | Path) -> DegradationConfig:
        """Read a TOML file; every error is a ValueError with a one-line message naming the file."""
        path = Path(path)
        try:
            with open(path, "rb") as fh:
                return cls.from_dict(tomllib.load(fh))
        except OSError as exc:
            raise ValueError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, ValueError, TypeError) as exc:
            raise ValueError(f"bad config {path}: {exc}") from None

    def to_toml(self) -> str:
        """The full configuration as TOML text (every key written, so a saved file documents a data set)."""
        data = asdict(self)
        lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
        for name in ("stage1", "stage2"):
            lines += ["", f"[{name}]"] + [f"{key} = {_toml_value(value)}" for key, value in data[name].items()]
        return "\n".join(lines) + "\n"


def _checked(data: dict[str, Any], default: Any, where: str) -> dict[str, Any]:
    """`data` after checking each key exists in `default`'s dataclass and has the kind of value it holds."""
    names = {f.name for f in fields(default)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key '{unknown[0]}' in {where}; known keys: {', '.join(sorted(names))}")
    for key, value in data.items():
        expected = getattr(default, key)
        if isinstance(expected, bool):
            ok = isinstance(value, bool)
        elif isinstance(expected, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(expected, tuple):
            ok = isinstance(value, list)
        else:  # a stage: a TOML table
            ok = isinstance(value, dict)
        if not ok:
            raise TypeError(f"{key} in {where} has the wrong type ({type(value).__name__})")
    return dict(data)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """TOML arrays become tuples so configs stay immutable and compare equal after a round trip."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}


def _toml_value(value: Any) -> str:
    """TOML literal for the value types a config holds (bool, int, float, str and flat sequences of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"
