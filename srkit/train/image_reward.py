"""ImageReward (Xu et al., 2023; THUDM/ImageReward) as a differentiable reward, loading the released files.

The `image-reward` package (1.5) cannot be used here: it imports helpers that transformers 5 removed from
`transformers.modeling_utils`, imports OpenAI's `clip` without declaring it (which needs `pkg_resources`),
and pins timm 0.6.13.  Its scorer is small, so srkit rebuilds the same network from transformers' BLIP
blocks:

1. preprocessing of the [0, 1] image, as RFSR's `ImageRewardLoss`: Resize(224, bicubic; the shorter side to
   224, the long side to int(224·long/short)) → CenterCrop(224) → Normalize(CLIP mean, std);
2. BLIP ViT-L/16 image tokens (`blip.visual_encoder`: pre-norm blocks, LayerNorm eps 1e-6, final norm);
3. BLIP's BERT text encoder over the prompt tokens, with cross-attention to all image tokens and
   bidirectional self-attention (`blip.text_encoder`, BLIP's "multimodal" mode, shaped by med_config.json);
4. the MLP head (five linear layers, no activations) on the [CLS] feature;
5. reward = (mlp − 0.16717362830052426) / 1.0333394966054072: `ImageReward.score_gard` (image-reward ≥ 1.3).

Prompts are tokenised by bert-base-uncased's vocabulary plus BLIP's two added tokens ([DEC], [ENC]), padded
and truncated to 35 tokens as RFSR's dataset does.  The files: `ImageReward.pt` and `med_config.json` from
the hub repo THUDM/ImageReward, `vocab.txt` from google-bert/bert-base-uncased.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from torch import nn
from torchvision.transforms import InterpolationMode
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from srkit.registry import WeightsError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35
VIT_HEAD_DIM = 64
"""BLIP's ViTs (B/16: 768 wide, 12 heads; L/16: 1024, 16 heads) all have 64-dim heads; a checkpoint has no
head count, so it is derived from the width."""

CHECKPOINT_FILE, MED_CONFIG_FILE, VOCAB_FILE = "ImageReward.pt", "med_config.json", "vocab.txt"
SHAPE_KEYS = tuple(
    f"blip.visual_encoder.{key}"
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
) + ("mlp.layers.0.weight",)
"""The checkpoint keys the networks' shapes are read from."""
SOURCES = {
    CHECKPOINT_FILE: "THUDM/ImageReward",
    MED_CONFIG_FILE: "THUDM/ImageReward",
    VOCAB_FILE: "google-bert/bert-base-uncased",
}


def preprocess(images: torch.Tensor, size: int = 224, *, antialias: bool) -> torch.Tensor:
    """RFSR's ImageReward preprocessing of (B, 3, H, W) images in [0, 1], differentiable."""
    resized = TF.resize(images, [size], interpolation=InterpolationMode.BICUBIC, antialias=antialias)
    return TF.normalize(TF.center_crop(resized, [size, size]), CLIP_MEAN, CLIP_STD)


# ------------------------------------------------------------------------------------------------------------
# The released checkpoint -> transformers' BLIP modules

_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)
"""BLIP's `VisionTransformer` names -> `BlipVisionModel`'s (the text encoder's names already match)."""


def _rename_vision_key(key: str) -> str:
    for pattern, replacement in _VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def _section(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def vision_config(vision_state: Mapping[str, torch.Tensor]) -> BlipVisionConfig:
    """The ViT's shape, read from its weights (width, depth, patch, image size, MLP width)."""
    width = vision_state["cls_token"].shape[-1]
    patch = vision_state["patch_embed.proj.weight"].shape[-1]
    grid = round((vision_state["pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({key.split(".")[1] for key in vision_state if key.startswith("blocks.")})
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_state["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )


def text_config(med_config: Mapping, vision_width: int) -> BlipTextConfig:
    """BLIP's BERT config (med_config.json) as a `BlipTextConfig` cross-attending to `vision_width` tokens."""
    absolute = med_config.get("position_embedding_type", "absolute") == "absolute"
    if not (absolute and med_config.get("add_cross_attention")):
        raise WeightsError(
            "med_config.json is not BLIP's text encoder (needs absolute positions, cross-attention)"
        )
    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id",
    )  # fmt: skip
    return BlipTextConfig(
        **{key: med_config[key] for key in keys if key in med_config},
        encoder_hidden_size=vision_width,  # BLIP_Pretrain overrides `encoder_width` with the ViT's width
        is_decoder=True,  # transformers adds cross-attention only to a "decoder"; it runs bidirectionally
        bos_token_id=None,  # the special-token ids only matter for generation, which a scorer never does
        eos_token_id=None,
        sep_token_id=None,
    )


def reward_head(head_state: Mapping[str, torch.Tensor]) -> nn.Sequential:
    """ImageReward's MLP (`mlp.layers.{0,2,4,6,7}`; the gaps are dropouts, identities in a frozen scorer)."""
    weights = {int(key.split(".")[0]): value for key, value in head_state.items() if key.endswith(".weight")}
    layers: list[nn.Module] = [nn.Identity() for _ in range(max(weights) + 1)]
    for index, weight in weights.items():
        layers[index] = nn.Linear(weight.shape[1], weight.shape[0])
    head = nn.Sequential(*layers)
    _load_strict(head, head_state, "the reward head")
    return head


def _load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()
) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.endswith(ignore)]
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise WeightsError(f"{what} does not match BLIP's layout: {detail}")


# ------------------------------------------------------------------------------------------------------------
# The scorer


class ImageRewardScorer(nn.Module):
    """ImageReward's `score_gard` on [0, 1] images and prompt strings: (B,) rewards, frozen and always in eval
    mode (dropout would make the reward random)."""

    name = "image_reward"

    def __init__(
        self,
        vision: BlipVisionModel,
        text: BlipTextModel,
        head: nn.Sequential,
        tokenizer: BertTokenizer,
        *,
        antialias: bool = False,
    ) -> None:
        """`antialias`: see `RFSRLossSettings.image_reward_antialias` (False = RFSR's released training)."""
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.antialias = antialias
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(
        cls, checkpoint: str | Path, med_config: str | Path, vocab: str | Path, *, antialias: bool = False
    ) -> ImageRewardScorer:
        """Build from the released `ImageReward.pt`, `med_config.json` and bert-base-uncased's `vocab.txt`."""
        paths = {
            CHECKPOINT_FILE: Path(checkpoint),
            MED_CONFIG_FILE: Path(med_config),
            VOCAB_FILE: Path(vocab),
        }
        missing = [
            f"{name} ({SOURCES[name]}) at {path}" for name, path in paths.items() if not path.is_file()
        ]
        if missing:
            raise WeightsError(f"ImageReward files missing: {'; '.join(missing)}")
        state = torch.load(paths[CHECKPOINT_FILE], map_location="cpu", weights_only=True)
        absent = [key for key in SHAPE_KEYS if key not in state]
        if absent:
            raise WeightsError(f"{paths[CHECKPOINT_FILE]} is not ImageReward's: no {', '.join(absent[:3])}")
        vision_state = _section(state, "blip.visual_encoder.")
        vision = BlipVisionModel(vision_config(vision_state))
        _load_strict(vision, {_rename_vision_key(k): v for k, v in vision_state.items()}, "the ViT")
        med = json.loads(paths[MED_CONFIG_FILE].read_text())
        text = BlipTextModel(text_config(med, vision.config.hidden_size), add_pooling_layer=False)
        text_state = _section(state, "blip.text_encoder.")
        _load_strict(text, text_state, "the text encoder", ignore=("position_ids",))
        head = reward_head(_section(state, "mlp.layers."))
        tokenizer = BertTokenizer(str(paths[VOCAB_FILE]), do_lower_case=True)
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        return cls(vision, text, head, tokenizer, antialias=antialias)

    def train(self, mode: bool = True) -> ImageRewardScorer:
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, 35): padded and truncated as RFSR's dataset tokenises."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=PROMPT_TOKENS,
            return_tensors="pt",
        )
        return tokens.input_ids, tokens.attention_mask

    def score_tokens(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """`score_gard`: rewards (B,) of preprocessed images and their prompt tokens."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(
            input_ids=input_ids.to(image_tokens.device),
            attention_mask=attention_mask.to(image_tokens.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return ((self.head(text[:, 0]) - REWARD_MEAN) / REWARD_STD).squeeze(-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        pixels = preprocess(images, self.vision.config.image_size, antialias=self.antialias)
        return self.score_tokens(pixels, *self.tokenize(prompts))


__all__ = ["ImageRewardScorer", "preprocess", "reward_head", "text_config", "vision_config"]
