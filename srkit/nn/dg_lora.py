"""Degradation-guided LoRA (S3Diff): LoRA layers whose low-rank update is modulated per image.

Each wrapped layer computes  y = W·x + s·B·Cᵀ·A·x  (column-vector convention), where A (r×in) and B (out×r) are
ordinary LoRA factors, s = α/r with peft's default α = 8, and C (r×r) is produced per image from the image's
estimated degradation: Gaussian Fourier features of the (blur, noise) scores → an MLP, concatenated with an MLP of
a learned embedding of the layer's block → a linear "fuse" layer → r² numbers.  One C per image and block.

Parameter names follow peft (`<module>.base_layer`, `<module>.lora_A.<adapter>.weight`, ...) so the official
`s3diff.pkl` entries load as they are.  Implemented natively, with no peft monkey-patching.

Two numerically equivalent forward paths:
- merged (inference with one image in the batch, the common case): W' = W + s·B·Cᵀ·A is computed in float32 once
  per image into a buffer kept by the layer and reused by every later call for that image (both guidance halves,
  every latent tile), so the feature maps see one convolution and no low-rank branch.  Costs one extra copy of
  the wrapped weights; the buffers are reused from image to image (no per-image allocation);
- unmerged (several images with different C, training, or merging switched off): the peft-style
  W·x + s·B(C-mix(A·x)), with C broadcast over the copies of the image batch (classifier-free guidance and batched
  tiles stack copies along the batch axis).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from srkit.diffusion.runtime import fp32_region
from srkit.nn.lora_sites import PEFT_DEFAULT_ALPHA

LORA_ALPHA = float(PEFT_DEFAULT_ALPHA)
"""peft's default lora_alpha, which S3Diff relies on (it is not stored in the checkpoint)."""


class Modulation:
    """The current per-image modulation matrices of one network, shared by all its DG-LoRA layers.

    `matrices` is (images, blocks, r, r) in float32 (C[k, j]: input rank k → output rank j); setting it bumps
    `version`, which tells the layers that their merged weights are stale.  `merge` selects the merged forward
    (see the module docstring); the layers keep their buffers until `DGLoRALayer.release_merged`.
    """

    def __init__(self, matrices: torch.Tensor | None = None, merge: bool = True) -> None:
        self._matrices = matrices
        self.version = 0
        self.merge = merge

    @property
    def matrices(self) -> torch.Tensor | None:
        return self._matrices

    @matrices.setter
    def matrices(self, value: torch.Tensor | None) -> None:
        self._matrices = value
        self.version += 1

    def for_block(self, block: int) -> torch.Tensor:
        if self._matrices is None:
            raise RuntimeError("DG-LoRA modulation is not set; call set_degradation() before running the network")
        return self._matrices[:, block]


def _fits(buffer: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether a merged-weight buffer can hold `weight`'s merge (after a .to(device/dtype) it cannot)."""
    return (
        buffer is not None
        and buffer.shape == weight.shape
        and buffer.dtype == weight.dtype
        and buffer.device == weight.device
    )


class DGLoRALayer(nn.Module):
    """A Linear or Conv2d with a degradation-modulated LoRA branch (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, adapter: str, block: int, modulation: Modulation) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros":
                raise NotImplementedError("DG-LoRA supports plain convolutions (groups 1, dilation 1, zero padding)")
            down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False)
        elif isinstance(base, nn.Linear):
            down = nn.Linear(base.in_features, rank, bias=False)
            up = nn.Linear(rank, base.out_features, bias=False)
        else:
            raise TypeError(f"DG-LoRA wraps Linear or Conv2d layers, not {type(base).__name__}")
        self.base_layer = base
        self.lora_A = nn.ModuleDict({adapter: down})
        self.lora_B = nn.ModuleDict({adapter: up})
        self.adapter = adapter
        self.rank = rank
        self.scaling = LORA_ALPHA / rank
        self.block = block
        self.modulation = modulation
        self._merged: torch.Tensor | None = None  # W' for the image of `_merged_version`, see inference_weight
        self._merged_version = -1
        nn.init.normal_(down.weight, std=1 / rank)  # peft's "gaussian" init: a fresh layer starts as the base
        nn.init.zeros_(up.weight)

    @property
    def down(self) -> nn.Module:
        return self.lora_A[self.adapter]

    @property
    def up(self) -> nn.Module:
        return self.lora_B[self.adapter]

    def merged_weight(self, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """W + s·B·Cᵀ·A for one image's C, accumulated in float32 (into `out` when given, same shape as W)."""
        weight = self.base_layer.weight
        a = self.down.weight.float().reshape(self.rank, -1)
        bc = self.up.weight.float().reshape(-1, self.rank) @ c.float().T
        flat_weight = weight.float().reshape(bc.shape[0], -1)
        if out is None or out.dtype != torch.float32 or not out.is_contiguous():  # bf16 or channels-last
            merged = torch.addmm(flat_weight, bc, a, alpha=self.scaling).reshape(weight.shape)
            return merged if out is None else out.copy_(merged)
        torch.addmm(flat_weight, bc, a, alpha=self.scaling, out=out.view(bc.shape[0], -1))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.inference_weight()
        if weight is None:
            return self._forward_unmerged(x, self.modulation.for_block(self.block))
        base = self.base_layer
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, base.bias)  # the base class's kernel choice (winograd_conv.py)
        return F.linear(x, weight, base.bias)

    def inference_weight(self) -> torch.Tensor | None:
        """The merged weight W + s·B·Cᵀ·A for the current image when the merged path applies (merging on, one
        image, no autograd), computed once per image into a reused buffer; None when the unmerged branch runs."""
        c = self.modulation.for_block(self.block)
        if not self.modulation.merge or c.shape[0] != 1 or torch.is_grad_enabled():
            return None
        weight = self.base_layer.weight
        if self._merged_version != self.modulation.version or not _fits(self._merged, weight):
            with torch.inference_mode(), fp32_region(weight.device):  # the merge NaNs/overflows in fp16/bf16
                buffer = self._merged if _fits(self._merged, weight) else torch.empty_like(weight)
                self._merged = self.merged_weight(c[0], out=buffer)
            self._merged_version = self.modulation.version
        return self._merged

    @property
    def weight_version(self) -> int:
        """Changes whenever `inference_weight` is re-merged (a new image's modulation): a cache key for callers."""
        return self.modulation.version

    @property
    def merged_bytes(self) -> int:
        """Memory held by the merged-weight buffer (0 when none)."""
        return 0 if self._merged is None else self._merged.numel() * self._merged.element_size()

    def release_merged(self) -> None:
        """Free the merged-weight buffer (the next merged call allocates it again)."""
        self._merged, self._merged_version = None, -1

    def _forward_unmerged(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        t = self.down(x.to(self.down.weight.dtype))
        copies, rest = divmod(t.shape[0], c.shape[0])
        if rest:
            raise ValueError(f"batch {t.shape[0]} is not a whole number of copies of the {c.shape[0]} images")
        c = c.repeat(copies, 1, 1)
        with fp32_region(x.device):
            if t.dim() == 4:  # conv: mix the rank channels at every pixel
                t = torch.einsum("nkhw,nkj->njhw", t.float(), c.float())
            else:  # linear: (..., tokens, rank)
                t = (t.float().reshape(t.shape[0], -1, self.rank) @ c.float()).reshape(t.shape)
        t = self.up(t.to(self.up.weight.dtype)) * self.scaling
        return result + t.to(result.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Finding and wrapping target layers (peft's matching rules)


def match_list(names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """peft list semantics: a module matches when its name equals a target or ends with "." + target."""
    targets = list(targets)
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def match_regex(names: Iterable[str], pattern: str) -> list[str]:
    """peft string semantics: the pattern must `re.fullmatch` the module name."""
    return [n for n in names if re.fullmatch(pattern, n)]


def inject(
    model: nn.Module,
    targets: list[str] | str,
    rank: int,
    adapter: str,
    block_of: Callable[[str], int],
    modulation: Modulation,
) -> dict[str, DGLoRALayer]:
    """Wrap every Linear/Conv2d of `model` matched by `targets` in a DGLoRALayer, in place; name -> layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    matched = match_regex(names, targets) if isinstance(targets, str) else match_list(names, targets)
    if not matched:
        raise ValueError(f"no layer of {type(model).__name__} matches the LoRA targets {targets!r}")
    layers = {}
    for name in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = DGLoRALayer(base, rank, adapter, block_of(name), modulation)
        layer.to(base.weight.device, base.weight.dtype)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


# ---------------------------------------------------------------------------------------------------------------
# S3Diff's block layout and the degradation -> C network


def vae_block(name: str) -> int:
    """Row of the VAE block table (6 rows): encoder down_blocks.i -> i, mid_block -> 4, anything else -> 5."""
    parts = name.split(".")
    if parts[1] == "down_blocks":
        return int(parts[2])
    return 4 if parts[1] == "mid_block" else 5


def unet_block(name: str) -> int:
    """Row of the UNet block table (10 rows): down i -> i, mid -> 4, up i -> 5 + i, anything else -> 9."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return 9


def fourier_features(scores: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """(B, n) scores -> (B, 2·n·m): per score [sin(2π·s·w), cos(2π·s·w)], scores in order."""
    projected = scores[..., None] * frequencies[None, None, :] * 2 * math.pi
    features = torch.cat([projected.sin(), projected.cos()], dim=-1)
    return features.flatten(1)


class ModulationHead(nn.Module):
    """For one network: degradation features + block embeddings -> one r×r matrix per block."""

    def __init__(self, rank: int, blocks: int, feature_dim: int = 256, block_dim: int = 64) -> None:
        super().__init__()
        self.rank = rank
        self.de_mlp = nn.Sequential(nn.Linear(feature_dim, 256), nn.ReLU())
        self.block_mlp = nn.Sequential(nn.Linear(block_dim, block_dim), nn.ReLU())
        self.fuse_mlp = nn.Linear(256 + block_dim, rank * rank)
        self.block_embeddings = nn.Embedding(blocks, block_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) -> (B, blocks, r, r); degradation part first, block part second."""
        batch, blocks = features.shape[0], self.block_embeddings.num_embeddings
        de = self.de_mlp(features)[:, None, :].expand(batch, blocks, -1)
        block = self.block_mlp(self.block_embeddings.weight)[None].expand(batch, blocks, -1)
        return self.fuse_mlp(torch.cat([de, block], dim=-1)).reshape(batch, blocks, self.rank, self.rank)


class DegradationGuidance(nn.Module):
    """S3Diff's degradation -> modulation network: shared Fourier frequencies `w`, one head for the VAE encoder
    (6 blocks) and one for the UNet (10 blocks)."""

    def __init__(self, rank_vae: int, rank_unet: int, fourier_dim: int = 64, scores: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(fourier_dim), requires_grad=False)
        feature_dim = 2 * fourier_dim * scores
        self.vae = ModulationHead(rank_vae, 6, feature_dim)
        self.unet = ModulationHead(rank_unet, 10, feature_dim)

    def forward(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2) degradation scores -> (VAE matrices (B,6,rv,rv), UNet matrices (B,10,ru,ru)), float32."""
        features = fourier_features(scores.float(), self.w.float())
        return self.vae(features), self.unet(features)


__all__ = [
    "LORA_ALPHA",
    "DGLoRALayer",
    "DegradationGuidance",
    "Modulation",
    "ModulationHead",
    "fourier_features",
    "inject",
    "match_list",
    "match_regex",
    "unet_block",
    "vae_block",
]
