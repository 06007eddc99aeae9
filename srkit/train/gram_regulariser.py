"""RFSR's regulariser against reward hacking: a Gram-matrix (style) distance to a frozen reference's output.

The paper calls it a "Gram-KL" term; the released code (`PerceptualLoss(..., gram_norm=True)` in
SeeSR/basicsr/losses/basic_loss.py with `perceptual_weight=0`, notes §2.3) has no KL and no softmax:

1. VGG19 features of both images in [0, 1] (x̂0 of the tuned model, "new", and of the reference, "old"):
   ImageNet mean/std normalisation, then torchvision's `vgg19().features`, tapped *before* the ReLU at
   conv1_2, conv2_2, conv3_4, conv4_4 and conv5_4 (features[2, 7, 16, 25, 34]);
2. per map f (n, c, h, w): reshape to (n, c, h·w) in float32; with `normalise`, a parameter-free LayerNorm
   over the whole (c, h·w) slab of each sample (eps 1e-5); G = f·fᵀ / (c·h·w); cast to float16 (`fp16`);
3. loss = weight · Σ_k w_k · mean|G_k(new) − G_k(old)|, with layer weights {0.1, 0.1, 1, 1, 1}.

With `fp16` the L1s, their weighted sum and the final weight stay in float16 as released, which is why the
script's weight 5e-7 usually underflows to 0 (see `RFSRLossSettings.gram_fp16`).  The reference features
carry no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg

from srkit.registry import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_FILE = "vgg19-dcbb9e9d.pth"
"""torchvision's ImageNet VGG19, the file basicsr's VGGFeatureExtractor loads."""


def vgg_layer_names(features: nn.Sequential) -> list[str]:
    """basicsr's names for `features[i]`: convB_L, reluB_L within block B, then poolB (index = position)."""
    names, block, layer = [], 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            layer += 1
            names.append(f"conv{block}_{layer}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{layer}")
        elif isinstance(module, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, layer = block + 1, 0
        else:
            raise TypeError(f"unexpected VGG layer {module!r}")
    return names


class VGG19Taps(nn.Module):
    """Frozen VGG19 returning the pre-ReLU outputs of the named conv layers for images in [0, 1]."""

    def __init__(self, layers: Iterable[str]) -> None:
        super().__init__()
        # torchvision's own definition of vgg19().features, without building the 120M-parameter classifier
        features = vgg.make_layers(vgg.cfgs["E"])
        names = vgg_layer_names(features)
        self.layers = tuple(layers)
        unknown = [name for name in self.layers if name not in names or not name.startswith("conv")]
        if unknown:
            raise ValueError(f"not conv layers of VGG19: {', '.join(unknown)}")
        self.tap_index = {names.index(name): name for name in self.layers}
        self.features = features[: max(self.tap_index) + 1]
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # an in-place ReLU would overwrite the tapped conv output
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load torchvision's VGG19 state dict (vgg19-dcbb9e9d.pth, keys `features.N.*`); one-line errors."""
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"VGG19 weights not found: {path} (torchvision's {VGG19_FILE})")
        state = torch.load(path, map_location="cpu", weights_only=True)
        wanted = {f"features.{key}": key for key in self.features.state_dict()}
        missing = [key for key in wanted if key not in state]
        if missing:
            raise WeightsError(f"{path} is not torchvision's VGG19: missing {', '.join(missing[:3])}")
        self.features.load_state_dict({local: state[key] for key, local in wanted.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images - self.mean) / self.std
        taps = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.tap_index:
                taps[self.tap_index[index]] = x
        return taps


def gram_matrix(features: torch.Tensor, *, normalise: bool, fp16: bool) -> torch.Tensor:
    """(n, c, h, w) -> (n, c, c): G = f·fᵀ/(c·h·w) in float32 (f LayerNormed over (c, h·w) when `normalise`),
    cast to float16 when `fp16` as the released `_gram_mat` does."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w).float()
    if normalise:
        flat = F.layer_norm(flat, flat.shape[1:])
    gram = flat.bmm(flat.transpose(1, 2)) / (c * h * w)
    return gram.half() if fp16 else gram


def gram_style_loss(
    new: Mapping[str, torch.Tensor],
    old: Mapping[str, torch.Tensor],
    layer_weights: Mapping[str, float],
    weight: float,
    *,
    normalise: bool,
    fp16: bool,
) -> torch.Tensor:
    """weight · Σ_k w_k · mean|G(new_k) − G(old_k)| over the layers of `layer_weights` (float16 if `fp16`)."""
    total = sum(
        F.l1_loss(
            gram_matrix(new[k], normalise=normalise, fp16=fp16),
            gram_matrix(old[k], normalise=normalise, fp16=fp16),
        )
        * layer_weight
        for k, layer_weight in layer_weights.items()
    )
    return total * weight


class GramRegulariser(nn.Module):
    """The released regulariser on images in [0, 1]: `forward(new, reference)`; gradient flows to `new`."""

    def __init__(
        self,
        weight: float,
        layer_weights: Mapping[str, float],
        *,
        normalise: bool = True,
        fp16: bool = True,
        vgg_weights: str | Path | None = None,
    ) -> None:
        """`vgg_weights`: torchvision's VGG19 file; None leaves the network randomly initialised (tests)."""
        super().__init__()
        self.weight = weight
        self.layer_weights = dict(layer_weights)
        self.normalise = normalise
        self.fp16 = fp16
        self.vgg = VGG19Taps(self.layer_weights)
        if vgg_weights is not None:
            self.vgg.load_torchvision_weights(vgg_weights)

    def forward(self, new: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        new_features = self.vgg(new)
        with torch.no_grad():
            reference_features = self.vgg(reference)
        return gram_style_loss(
            new_features,
            reference_features,
            self.layer_weights,
            self.weight,
            normalise=self.normalise,
            fp16=self.fp16,
        )


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG19_FILE",
    "GramRegulariser",
    "VGG19Taps",
    "gram_matrix",
    "gram_style_loss",
    "vgg_layer_names",
]
