"""RAM / DAPE tagger: golden parity with the official code (fixture ../shared/golden/ram_dape_tiny, see its
README), strict loading, and the DAPE merge.

The golden tests load the fixture through the normal path (`load_ram_tagger`: `{"model": ...}` checkpoint,
official renames, DAPE merged at load) with the fixture's own configs, and compare every case in cases.json:
pixels, image embeddings and logits at the README's 1e-4, tag indices, tag strings and prompts exactly.
The fixture ships no tag-list files, so they are written in a temporary folder: thresholds from the stored
`class_threshold`, names of the classes the cases tag from cases.json, placeholders for the rest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from golden import fixture_dir, json_fixture, needs, tensors_fixture
from PIL import Image

from srkit.diffusion.text import QUALITY_PROMPT, compose_prompt
from srkit.nn.swin import resize_relative_position_table
from srkit.registry import WeightsError
from srkit.taggers.ram import RAM, RAMTagger, preprocess
from srkit.taggers.ram_weights import load_ram_tagger, merge_dape, read_tag_list, read_thresholds

GOLDEN = fixture_dir("ram_dape_tiny")
TOLERANCE = 1e-4
ANTIALIAS = {"tv015": False, "tv029": True}
"""Fixture resize variants: torchvision 0.15 (no antialias on tensors) and ≥ 0.17 (antialias)."""
DAPE_MODEL = "RAM+DAPE"
MAX_ERRORS: dict[str, float] = {}

golden = needs(GOLDEN)


def record(group: str, error: float) -> float:
    MAX_ERRORS[group] = max(MAX_ERRORS.get(group, 0.0), error)
    print(f"max |diff| {group}: {MAX_ERRORS[group]:.3g}")
    return error


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def read_image(path: Path) -> torch.Tensor:
    pixels = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


spec = json_fixture(GOLDEN / "cases.json")


expected = tensors_fixture(GOLDEN / "expected.safetensors")


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    folder = GOLDEN / "configs"
    return {
        "swin_config": json.loads((folder / "swin" / "config_swinL_384.json").read_text()),
        "q2l_config": json.loads((folder / "q2l_config.json").read_text()),
    }


@pytest.fixture(scope="module")
def tag_files(tmp_path_factory, spec, expected) -> dict[str, Path]:
    thresholds = expected["class_threshold"]
    names = [f"placeholder class {i}" for i in range(len(thresholds))]
    for case in spec["cases"]:
        tags = case["tags"].split(", ") if case["tags"] else []
        assert len(tags) == len(case["tag_indices"])
        for index, name in zip(case["tag_indices"], tags, strict=True):
            names[index] = name
    folder = tmp_path_factory.mktemp("ram_tags")
    (folder / "ram_tag_list.txt").write_text("\n".join(names), encoding="utf-8")
    (folder / "ram_tag_list_threshold.txt").write_text("\n".join(repr(v) for v in thresholds.tolist()) + "\n")
    return {"tag_list": folder / "ram_tag_list.txt", "thresholds": folder / "ram_tag_list_threshold.txt"}


@pytest.fixture(scope="module")
def taggers(configs, tag_files) -> dict[str, RAMTagger]:
    """Each checkpoint loaded once per module: plain RAM and RAM + DAPE, keyed by cases.json's `model`."""
    common = {**tag_files, **configs}
    return {
        "RAM": load_ram_tagger(GOLDEN / "ram_tiny.pth", **common),
        DAPE_MODEL: load_ram_tagger(
            GOLDEN / "ram_tiny.pth", dape_checkpoint=GOLDEN / "dape_tiny.pth", **common
        ),
    }


@golden
def test_golden_ram_threshold_and_tag_files(tag_files, expected, spec):
    assert torch.equal(read_thresholds(tag_files["thresholds"]), expected["class_threshold"])
    names = read_tag_list(tag_files["tag_list"])
    assert len(names) == len(expected["class_threshold"])
    for case in spec["cases"]:
        assert [names[i] for i in case["tag_indices"]] == (case["tags"].split(", ") if case["tags"] else [])


@golden
def test_golden_ram_preprocess(spec, expected, taggers):
    size = taggers["RAM"].model.image_size
    for image in spec["images"]:
        pixels = read_image(GOLDEN / image["file"])
        assert pixels.shape[-2:] == (image["height"], image["width"])
        for variant in image["preprocess_variants"]:
            ours = preprocess(pixels, size, antialias=ANTIALIAS[variant])
            assert (
                record("pixel_values", max_abs(ours, expected[f"{image['name']}.{variant}.pixel_values"]))
                <= TOLERANCE
            )


@golden
@pytest.mark.parametrize("model", ["RAM", DAPE_MODEL])
def test_golden_ram_dape_embeds_logits_tags(spec, expected, taggers, model):
    """From the stored pixels (so the model check is independent of the resize): embeddings, logits, tags."""
    tagger = taggers[model]
    cases = [case for case in spec["cases"] if case["model"] == model]
    assert cases
    for case in cases:
        pixels = expected[f"{case['image']}.{case['preprocess']}.pixel_values"]
        with torch.no_grad():
            embeds = tagger.model.image_embeds(pixels)
            logits = tagger.model.logits(embeds)
        assert (
            record(f"{model} image_embeds", max_abs(embeds, expected[f"{case['id']}.image_embeds"]))
            <= TOLERANCE
        )
        assert record(f"{model} logits", max_abs(logits, expected[f"{case['id']}.logits"])) <= TOLERANCE
        assert tagger.tagged(logits)[0].nonzero().flatten().tolist() == case["tag_indices"]
        assert tagger.tag_strings(logits) == [case["tags"]]


@golden
def test_golden_ram_dape_tags_and_prompts_from_images(spec, taggers):
    """The whole path from the PNG: resize variant → tags (", " and xinyu1205's " | ") → each prompt."""
    for case in spec["cases"]:
        image = next(entry for entry in spec["images"] if entry["name"] == case["image"])
        loaded = taggers[case["model"]]
        tagger = RAMTagger(
            loaded.model, loaded.tag_names, loaded.thresholds, antialias=ANTIALIAS[case["preprocess"]]
        )
        tags, _, logits = tagger.tags_embeds_logits(read_image(GOLDEN / image["file"]))
        assert tags == [case["tags"]], case["id"]
        assert compose_prompt(tags[0], "") == case["prompt_osediff"]
        assert compose_prompt(tags[0], QUALITY_PROMPT) == case["prompt_gdpo"]
        assert compose_prompt(tags[0], "", QUALITY_PROMPT) == case["prompt_seesr"]
        if case.get("tags_xinyu1205") is not None:
            xinyu1205 = RAMTagger(loaded.model, loaded.tag_names, loaded.thresholds, separator=" | ")
            assert xinyu1205.tag_strings(logits) == [case["tags_xinyu1205"]]


@golden
def test_golden_ram_relpos_tables(expected):
    tables = [key[: -len(".src")] for key in expected if key.startswith("relpos.") and key.endswith(".src")]
    assert tables
    for key in tables:
        target = expected[f"{key}.dst"]
        window = (round(target.shape[0] ** 0.5) + 1) // 2
        ours = resize_relative_position_table(expected[f"{key}.src"], window)
        assert record("relpos dst", max_abs(ours, target)) <= TOLERANCE


@golden
def test_golden_ram_relpos_checkpoint_and_layout_variants(tmp_path, spec, expected, configs, tag_files):
    """Small-window tables are resampled at load; the head may be stored as `tagging_head.` too; the shift
    masks a real checkpoint may hold (omitted from the fixture) are dropped like upstream does."""
    state = torch.load(GOLDEN / "ram_tiny.pth", map_location="cpu", weights_only=True)["model"]
    for key in [k for k in expected if k.startswith("relpos.") and k.endswith(".src")]:
        state[key[len("relpos.") : -len(".src")]] = expected[key]
    state = {name.replace("vision_multi.", "tagging_head."): value for name, value in state.items()}
    state["visual_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "ram_small_window.pth")
    tagger = load_ram_tagger(tmp_path / "ram_small_window.pth", **tag_files, **configs)

    case = spec["relpos"]["case"]
    logits_key = next(k for k in expected if k.startswith("relpos_") and k.endswith(f".{case}.ram.logits"))
    prefix = logits_key.removesuffix(".logits")
    with torch.no_grad():
        embeds = tagger.model.image_embeds(expected[f"{case}.pixel_values"])
        logits = tagger.model.logits(embeds)
    assert record("relpos image_embeds", max_abs(embeds, expected[f"{prefix}.image_embeds"])) <= TOLERANCE
    assert record("relpos logits", max_abs(logits, expected[f"{prefix}.logits"])) <= TOLERANCE
    assert tagger.tag_strings(logits) == [spec["relpos"]["tags"]]


@golden
@pytest.mark.parametrize(
    "edit, key_in_message",
    [
        ("drop:image_proj.weight", "image_proj.weight"),
        (
            "add:visual_encoder.layers.0.blocks.0.attn.extra.weight",
            "visual_encoder.layers.0.blocks.0.attn.extra.weight",
        ),
        ("unwrap", "no 'model' state dict"),
    ],
)
def test_golden_ram_strict_loading_errors(tmp_path, configs, tag_files, edit, key_in_message):
    checkpoint = torch.load(GOLDEN / "ram_tiny.pth", map_location="cpu", weights_only=True)
    action, _, key = edit.partition(":")
    if action == "drop":
        del checkpoint["model"][key]
    elif action == "add":
        checkpoint["model"][key] = torch.zeros(1)
    else:
        checkpoint = checkpoint["model"]
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as error:
        load_ram_tagger(tmp_path / "bad.pth", **tag_files, **configs)
    assert key_in_message in str(error.value) and "\n" not in str(error.value)


@golden
def test_golden_dape_strict_loading_error(tmp_path, configs, tag_files):
    dape = torch.load(GOLDEN / "dape_tiny.pth", map_location="cpu", weights_only=True)
    dape["tagging_head.encoder.layer.0.crossattention.self.unknown.lora_A"] = torch.zeros(8, 4)
    dape["tagging_head.encoder.layer.0.crossattention.self.unknown.lora_B"] = torch.zeros(4, 8)
    torch.save(dape, tmp_path / "bad_dape.pth")
    with pytest.raises(WeightsError) as error:
        load_ram_tagger(
            GOLDEN / "ram_tiny.pth", dape_checkpoint=tmp_path / "bad_dape.pth", **tag_files, **configs
        )
    assert "crossattention.self.unknown" in str(error.value) and "\n" not in str(error.value)


TINY_SWIN = {
    "vision_width": 32,
    "image_res": 96,
    "window_size": 12,
    "embed_dim": 16,
    "depths": [2, 2],
    "num_heads": [2, 4],
}
TINY_Q2L = {
    "hidden_size": 24,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}


def random_dape(model: RAM, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """loralib-named adapters on every module DAPE adapts, plus tied and untied caption-encoder pairs."""

    def pair(name: str, fan_in: int, fan_out: int, groups: int = 1) -> dict[str, torch.Tensor]:
        return {
            f"{name}.lora_A": torch.randn(groups * rank, fan_in, generator=generator) * 0.3,
            f"{name}.lora_B": torch.randn(groups * fan_out, rank, generator=generator) * 0.3,
        }

    dape: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.endswith("attn.qkv"):
            dape |= pair(name, module.in_features, module.out_features // 3, groups=2)
        elif re.search(r"crossattention\.self\.(query|key)$", name):
            dape |= pair(name, module.in_features, module.out_features)
            dape |= pair(
                name.replace("tagging_head.", "tag_encoder."), module.in_features, module.out_features
            )
    dape |= pair("tag_encoder.encoder.layer.7.crossattention.self.query", 4, 4)  # not tied: caption only
    dape |= pair("text_decoder.bert.encoder.layer.0.attention.self.query", 4, 4)
    return dape


def add_unmerged_lora(model: RAM, dape: dict[str, torch.Tensor]) -> None:
    """loralib's unmerged evaluation as forward hooks: y += x·Aᵀ·Bᵀ/r, the tied caption adapters on the head's
    modules too; qkv adapters only on the q and v thirds."""
    modules = dict(model.named_modules())
    for key in [k for k in dape if k.endswith(".lora_A")]:
        name = key[: -len(".lora_A")]
        target = name.replace("tag_encoder.", "tagging_head.")
        if target not in modules:
            continue
        down, up = dape[key], dape[f"{name}.lora_B"]
        rank = up.shape[1]

        def hook(module, inputs, output, down=down, up=up, rank=rank):
            if down.shape[0] == rank:
                return output + inputs[0] @ down.T @ up.T / rank
            q, v = (inputs[0] @ a.T @ b.T / rank for a, b in zip(down.chunk(2), up.chunk(2), strict=True))
            return output + torch.cat([q, torch.zeros_like(q), v], dim=-1)

        modules[target].register_forward_hook(hook)


def test_dape_merge_equals_unmerged_lora():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    merged = RAM(10, TINY_SWIN, TINY_Q2L).eval()
    with torch.no_grad():
        for param in merged.parameters():
            param.normal_(0, 0.2, generator=generator)
    unmerged = RAM(10, TINY_SWIN, TINY_Q2L).eval()
    unmerged.load_state_dict(merged.state_dict())
    dape = random_dape(merged, rank=8, generator=generator)

    pixels = torch.randn(2, 3, 96, 96, generator=generator)
    with torch.no_grad():
        base_logits = unmerged.logits(unmerged.image_embeds(pixels))
    count = merge_dape(merged, dape, "random DAPE")
    add_unmerged_lora(unmerged, dape)
    with torch.no_grad():
        embeds = merged.image_embeds(pixels)
        reference_embeds = unmerged.image_embeds(pixels)
        logits, reference_logits = merged.logits(embeds), unmerged.logits(reference_embeds)
    head_layers = len(merged.tagging_head.encoder["layer"])
    assert (
        count == sum(TINY_SWIN["depths"]) + 2 * 2 * head_layers
    )  # qkv per block; q, k per head layer, twice (tied)
    assert max_abs(embeds, reference_embeds) <= 1e-5 * reference_embeds.abs().max().item()
    assert max_abs(logits, reference_logits) <= 1e-5 * reference_logits.abs().max().item()
    assert (
        max_abs(reference_logits, base_logits) > 1e-2
    )  # the adapters matter, so the comparison means something


def test_preprocess_defaults_to_upstream_no_antialias():
    image = torch.rand(1, 3, 200, 100, generator=torch.Generator().manual_seed(0))
    resized = torch.nn.functional.interpolate(image, size=(96, 96), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(preprocess(image, 96), (resized - mean) / std, atol=1e-6)
    assert not torch.allclose(preprocess(image, 96, antialias=True), preprocess(image, 96), atol=1e-3)


def test_prompt_templates():
    assert compose_prompt("a, b", "") == "a, b, ,"
    assert compose_prompt("", "x") == ", x,"
    assert compose_prompt("a", QUALITY_PROMPT) == "a, clean, high-resolution, 8k,"
    assert compose_prompt("a", "u", "z") == "a, u,z"
