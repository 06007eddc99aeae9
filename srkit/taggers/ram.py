"""RAM (Recognize Anything, Swin-L) as the image tagger of OSEDiff, GDPO-SR and SeeSR; DAPE is RAM + a LoRA.

The procedure, as upstream runs it (`ram/models/ram_lora.py`, `test_osediff.py`, `test_seesr.py`):
1. preprocess: the [0, 1] image is resized to 384² (bilinear, aspect ratio not kept) and ImageNet-normalised;
2. image embeddings: `image_proj(swin(x))`, (B, 1 + 144, 512), the mean token first; SeeSR attends to these;
3. logits: one query per class, relu(wordvec_proj(label_embed)), cross-attends to the embeddings through a
   2-layer BERT stack whose self-attention was deleted (Query2Label), then `fc` → one logit per class;
4. tags: class i fires iff sigmoid(logit_i) > threshold_i (strict, fp32); names in class-index order, joined.

Which image goes in is the caller's choice, and upstream differs: OSEDiff and GDPO tag the ×4-upsampled input
they restore, SeeSR the raw LR before its ×4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srkit.nn.swin import SwinTransformer

RAM_SWIN_L_384: dict[str, Any] = {
    "vision_width": 1536,
    "image_res": 384,
    "window_size": 12,
    "embed_dim": 192,
    "depths": [2, 2, 18, 2],
    "num_heads": [6, 12, 24, 48],
}
"""Upstream `ram/configs/swin/config_swinL_384.json` (the keys the encoder needs)."""

RAM_Q2L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}
"""Upstream `ram/configs/q2l_config.json` (the keys the tagging head needs)."""

LABEL_WIDTH = 512
"""Width of `label_embed`, of `image_proj`'s output and of the head's cross-attention context (fixed)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

UPSTREAM_ANTIALIAS = False
"""Upstream resizes the tensor with `transforms.Resize((384, 384))`.  The published environments pin torch
2.0.1 with torchvision 0.15, whose tensor default resolves to no antialias; torchvision ≥ 0.17 antialiases.
The two differ only when an axis shrinks (the ×4 input of OSEDiff/GDPO, not SeeSR's small LR)."""


def preprocess(images: torch.Tensor, size: int, antialias: bool = UPSTREAM_ANTIALIAS) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) → the encoder's input (B, 3, size, size): bilinear resize, ImageNet norm."""
    resized = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
    )
    mean = resized.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = resized.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (resized - mean) / std


class CrossAttention(nn.Module):
    """BERT attention of the label queries over the image tokens (keys `query`/`key`/`value`)."""

    def __init__(self, hidden: int, context: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context, hidden)
        self.value = nn.Linear(context, hidden)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = queries.shape
        head_dim = hidden // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        scores = heads(self.query(queries)) @ heads(self.key(context)).transpose(-1, -2) / head_dim**0.5
        out = scores.softmax(dim=-1) @ heads(self.value(context))
        return out.transpose(1, 2).reshape(batch, length, hidden)


class AddNorm(nn.Module):
    """BERT's output sub-layer: LayerNorm(dense(x) + residual)."""

    def __init__(self, width_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class TaggingLayer(nn.Module):
    """A BERT layer with only cross-attention and feed-forward (upstream deletes the self-attention)."""

    def __init__(self, hidden: int, intermediate: int, num_heads: int, eps: float):
        super().__init__()
        self.crossattention = nn.ModuleDict(
            {"self": CrossAttention(hidden, LABEL_WIDTH, num_heads), "output": AddNorm(hidden, hidden, eps)}
        )
        self.intermediate = Intermediate(hidden, intermediate)
        self.output = AddNorm(intermediate, hidden, eps)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.crossattention["output"](self.crossattention["self"](h, context), h)
        return self.output(self.intermediate(h), h)


class TaggingHead(nn.Module):
    """The Query2Label decoder (`tagging_head.encoder.layer.N.*`); no embeddings, no self-attention."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        if config["hidden_act"] != "gelu":
            raise ValueError(
                f"q2l config: hidden_act '{config['hidden_act']}' is not supported (RAM uses 'gelu')"
            )
        layers = [
            TaggingLayer(
                config["hidden_size"],
                config["intermediate_size"],
                config["num_attention_heads"],
                config["layer_norm_eps"],
            )
            for _ in range(config["num_hidden_layers"])
        ]
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(layers)})

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder["layer"]:
            queries = layer(queries, context)
        return queries


class RAM(nn.Module):
    """The tagging path of upstream's RAM/RAMLora; parameter names are the checkpoint's (after renames)."""

    def __init__(
        self,
        num_classes: int,
        swin_config: Mapping[str, Any] = RAM_SWIN_L_384,
        q2l_config: Mapping[str, Any] = RAM_Q2L,
    ):
        super().__init__()
        self.image_size = swin_config["image_res"]
        self.visual_encoder = SwinTransformer(
            image_size=swin_config["image_res"],
            embed_dim=swin_config["embed_dim"],
            depths=list(swin_config["depths"]),
            num_heads=list(swin_config["num_heads"]),
            window=swin_config["window_size"],
        )
        if self.visual_encoder.num_features != swin_config["vision_width"]:
            raise ValueError(
                f"Swin config: vision_width {swin_config['vision_width']} but the last stage has "
                f"{self.visual_encoder.num_features} channels"
            )
        self.image_proj = nn.Linear(swin_config["vision_width"], LABEL_WIDTH)
        hidden = q2l_config["hidden_size"]
        self.label_embed = nn.Parameter(torch.zeros(num_classes, LABEL_WIDTH))
        self.wordvec_proj = nn.Linear(LABEL_WIDTH, hidden) if hidden != LABEL_WIDTH else nn.Identity()
        self.tagging_head = TaggingHead(q2l_config)
        self.fc = nn.Linear(hidden, 1)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) → (B, 1 + L, 512): upstream's `generate_image_embeds`."""
        return self.image_proj(self.visual_encoder(pixels))

    def logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, 512) → (B, num_classes) logits: the `fc` output inside upstream's `generate_tag`."""
        queries = F.relu(self.wordvec_proj(self.label_embed))
        queries = queries.unsqueeze(0).expand(image_embeds.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1)


class RAMTagger:
    """A loaded RAM (or DAPE) with tag names and per-class thresholds; implements `srkit.taggers.Tagger`."""

    def __init__(
        self,
        model: RAM,
        tag_names: Sequence[str],
        thresholds: torch.Tensor,
        antialias: bool = UPSTREAM_ANTIALIAS,
        separator: str = ", ",
        autocast_dtype: torch.dtype | None = None,
    ):
        """`separator`: ", " in the DAPE copies (OSEDiff, GDPO, SeeSR), " | " in xinyu1205's RAM.
        `autocast_dtype`: fp16/bf16 autocast when the model sits on CUDA; CPU always runs fp32."""
        if not len(tag_names) == len(thresholds) == model.label_embed.shape[0]:
            classes = model.label_embed.shape[0]
            raise ValueError(f"{len(tag_names)} tag names, {len(thresholds)} thresholds, {classes} classes")
        self.model = model.eval()
        self.tag_names = list(tag_names)
        self.thresholds = thresholds.float()
        self.antialias = antialias
        self.separator = separator
        self.autocast_dtype = autocast_dtype

    @property
    def device(self) -> torch.device:
        return self.model.label_embed.device

    def _autocast(self):
        if self.device.type == "cuda" and self.autocast_dtype not in (None, torch.float32):
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return nullcontext()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess(images.to(self.device, torch.float32), self.model.image_size, self.antialias)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.image_embeds(self.preprocess(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.tags_embeds_logits(images)[2]

    def tags(self, images: torch.Tensor) -> list[str]:
        return self.tags_embeds_logits(images)[0]

    @torch.no_grad()
    def tags_embeds_logits(self, images: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Everything from one encoder pass (SeeSR needs both the tags and the embeddings of an image)."""
        with self._autocast():
            embeds = self.model.image_embeds(self.preprocess(images))
            logits = self.model.logits(embeds)
        return self.tag_strings(logits), embeds, logits.float()

    def tagged(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C) bool: sigmoid(logit) strictly above the class threshold, compared in fp32 as upstream."""
        return torch.sigmoid(logits.float()) > self.thresholds.to(logits.device)

    def tag_strings(self, logits: torch.Tensor) -> list[str]:
        """Per image, the names of the tagged classes in class-index order, joined ("" when none fire)."""
        return [
            self.separator.join(self.tag_names[i] for i in row.nonzero().flatten().tolist())
            for row in self.tagged(logits).cpu()
        ]
