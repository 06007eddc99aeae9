"""SeeSR's networks: strict loading of the released folders, and golden parity of the guided ε per step.

Golden fixture: ../shared/golden/seesr_tiny (official cswry/SeeSR code on tiny random weights, see its
README).  For every case whose latent is not tiled, every recorded step's guided ε is recomputed from the
latent entering that step, through the normal loading path, and must match `noise_pred_cfg` within the
README's 1e-4.  Tiled cases are checked on their first step, with a local tile loop over the README's grid and
Gaussian weights.  The loading tests build their own tiny folders and need no fixture.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from tiny_sd import tiny_unet

from srkit.convert.seesr import load_base_unet, load_seesr, load_seesr_unet, load_seesr_unet_from_base
from srkit.diffusion.control.diffusers import control_residuals
from srkit.nn.image_cross_attention import CONFIG_FLAG, add_image_cross_attention, image_token_kwargs
from srkit.nn.seesr import SeeSRNets
from srkit.registry import WeightsError
from srkit.tiling import plan_latent_tiles

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("SRKIT_GOLDEN_DIR", REPO.parent / "shared" / "golden")) / "seesr_tiny"
FLOAT_TOLERANCE = 1e-4
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden fixture {GOLDEN} is absent")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny networks' ops are too small to share between threads: with the CPUs busy, 2 threads made one ε
    call take 4–20 s (spinning on synchronisation) against 0.1–0.2 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_names() -> list[str]:
    path = GOLDEN / "cases.json"
    return sorted(json.loads(path.read_text())) if path.is_file() else []


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------------------
# Golden parity


@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_tensors(GOLDEN / "inputs.safetensors")


@pytest.fixture(scope="module")
def nets() -> SeeSRNets:
    return load_seesr(GOLDEN / "seesr")


def case_tensors(name: str) -> dict[str, torch.Tensor]:
    return load_tensors(GOLDEN / f"case_{name}" / "tensors.safetensors")


def control_image(cases: dict, name: str) -> torch.Tensor:
    """The pipeline's control image control_u8/255 (1,3,H,W), from `same_input_as` when a case lacks it."""
    tensors = case_tensors(name)
    if "control_u8" not in tensors:
        tensors = case_tensors(cases[name]["same_input_as"])
    return tensors["control_u8"].permute(2, 0, 1)[None].float() / 255


def cfg_batch(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's CFG batch [uncond, cond]: negative/positive text, the same RAM tokens in both halves."""
    ram = inputs["ram_encoder_hidden_states"]
    return torch.cat([inputs["negative_prompt_embeds"], inputs["prompt_embeds"]]), torch.cat([ram, ram])


def guided(eps: torch.Tensor, guidance: float) -> torch.Tensor:
    uncond, cond = eps.chunk(2)
    return uncond + guidance * (cond - uncond)


def latent_entering(tensors: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    return tensors["x_T"] if step == 0 else tensors["latents_after_step"][step - 1]


def latent_grid(setting: dict):
    height, width = setting["latent_hw"]
    return plan_latent_tiles(height, width, setting["latent_tiled_size"], setting["latent_tiled_overlap"])


@needs_golden
@pytest.mark.parametrize("case", case_names())
def test_golden_seesr_guided_eps_every_step_untiled(case, cases, inputs, nets):
    setting = cases[case]
    if latent_grid(setting) is not None:
        pytest.skip(f"case {case}: the latent is tiled (see the tiled test)")
    tensors = case_tensors(case)
    text, ram = cfg_batch(inputs)
    control = nets.embed_control(control_image(cases, case))
    errors = []
    with torch.no_grad():
        for step, t in enumerate(tensors["timesteps"].tolist()):
            latent = latent_entering(tensors, step)
            eps = nets.eps(torch.cat([latent, latent]), t, text, ram, control, setting["cond_scale"])
            errors.append(
                (guided(eps, setting["guidance"]) - tensors["noise_pred_cfg"][step]).abs().max().item()
            )
    print(f"case {case}: max |Δ noise_pred_cfg| per step {errors}")
    assert len(errors) == tensors["noise_pred_cfg"].shape[0]
    assert max(errors) <= FLOAT_TOLERANCE


@needs_golden
@pytest.mark.parametrize("case", case_names())
def test_golden_seesr_guided_eps_first_step_latent_tiled(case, cases, inputs, nets):
    """README "Latent tiling": square tiles, ControlNet and UNet per tile on the control crop at 8× the tile's
    offsets, Gaussian weights (rows centred at tile/2), blended ε = Σ ε·W / Σ W, then guidance."""
    setting = cases[case]
    grid = latent_grid(setting)
    if grid is None:
        pytest.skip(f"case {case}: the latent is not tiled")
    if "tile_offsets_yx" in setting:
        assert [[y, x] for x in grid.xs for y in grid.ys] == setting["tile_offsets_yx"]
    tensors = case_tensors(case)
    text, ram = cfg_batch(inputs)
    image = control_image(cases, case)
    latent = latent_entering(tensors, 0)
    latents = torch.cat([latent, latent])
    side, scale = grid.tile, image.shape[-1] // latent.shape[-1]
    blended = torch.zeros(latents.shape, dtype=torch.float64)
    with torch.no_grad():
        for ix, x in enumerate(grid.xs):
            for iy, y in enumerate(grid.ys):
                crop = image[..., scale * y : scale * (y + side), scale * x : scale * (x + side)]
                eps = nets.eps(
                    latents[..., y : y + side, x : x + side], tensors["timesteps"][0], text, ram, crop
                )
                blended[..., y : y + side, x : x + side] += (
                    eps.double() * grid.wy[iy][:, None] * grid.wx[ix][None, :]
                )
    error = (guided(blended, setting["guidance"]).float() - tensors["noise_pred_cfg"][0]).abs().max().item()
    print(f"case {case}: max |Δ noise_pred_cfg[0]| tiled {error}")
    assert error <= FLOAT_TOLERANCE


@needs_golden
def test_golden_seesr_unet_from_base_equals_released_unet():
    released = load_seesr_unet(GOLDEN / "seesr").state_dict()
    from_base = load_seesr_unet_from_base(GOLDEN / "base", GOLDEN / "seesr").state_dict()
    assert released.keys() == from_base.keys()
    assert all(torch.equal(released[key], from_base[key]) for key in released)
    vanilla = load_base_unet(GOLDEN / "base").state_dict()
    assert vanilla.keys() == {key for key in released if "image_attentions" not in key}


@needs_golden
def test_golden_seesr_control_embedded_once_equals_per_call(nets, inputs):
    """One embedding of the control image (batch 1) serves both CFG halves: the ε of embedding [img, img] on
    every call, up to fp32 rounding (CPU convolution kernels differ with the batch size: 1.4e-8 on the
    embedding, ~1e-6 on ε); and `control_residuals` equals diffusers' own ControlNetModel.forward."""
    generator = torch.Generator().manual_seed(0)
    height, width = 8, 8
    latents = torch.randn(2, 4, height, width, generator=generator)
    image = torch.rand(1, 3, 8 * height, 8 * width, generator=generator)
    text, ram = cfg_batch(inputs)
    with torch.no_grad():
        embedded_once = nets.embed_control(image)
        embedded_per_call = nets.embed_control(torch.cat([image, image]))
        per_call = nets.eps(latents, 501, text, ram, torch.cat([image, image]))
        once = nets.eps(latents, 501, text, ram[:1], embedded_once)
        ours = control_residuals(
            nets.controlnet,
            latents,
            501,
            text,
            embedded_per_call,
            0.7,
            cross_attention_kwargs=image_token_kwargs(ram),
        )
        stock = nets.controlnet(
            latents,
            501,
            text,
            controlnet_cond=torch.cat([image, image]),
            conditioning_scale=0.7,
            cross_attention_kwargs=image_token_kwargs(ram),
            return_dict=False,
        )
    assert torch.allclose(
        embedded_once.features.expand(2, -1, -1, -1), embedded_per_call.features, rtol=0, atol=1e-7
    )
    assert torch.allclose(once, per_call, rtol=0, atol=1e-5)
    assert len(ours.down) == len(stock[0]) == 12
    assert all(torch.equal(a, b) for a, b in zip(ours.down, stock[0]))
    assert torch.equal(ours.mid, stock[1])


# ----------------------------------------------------------------------------------------------------------
# Loading (tiny folders written here)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict:
    """seesr/{unet,controlnet} saved (save_pretrained) from random SeeSR-layout models, and a base/unet with
    the UNet's weights minus the image attentions (how SD2-base relates to SeeSR)."""
    from diffusers import ControlNetModel

    root = tmp_path_factory.mktemp("seesr_folders")
    torch.manual_seed(0)
    unet = tiny_unet()
    base = copy.deepcopy(unet)
    controlnet = ControlNetModel.from_unet(unet)
    add_image_cross_attention(unet)
    add_image_cross_attention(controlnet)
    with torch.no_grad():
        for parameter in [*unet.parameters(), *controlnet.parameters()]:
            parameter.add_(0.05 * torch.randn_like(parameter))  # no all-zero "zero convolution"
    base.load_state_dict({k: v for k, v in unet.state_dict().items() if "image_attentions" not in k})
    unet.save_pretrained(root / "seesr" / "unet")
    controlnet.save_pretrained(root / "seesr" / "controlnet")
    base.save_pretrained(root / "base" / "unet")
    return {"root": root, "unet": unet, "controlnet": controlnet}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seesr_folders_round_trip(tiny_folders):
    root = tiny_folders["root"]
    assert json.loads((root / "seesr" / "unet" / "config.json").read_text())[CONFIG_FLAG] is True
    nets = load_seesr(root / "seesr")
    assert same_state(nets.unet, tiny_folders["unet"]) and same_state(
        nets.controlnet, tiny_folders["controlnet"]
    )
    assert same_state(load_seesr_unet_from_base(root / "base", root / "seesr"), tiny_folders["unet"])
    assert load_seesr(root / "seesr", base_root=root / "base").unet.config[CONFIG_FLAG] is True


def test_seesr_base_unet_from_bin(tiny_folders, tmp_path):
    """A `.bin` folder (read with weights_only) loads like the safetensors one."""
    from safetensors.torch import load_file

    source = tiny_folders["root"] / "base" / "unet"
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((source / "config.json").read_text())
    torch.save(
        load_file(str(source / "diffusion_pytorch_model.safetensors")),
        tmp_path / "unet" / "diffusion_pytorch_model.bin",
    )
    assert same_state(load_base_unet(tmp_path), load_base_unet(tiny_folders["root"] / "base"))


def test_seesr_image_attentions_train_and_deepcopy(tiny_folders):
    """Gradients reach the image attentions (what RFSR trains) and the ControlNet; a deep copy (EMA target)
    pairs each text attention with its own copy's image attention."""
    nets = load_seesr(tiny_folders["root"] / "seesr")
    latents = torch.randn(2, 4, 16, 16)
    eps = nets.eps(latents, 400, torch.randn(1, 77, 8), torch.randn(1, 5, 512), torch.rand(1, 3, 128, 128))
    eps.square().mean().backward()
    image_attention = nets.unet.mid_block.image_attentions[0]
    assert image_attention.transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0
    assert nets.controlnet.controlnet_cond_embedding.conv_in.weight.grad.abs().sum() > 0
    twin = copy.deepcopy(nets.unet)
    assert twin.mid_block.attentions[0].image_attention is twin.mid_block.image_attentions[0]
    assert twin.mid_block.image_attentions[0] is not image_attention


CHANGED_KEY = "mid_block.image_attentions.0.proj_out.bias"
EXTRA_KEY = "mid_block.image_attentions.0.surplus"


@pytest.mark.parametrize(
    "change, message, key",
    [
        ("missing", "1 missing", CHANGED_KEY),
        ("extra", "1 unexpected", EXTRA_KEY),
        ("reshaped", "1 shapes", CHANGED_KEY),
    ],
)
def test_seesr_unet_key_mismatch_is_one_line_weights_error(tiny_folders, tmp_path, change, message, key):
    from safetensors.torch import load_file, save_file

    source = tiny_folders["root"] / "seesr" / "unet"
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "diffusion_pytorch_model.safetensors"))
    if change == "missing":
        del state[CHANGED_KEY]
    elif change == "extra":
        state[EXTRA_KEY] = torch.zeros(1)
    else:
        state[CHANGED_KEY] = torch.zeros(3)
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match=message) as info:
        load_seesr_unet(tmp_path)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_seesr_missing_folder_or_weights_is_weights_error(tiny_folders, tmp_path):
    with pytest.raises(WeightsError, match="config.json"):
        load_seesr_unet(tmp_path / "nowhere")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(
        (tiny_folders["root"] / "seesr" / "unet" / "config.json").read_text()
    )
    with pytest.raises(WeightsError, match="diffusion_pytorch_model"):
        load_seesr_unet(tmp_path)
    with pytest.raises(WeightsError, match="no image_attentions"):
        load_seesr_unet_from_base(tiny_folders["root"] / "base", tiny_folders["root"] / "base")
