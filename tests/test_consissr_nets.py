"""ConsisSR networks: golden parity per network call with the official code, and strict checkpoint loading.

Fixture: ../shared/golden/consissr_tiny (SRKIT_GOLDEN_DIR overrides the root); its README is the spec.  The
networks are loaded through the normal path (`load_consissr` on the fixture's Lightning checkpoint, the
architecture from its cldm yaml + OpenCLIP json) and every recorded network call is replayed: text and image
prompt, hints, ε of every sampler step (both contexts, at the step's original timestep), the VAE decode and
the TALA network output.  Tolerances (README): 1e-4 for pixels and embeddings, 1e-4·max(1, max|expected|)
for latent tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from golden import fixture_dir, json_fixture, needs, tensors_fixture
from PIL import Image

from srkit.convert.consissr import (
    SCHEDULE_BUFFERS,
    architecture_from_ldm_config,
    checkpoint_key,
    key_map,
    load_consissr,
    native_key,
    native_state_dict,
    read_state_dict,
)
from srkit.convert.ldm import fit_shape
from srkit.diffusion.samplers.ancestral import respaced_timesteps
from srkit.nn.consissr import ConsisSRArchitecture, ConsisSRNets, ConsisSRSchedule
from srkit.registry import WeightsError

GOLDEN = fixture_dir("consissr_tiny")
CHECKPOINT = GOLDEN / "consissr_tiny.ckpt"
FLOAT_TOLERANCE = 1e-4
TRAINING_PROMPT = ""
CONTROL_IMAGES = {"sample": "sample_preprocessed.png", "lre": "input_gan.png"}

needs_fixture = needs(GOLDEN)


def latent_tolerance(expected: torch.Tensor) -> float:
    return 1e-4 * max(1.0, expected.abs().max().item())


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


def control_image(name: str) -> torch.Tensor:
    """inference.py: uint8 / 255 in float64 → float32 → clamp → NCHW → ·2 − 1."""
    pixels = np.asarray(Image.open(GOLDEN / name).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(pixels).float().clamp(0, 1).permute(2, 0, 1)[None] * 2 - 1


def training_batch(names: list[str]) -> torch.Tensor:
    """The TALA batch: u8 / 127.5 − 1 in float32, NCHW."""
    pixels = [
        np.asarray(Image.open(GOLDEN / name).convert("RGB"), dtype=np.float64) / 127.5 - 1 for name in names
    ]
    return torch.from_numpy(np.stack(pixels)).float().permute(0, 3, 1, 2)


cases = json_fixture(GOLDEN / "cases.json")


expected = tensors_fixture(GOLDEN / "expected.safetensors")


@pytest.fixture(scope="module")
def configs() -> tuple[ConsisSRArchitecture, ConsisSRSchedule]:
    ldm_config = yaml.safe_load((GOLDEN / "cldm_tiny.yaml").read_text())
    clip_config = json.loads((GOLDEN / "consissr_tiny_openclip.json").read_text())
    return architecture_from_ldm_config(ldm_config, clip_config)


@pytest.fixture(scope="module")
def nets(configs) -> ConsisSRNets:
    return load_consissr(CHECKPOINT, *configs)


@pytest.fixture(scope="module")
def text(nets, cases) -> dict[str, torch.Tensor]:
    prompts = [cases["sample"]["positive_prompt"], cases["sample"]["negative_prompt"], TRAINING_PROMPT]
    with torch.inference_mode():
        positive, negative, empty = nets.encode_text(prompts).split(1)
    return {"positive": positive, "negative": negative, "empty": empty}


def step_timesteps(case: dict, steps: int) -> list[int]:
    """Original timesteps in loop order (t_{N−1} first), computed from the settings and checked against the
    recorded ones when cases.json has them."""
    timesteps = respaced_timesteps(steps, 1000, case.get("starts", 1.0))
    if "timesteps_and_index" in case:
        assert [t for t, _ in case["timesteps_and_index"]] == timesteps
        assert [index for _, index in case["timesteps_and_index"]] == list(range(steps))[::-1]
    return timesteps


# ------------------------------------------------------------------------------------------------------------
# Golden parity, one network call at a time


@needs_fixture
def test_golden_consissr_prompt(nets, text, expected):
    """Text embeddings of both prompts; the pooled CLIP embedding under the sample's image token."""
    with torch.inference_mode():
        embedding = nets.prompt.image_embedding(control_image(CONTROL_IMAGES["sample"]))
    errors = {
        "text_pos": max_error(text["positive"], expected["sample.text_pos"]),
        "text_neg": max_error(text["negative"], expected["sample.text_neg"]),
        "clip_image_embed": max_error(embedding, expected["sample.clip_image_embed"]),
    }
    print("prompt max errors", errors)
    assert max(errors.values()) <= FLOAT_TOLERANCE, errors


@needs_fixture
def test_golden_consissr_clip_embedding_of_224_images(nets, expected):
    """Stage-1 CLIP pair (224², so no resize): the pooled embeddings of the visual tower in the checkpoint."""
    with torch.inference_mode():
        embeddings = nets.prompt.image_embedding(training_batch(["clip_lq.png", "clip_hq.png"]))
    errors = {
        "lq_embed": max_error(embeddings[:1], expected["clip.lq_embed"]),
        "hq_embed": max_error(embeddings[1:], expected["clip.hq_embed"]),
    }
    print("clip max errors", errors)
    assert max(errors.values()) <= FLOAT_TOLERANCE, errors


@pytest.fixture(scope="module")
def conditioning(nets) -> dict[str, dict[str, torch.Tensor]]:
    """Per case, what the sampler computes once per image: the hint and the image token of its control image
    (the LQ for sampling; for LRE the GAN image, which replaces it as both hint and token source)."""
    prepared = {}
    with torch.inference_mode():
        for case, image in CONTROL_IMAGES.items():
            control = control_image(image)
            prepared[case] = {"hint": nets.hint(control), "token": nets.image_token(control)}
    return prepared


@needs_fixture
@pytest.mark.parametrize("case", CONTROL_IMAGES)
def test_golden_consissr_hint_and_token(conditioning, expected, case):
    hint, token = conditioning[case]["hint"], conditioning[case]["token"]
    reference = expected[f"{case}.c_latent"]
    errors = {
        "c_latent": max_error(hint, reference),
        "image_token": max_error(token, expected[f"{case}.image_token"]),
    }
    print(f"{case} max errors", errors)
    assert errors["c_latent"] <= latent_tolerance(reference)
    assert errors["image_token"] <= FLOAT_TOLERANCE


@needs_fixture
@pytest.mark.parametrize("case", CONTROL_IMAGES)
def test_golden_consissr_eps_every_step(nets, text, conditioning, cases, expected, case):
    """Every recorded step: ε with the positive and the negative context from the step's x_in; all steps and
    both contexts in one batch (the CFG passes share the image token and the hint embedding)."""
    steps = len([key for key in expected if key.startswith(f"{case}.step") and key.endswith(".x_in")])
    assert steps >= 2
    timesteps = step_timesteps(cases[case], steps)
    token = conditioning[case]["token"]
    with torch.inference_mode():
        hint_embedding = nets.embed_hint(conditioning[case]["hint"])
        contexts = torch.cat([nets.context(token, text["positive"]), nets.context(token, text["negative"])])
        x = torch.cat([expected[f"{case}.step{i}.x_in"].expand(2, -1, -1, -1) for i in range(steps)])
        t = torch.tensor(timesteps).repeat_interleave(2)
        eps = nets.eps(x, t, contexts.repeat(steps, 1, 1), hint_embedding.expand(2 * steps, -1, -1, -1))
    errors = {}
    for i in range(steps):
        for j, kind in enumerate(("eps_cond", "eps_uncond")):
            reference = expected[f"{case}.step{i}.{kind}"]
            error = max_error(eps[2 * i + j : 2 * i + j + 1], reference)
            errors[f"step{i}.{kind}"] = error / latent_tolerance(reference)
    print(f"{case} eps max error / tolerance", errors)
    assert max(errors.values()) <= 1.0, errors


@needs_fixture
def test_golden_consissr_decode(nets, expected):
    with torch.inference_mode():
        decoded = nets.decode(expected["sample.latent"])
    error = max_error(decoded, expected["sample.decoded"])
    print("decoded max error", error)
    assert error <= FLOAT_TOLERANCE


@needs_fixture
def test_golden_consissr_tala_network_output(nets, text, expected):
    """TALA's network call: ε̂(x_noisy, t) with the LQ batch's hint and context (LQ image token + text '')."""
    lq = training_batch(sorted(path.name for path in GOLDEN.glob("tala_lq*.png")))
    with torch.inference_mode():
        hint = nets.hint(lq)
        context = nets.context(nets.image_token(lq), text["empty"])
        eps = nets.eps(expected["tala.x_noisy"], expected["tala.t"], context, nets.embed_hint(hint))
    errors = {
        "c_latent": max_error(hint, expected["tala.c_latent"]) / latent_tolerance(expected["tala.c_latent"]),
        "context": max_error(context, expected["tala.context"]) / FLOAT_TOLERANCE,
        "eps_pred": max_error(eps, expected["tala.eps_pred"]) / latent_tolerance(expected["tala.eps_pred"]),
    }
    print("tala max error / tolerance", errors)
    assert max(errors.values()) <= 1.0, errors


@needs_fixture
def test_golden_consissr_schedule_matches_checkpoint_buffers():
    """srkit's schedule facts reproduce the ldm buffers stored in the checkpoint (float32 of float64)."""
    state = read_state_dict(CHECKPOINT)
    schedule = ConsisSRSchedule()
    assert SCHEDULE_BUFFERS <= state.keys()
    torch.testing.assert_close(schedule.betas().float(), state["betas"], rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.alphas_cumprod().float(), state["alphas_cumprod"], rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------------------
# Loading


def _save_modified(tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    edit(checkpoint["state_dict"])
    path = tmp_path / "modified.ckpt"
    torch.save(checkpoint, path)
    return path


def _first_key_with(state: dict, marker: str) -> str:
    return min(key for key in state if marker in key)


@needs_fixture
def test_golden_consissr_loading_names_a_missing_key(tmp_path, configs):
    key = _first_key_with(read_state_dict(CHECKPOINT), ".attn2.to_out_ip.0.")
    path = _save_modified(tmp_path, lambda state: state.pop(key))
    with pytest.raises(WeightsError) as error:
        load_consissr(path, *configs)
    message = str(error.value)
    assert "\n" not in message and "1 missing key(s): " + key in message and "unexpected" not in message


@needs_fixture
def test_golden_consissr_loading_names_an_unexpected_key(tmp_path, configs):
    extra = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight"
    path = _save_modified(tmp_path, lambda state: state.__setitem__(extra, torch.zeros(1)))
    with pytest.raises(WeightsError) as error:
        load_consissr(path, *configs)
    message = str(error.value)
    assert "\n" not in message and "1 unexpected key(s): " + extra in message and "missing" not in message


def test_consissr_reading_drops_a_ddp_prefix_and_refuses_pickled_objects(tmp_path):
    path = tmp_path / "ddp.ckpt"
    torch.save({"state_dict": {"module.betas": torch.zeros(2)}}, path)
    assert list(read_state_dict(path)) == ["betas"]
    torch.save({"state_dict": {"betas": torch.zeros(2)}, "callbacks": {Path: {}}}, path)
    with pytest.raises(WeightsError, match="holds Python objects besides tensors"):
        read_state_dict(path)


@pytest.fixture(scope="module")
def empty_nets(configs) -> ConsisSRNets:
    with torch.device("meta"):
        return ConsisSRNets(*configs)


@needs_fixture
@pytest.mark.parametrize(
    "marker",
    [
        "control_model.zero_convs.",
        ".attn1.position_emb",
        ".attnT.to_out.0.",
        "control_model.middle_block_out.",
        "first_stage_model.decoder.mid.attn_1.",
        "cond_encoder.",
        "cond_stage_model.model.visual.",
        "cond_stage_model.ft_layers_4.",
        "control_model.input_hint_block.",
    ],
)
def test_golden_consissr_every_part_is_checked(empty_nets, marker):
    """A key dropped from any sub-model is reported under its checkpoint name."""
    state = read_state_dict(CHECKPOINT)
    key = _first_key_with(state, marker)
    del state[key]
    with pytest.raises(WeightsError, match="1 missing key\\(s\\): " + re.escape(key) + "$"):
        native_state_dict(state, empty_nets, CHECKPOINT)


@needs_fixture
def test_golden_consissr_loading_names_a_wrong_shape(empty_nets):
    state = read_state_dict(CHECKPOINT)
    state["control_model.zero_convs.0.0.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"shape of control_model\.zero_convs\.0\.0\.weight \(1,\)"):
        native_state_dict(state, empty_nets, CHECKPOINT)


@needs_fixture
def test_golden_consissr_key_map_agrees_with_diffusers_converters(configs):
    """The key table renames the UNet, ControlNet and VAE parts as diffusers' single-file converters do."""
    from diffusers.loaders.single_file_utils import (
        convert_controlnet_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    architecture, schedule = configs
    state = read_state_dict(CHECKPOINT)
    keys = key_map(architecture)
    mine = {keys.to_native(key): state[key] for key in state if key not in SCHEDULE_BUFFERS}
    theirs = {
        "unet.": convert_ldm_unet_checkpoint(state, architecture.unet_config()),
        "controlnet.": convert_controlnet_checkpoint(state, architecture.controlnet_config()),
        "vae.": convert_ldm_vae_checkpoint(state, architecture.vae_config(schedule.scale_factor)),
    }
    for prefix, converted in theirs.items():
        converted = {
            prefix + name.replace("controlnet_cond_embedding.", "hint_embedding."): tensor
            for name, tensor in converted.items()
        }
        assert converted.keys() == {name for name in mine if name.startswith(prefix)}
        for name, tensor in converted.items():
            assert torch.equal(fit_shape(mine[name], tensor.shape), tensor), name


def test_consissr_key_map_is_a_bijection_for_the_released_architecture():
    """Real sizes (SD 2.1-base + ViT-H-14), built on the meta device: every parameter has exactly one
    checkpoint name and maps back, and the known SD conversions hold."""
    architecture = ConsisSRArchitecture()
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in ConsisSRNets(architecture).state_dict().items()}
    keys = key_map(architecture)
    names = list(shapes)
    ldm_names = [checkpoint_key(keys, name) for name in names]
    assert len(set(ldm_names)) == len(names)
    assert all(native_key(keys, ldm) == name for ldm, name in zip(ldm_names, names, strict=True))
    unet, block = "model.diffusion_model.", ".transformer_blocks.0."
    known = {
        unet + "input_blocks.3.0.op.weight": "unet.down_blocks.0.downsamplers.0.conv.weight",
        unet + "output_blocks.2.1.conv.bias": "unet.up_blocks.0.upsamplers.0.conv.bias",
        unet + "output_blocks.5.2.conv.weight": "unet.up_blocks.1.upsamplers.0.conv.weight",
        unet + "input_blocks.4.0.skip_connection.weight": "unet.down_blocks.1.resnets.0.conv_shortcut.weight",
        unet + f"output_blocks.11.1{block}attn2.to_out_ip.0.weight":
            f"unet.up_blocks.3.attentions.2{block}attn2.to_out_ip.weight",
        unet + f"middle_block.1{block}attn1.position_emb":
            f"unet.mid_block.attentions.0{block}attn1.position_emb",
        "control_model.input_hint_block.14.weight": "controlnet.hint_embedding.conv_out.weight",
        "control_model.zero_convs.11.0.bias": "controlnet.controlnet_down_blocks.11.bias",
        "first_stage_model.decoder.up.3.block.2.norm1.weight":
            "vae.decoder.up_blocks.0.resnets.2.norm1.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight":
            "vae.encoder.mid_block.attentions.0.to_out.0.weight",
        "cond_encoder.encoder.down.1.block.0.nin_shortcut.weight":
            "hint_encoder.encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "cond_stage_model.ft_layers_4.6.bias": "prompt.image_proj.6.bias",
    }
    for ldm, native in known.items():
        assert native_key(keys, ldm) == native and native in shapes
    assert shapes["prompt.clip.visual.proj"] == (1280, 1024)
    assert shapes[f"unet.mid_block.attentions.0{block}attn1.position_emb"] == (8 * 8, 64)
    assert shapes[f"controlnet.down_blocks.0.attentions.0{block}attn1.position_emb"] == (64 * 64, 64)


# ------------------------------------------------------------------------------------------------------------
# Behaviour


@needs_fixture
def test_consissr_eps_refuses_a_latent_of_another_size_or_a_text_only_context(nets, text):
    architecture = nets.architecture
    side = architecture.latent_size // 2
    token = torch.zeros(1, 1, architecture.context_dim)
    x, hint_embedding = torch.zeros(1, 4, side, side), torch.zeros(1, architecture.model_channels, side, side)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="tiles"):
            nets.eps(x, 500, nets.context(token, text["positive"]), hint_embedding)
        with pytest.raises(ValueError, match="image token, text tokens"):
            nets.eps(x, 500, text["positive"], hint_embedding)


@needs_fixture
def test_consissr_attention_switches_keep_the_hpa_processors(nets):
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    from srkit.nn.hpa import DecoupledCrossAttnProcessor, PositionalSelfAttnProcessor

    nets.unet.set_attn_processor(AttnProcessor2_0())
    kinds = {type(processor) for processor in nets.unet.attn_processors.values()}
    assert kinds == {PositionalSelfAttnProcessor, DecoupledCrossAttnProcessor}
    with pytest.raises(TypeError, match="PositionalSelfAttnProcessor"):
        nets.unet.set_attn_processor(FusedAttnProcessor2_0())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            nets.unet.enable_xformers_memory_efficient_attention()
