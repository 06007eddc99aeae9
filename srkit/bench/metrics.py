"""Image-quality metrics for `srkit benchmark`: one table of configurations and one factory (pyiqa's shape).

PSNR and SSIM are srkit's own code, because every SR paper reports them and they need no weights.  They follow
the protocol of the diffusion-SR papers, i.e. pyiqa's `psnr`/`ssim` with `test_y_channel=True,
color_space='ycbcr'`: MATLAB BT.601 luma, no border crop; SSIM on Y rounded to 0..255 in float64 with an 11×11
Gaussian window (σ 1.5, stored in float32 as pyiqa does) and 'valid' filtering.  They reproduce OSEDiff's
published per-image RealSR log to < 1e-5.  Learned metrics (LPIPS, DISTS, NIQE, MUSIQ, MANIQA, CLIPIQA, FID)
come from pyiqa, an optional extra.  pyiqa downloads missing weights on first use, which fails obscurely
offline, so the factory checks the files it will look for *before* building the metric and refuses with one
line naming each file and where it goes.  Names always state the variant (`maniqa_pipal`, `lpips_alex`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from srkit.common import one_line

PYIQA_HUB = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main"
TORCHVISION = "https://download.pytorch.org/models"
MANIQA_VIT = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"
"""timm's default tag of `vit_base_patch8_224`, the backbone MANIQA builds with `pretrained=True`."""


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (package or weights missing); the message is the one line to print."""


# ---------------------------------------------------------------------------------------------------------------
# Weight files that pyiqa (and the libraries it calls) expect to find locally


def torch_hub_dir() -> Path:
    """`torch.hub.get_dir()`: `$TORCH_HOME/hub`, default ~/.cache/torch/hub (pyiqa, torchvision and CLIP use it)."""
    import torch.hub

    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class HubFile:
    """A file under torch.hub's folder: `pyiqa/` (pyiqa weights), `checkpoints/` (torchvision), `clip/`."""

    folder: str
    name: str
    url: str

    def present(self) -> bool:
        return (torch_hub_dir() / self.folder / self.name).is_file()

    def instruction(self) -> str:
        return f"{self.url} -> {torch_hub_dir() / self.folder / self.name}"


@dataclass(frozen=True)
class HfFile:
    """A file in the Hugging Face cache (timm backbones are fetched with `pretrained=True` from there)."""

    repo: str
    names: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")

    def present(self) -> bool:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(self.repo, name), str) for name in self.names)

    def instruction(self) -> str:
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"`hf download {self.repo} {self.names[0]}` -> {HF_HUB_CACHE}"


def pyiqa_file(name: str) -> HubFile:
    return HubFile("pyiqa", name, f"{PYIQA_HUB}/{name}")


ALEXNET = HubFile("checkpoints", "alexnet-owt-7be5be79.pth", f"{TORCHVISION}/alexnet-owt-7be5be79.pth")
VGG16 = HubFile("checkpoints", "vgg16-397923af.pth", f"{TORCHVISION}/vgg16-397923af.pth")
CLIP_RN50 = HubFile(
    "clip",
    "RN50.pt",
    "https://openaipublic.azureedge.net/clip/models/"
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
)


# ---------------------------------------------------------------------------------------------------------------
# srkit's own PSNR / SSIM on the Y channel

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], np.float32)
"""Rows of the BT.601 RGB -> Y matrix for RGB in [0, 1] (MATLAB `rgb2ycbcr`)."""


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """MATLAB-style BT.601 luma in [16/255, 235/255], float32 like pyiqa (so its rounding to 0..255 matches)."""
    return (rgb.astype(np.float32, copy=False) @ _Y_WEIGHTS + np.float32(16.0)) / np.float32(255.0)


def psnr_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """PSNR in dB of the Y channels, data range 1, eps 1e-8 (pyiqa's formula)."""
    diff = y_channel(sr).astype(np.float64) - y_channel(hr)
    return float(10.0 * np.log10(1.0 / (np.mean(diff * diff) + 1e-8)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised Gaussian, rounded through float32 because pyiqa's `fspecial` returns a float32 window."""
    axis = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma * sigma))
    return (window / window.sum()).astype(np.float32).astype(np.float64)


_WINDOW = _gaussian_window()


def _filter_valid(image: np.ndarray) -> np.ndarray:
    """Correlation with the window, keeping only positions where it fits inside the image ('valid')."""
    half = _WINDOW.shape[0] // 2
    full = cv2.filter2D(image, cv2.CV_64F, _WINDOW, borderType=cv2.BORDER_CONSTANT)
    return full[half:-half, half:-half]


def ssim_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """SSIM of the Y channels rounded to 0..255 (as MATLAB reads uint8), float64, data range 255."""
    x = np.rint(y_channel(sr) * np.float32(255.0)).astype(np.float64)
    y = np.rint(y_channel(hr) * np.float32(255.0)).astype(np.float64)
    if min(x.shape) < _WINDOW.shape[0]:
        raise ValueError(f"SSIM needs images of at least {_WINDOW.shape[0]} pixels a side, got {x.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = _filter_valid(x), _filter_valid(y)
    var_x = _filter_valid(x * x) - mu_x * mu_x
    var_y = _filter_valid(y * y) - mu_y * mu_y
    cov = _filter_valid(x * y) - mu_x * mu_y
    contrast_structure = np.maximum((2 * cov + c2) / (var_x + var_y + c2), 0.0)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return float(np.mean(luminance * contrast_structure))


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class MetricSpec:
    """One metric as reports name it; `pyiqa` + `options` say how pyiqa builds it, `own` is srkit's code."""

    name: str
    label: str
    higher_better: bool
    needs_gt: bool
    variant: str
    pyiqa: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    weights: tuple[HubFile | HfFile, ...] = ()
    own: Callable[[np.ndarray, np.ndarray], float] | None = None
    per_image: bool = True
    """False for set-level metrics (FID compares the folder of outputs with the folder of ground truth)."""

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_better else "↓"


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr_y", "PSNR-Y", True, True, "Y of YCbCr (BT.601), dB, no crop; srkit", own=psnr_y),
        MetricSpec("ssim_y", "SSIM-Y", True, True, "Y of YCbCr (BT.601), 11x11 Gaussian, no crop; srkit", own=ssim_y),
        MetricSpec(
            "lpips_alex", "LPIPS-alex", False, True, "pyiqa lpips, AlexNet v0.1", "lpips",
            weights=(pyiqa_file("LPIPS_v0.1_alex-df73285e.pth"), ALEXNET),
        ),
        MetricSpec("dists", "DISTS", False, True, "pyiqa dists", "dists", weights=(pyiqa_file("DISTS_weights-f5e65c96.pth"), VGG16)),
        MetricSpec("niqe", "NIQE", False, False, "pyiqa niqe (Y channel)", "niqe", weights=(pyiqa_file("niqe_modelparameters.mat"),)),
        MetricSpec(
            "musiq_koniq", "MUSIQ-koniq", True, False, "pyiqa musiq, KonIQ-10k", "musiq",
            weights=(pyiqa_file("musiq_koniq_ckpt-e95806b9.pth"),),
        ),
        MetricSpec(
            "maniqa_koniq", "MANIQA-koniq", True, False, "pyiqa maniqa, KonIQ-10k (S3Diff's variant)", "maniqa",
            weights=(pyiqa_file("ckpt_koniq10k.pt"), HfFile(MANIQA_VIT)),
        ),
        MetricSpec(
            "maniqa_pipal", "MANIQA-pipal", True, False, "pyiqa maniqa-pipal (OSEDiff's variant)", "maniqa-pipal",
            weights=(pyiqa_file("MANIQA_PIPAL-ae6d356b.pth"), HfFile(MANIQA_VIT)),
        ),
        MetricSpec(
            "clipiqa_rn50", "CLIPIQA-RN50", True, False, "pyiqa clipiqa, CLIP RN50, 5 prompt pairs", "clipiqa",
            weights=(CLIP_RN50,),
        ),
        MetricSpec(
            "fid_clean", "FID-clean", False, True, "pyiqa fid, clean-fid 'clean' mode, SR folder vs HR folder", "fid",
            weights=(pyiqa_file("pt_inception-2015-12-05-6726825d.pth"),), per_image=False,
        ),
    )
}

ALIASES = {
    "psnr": "psnr_y",
    "ssim": "ssim_y",
    "lpips": "lpips_alex",
    "musiq": "musiq_koniq",
    "maniqa": "maniqa_koniq",
    "clipiqa": "clipiqa_rn50",
    "fid": "fid_clean",
}
"""Short names users type -> the variant pyiqa builds under that name."""

DEFAULT_METRICS = tuple(METRICS)
ALWAYS = ("psnr_y", "ssim_y")
"""Weight-free and reported by every SR paper: computed on every set with ground truth, whatever --metrics says."""


def get_spec(name: str) -> MetricSpec:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in METRICS:
        known = ", ".join([*METRICS, *ALIASES])
        raise ValueError(f"unknown metric '{name}'; known metrics: {known}")
    return METRICS[key]


def resolve_specs(names: list[str] | tuple[str, ...] | None) -> list[MetricSpec]:
    """Specs for `--metrics` (comma lists allowed; None or empty: all); PSNR-Y and SSIM-Y first; each once."""
    parts = [part for name in names or () for part in name.split(",") if part.strip()]
    asked = [get_spec(n) for n in parts] if parts else [METRICS[n] for n in DEFAULT_METRICS]
    chosen = [METRICS[n] for n in ALWAYS] + asked
    return list({spec.name: spec for spec in chosen}.values())


# ---------------------------------------------------------------------------------------------------------------
# The factory


class ImageMetric(Protocol):
    spec: MetricSpec

    def __call__(self, sr: np.ndarray, hr: np.ndarray | None) -> float: ...


class FolderMetric(Protocol):
    spec: MetricSpec

    def __call__(self, sr_dir: Path, hr_dir: Path) -> float: ...


@dataclass
class OwnMetric:
    spec: MetricSpec

    def __call__(self, sr: np.ndarray, hr: np.ndarray | None) -> float:
        assert self.spec.own is not None and hr is not None
        return self.spec.own(sr, hr)


@dataclass
class PyiqaImageMetric:
    """A pyiqa metric on one float32 H×W×3 image in [0, 1] (and its reference for full-reference metrics)."""

    spec: MetricSpec
    model: Any
    device: Any

    def __call__(self, sr: np.ndarray, hr: np.ndarray | None) -> float:
        import torch

        def tensor(image: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device)

        args = (tensor(sr), tensor(hr)) if self.spec.needs_gt else (tensor(sr),)
        return float(self.model(*args).flatten()[0].item())


@dataclass
class PyiqaFolderMetric:
    spec: MetricSpec
    model: Any
    device: Any

    def __call__(self, sr_dir: Path, hr_dir: Path) -> float:
        return float(self.model(str(sr_dir), str(hr_dir), mode="clean", verbose=False))


def missing_weights(spec: MetricSpec) -> list[HubFile | HfFile]:
    return [w for w in spec.weights if not w.present()]


def unavailable_reason(spec: MetricSpec) -> str | None:
    """Why `spec` cannot run here (missing package and/or weight files), as one line; None when it can."""
    if spec.own is not None:
        return None
    problems = []
    if importlib.util.find_spec("pyiqa") is None:
        problems.append("pyiqa is not installed (pip install 'srkit[metrics]')")
    missing = missing_weights(spec)
    if missing:
        problems.append("weights missing, fetch " + "; ".join(w.instruction() for w in missing))
    return "; ".join(problems) or None


def create_metric(name: str, device: Any = "cpu") -> ImageMetric | FolderMetric:
    """Build one metric, or raise MetricUnavailable with the line to print (never triggers a download)."""
    spec = get_spec(name)
    if spec.own is not None:
        return OwnMetric(spec)
    reason = unavailable_reason(spec)
    if reason:
        raise MetricUnavailable(f"{spec.name} skipped: {reason}")
    try:
        import pyiqa

        model = pyiqa.create_metric(spec.pyiqa, device=device, **spec.options)
    except Exception as exc:  # pyiqa and its backbones raise anything from ImportError to URLError
        raise MetricUnavailable(f"{spec.name} skipped: pyiqa could not build '{spec.pyiqa}': {one_line(exc)}") from exc
    wrapper = PyiqaImageMetric if spec.per_image else PyiqaFolderMetric
    return wrapper(spec, model, device)
