"""RFSR's losses, rewards and step schedule: golden parity with the official code (fixture rfsr_losses, see
its README), and the properties of the reward interface and of the window schedule."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from golden import fixture_dir

from srkit.registry import WeightsError
from srkit.train.gram_regulariser import GramRegulariser, VGG19Taps, gram_matrix, gram_style_loss
from srkit.train.image_reward import ImageRewardScorer, preprocess, text_config, vision_config
from srkit.train.reward_models import ClipIqaReward, RewardModel, load_clipiqa_reward
from srkit.train.rfsr import (
    CLIPIQA,
    GRAM_REGULARISER,
    IMAGE_REWARD,
    STRUCTURE,
    LossWindow,
    RFSRLossSettings,
    reward_hinge_loss,
    sampler_timesteps,
)
from srkit.train.wavelet_losses import LowPassL1Loss

GOLDEN = fixture_dir("rfsr_losses")
SETTINGS = RFSRLossSettings()


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    if not (GOLDEN / "losses.safetensors").is_file():
        pytest.skip(f"golden fixture {GOLDEN} is absent")
    from safetensors.torch import load_file

    return load_file(GOLDEN / "losses.safetensors")


def assert_close_f32(actual: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """The README's float32 tolerance: |Δ| ≤ 1e-5·|ref| + 1e-6·max|ref|, elementwise; returns max |Δ|."""
    actual, ref = actual.detach().float().reshape(ref.shape), ref.float()
    error = (actual - ref).abs()
    bound = 1e-5 * ref.abs() + 1e-6 * ref.abs().max()
    assert bool((error <= bound).all()), f"{what}: max |Δ| {error.max().item():.3g} over the tolerance"
    print(f"{what}: max |Δ| {error.max().item():.3g}")
    return error.max().item()


def fp16_order(values: torch.Tensor) -> torch.Tensor:
    """float16 values -> integers whose differences count ulps (sign-magnitude bits made monotonic)."""
    bits = values.detach().half().contiguous().view(torch.int16).int()
    return torch.where(bits >= 0, bits, -(bits & 0x7FFF))


def assert_fp16_ulp(actual: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """The README's float16 tolerance: equal in float16 or within one ulp."""
    assert actual.dtype == torch.float16, f"{what}: {actual.dtype}, the official path is float16"
    ulps = (fp16_order(actual.reshape(ref.shape)) - fp16_order(ref)).abs().max().item()
    assert ulps <= 1, f"{what}: {ulps} float16 ulps apart"
    print(f"{what}: {ulps} ulp")


# ------------------------------------------------------------------------------------------------------------
# Golden: structure loss (DT-CWT low-pass L1)


def test_golden_rfsr_dwt_lowpass_loss_values_and_gradients(golden) -> None:
    sr, gt = golden["dwt_sr"], golden["dwt_gt"]
    unit = LowPassL1Loss(weight=1.0)
    low_sr, _ = unit.transform(sr)
    low_gt, _ = unit.transform(gt)
    assert_close_f32(low_sr, golden["dwt_yl_sr"], "dwt_yl_sr")
    assert_close_f32(low_gt, golden["dwt_yl_gt"], "dwt_yl_gt")
    for weight, suffix in ((1.0, "w1"), (SETTINGS.structure.weight, "script")):
        image = sr.clone().requires_grad_()
        loss = LowPassL1Loss(weight=weight)(image, gt)
        loss.backward()
        assert_close_f32(loss, golden[f"dwt_loss_{suffix}"], f"dwt_loss_{suffix}")
        assert_close_f32(image.grad, golden[f"dwt_grad_sr_{suffix}"], f"dwt_grad_sr_{suffix}")
    assert_close_f32(LowPassL1Loss(1.0, highpass=True)(sr, gt), golden["dwt_loss_w1_lowq_highq"], "dwt_highq")


def test_haar_lowpass_is_the_scaled_block_mean() -> None:
    """Orthonormal Haar: the level-J LL band is 2^J times the mean over 2^J × 2^J blocks."""
    gen = torch.Generator().manual_seed(0)
    sr, gt = torch.rand(2, 3, 32, 24, generator=gen), torch.rand(2, 3, 32, 24, generator=gen)
    loss = LowPassL1Loss(weight=0.5, transform="haar", levels=3)(sr, gt)
    expected = 0.5 * F.l1_loss(8 * F.avg_pool2d(sr, 8), 8 * F.avg_pool2d(gt, 8))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="unknown wavelet transform"):
        LowPassL1Loss(1.0, transform="db4")


# ------------------------------------------------------------------------------------------------------------
# Golden: reward loss forms


def test_golden_rfsr_clipiqa_loss_form(golden) -> None:
    for weight, suffix in ((1.0, "w1"), (SETTINGS.clipiqa.weight, "script")):
        scores = golden["clipiqa_scores"].clone().requires_grad_()
        loss = reward_hinge_loss(scores, weight, per_sample=SETTINGS.clipiqa.hinge_per_sample)
        loss.backward()
        assert_close_f32(loss, golden[f"clipiqa_loss_{suffix}"], f"clipiqa_loss_{suffix}")
        assert_close_f32(scores.grad, golden[f"clipiqa_grad_scores_{suffix}"], f"clipiqa_grad_{suffix}")
    assert_close_f32(
        SETTINGS.clipiqa.loss(golden["clipiqa_scores"]), golden["clipiqa_loss_script"], "window loss"
    )
    high = reward_hinge_loss(golden["clipiqa_scores_hi"], 1.0, per_sample=False)
    assert_close_f32(high, golden["clipiqa_loss_w1_hi"], "clipiqa_loss_w1_hi")


def test_golden_rfsr_image_reward_loss_form(golden) -> None:
    rewards = golden["ir_rewards_given"]
    unit = reward_hinge_loss(rewards, 1.0, per_sample=SETTINGS.image_reward.hinge_per_sample)
    assert_close_f32(unit, golden["ir_loss_w1_given"], "ir_loss_w1_given")
    assert_close_f32(
        SETTINGS.image_reward.loss(rewards), golden["ir_loss_script_given"], "ir_loss_script_given"
    )


@pytest.mark.parametrize("antialias", [True, False])
def test_golden_rfsr_image_reward_preprocessing_and_gradient(golden, antialias: bool) -> None:
    """The official preprocessing, and the gradient through it with the README's surrogate linear reward."""
    tag = f"aa_{str(antialias).lower()}"
    image = golden["ir_image"].clone().requires_grad_()
    pixels = preprocess(image, golden["ir_surrogate_w"].shape[-1], antialias=antialias)
    assert_close_f32(pixels, golden[f"ir_preprocessed_{tag}"], f"ir_preprocessed_{tag}")
    reward = (pixels * golden["ir_surrogate_w"]).flatten(1).sum(1, keepdim=True) + golden["ir_surrogate_b"]
    assert_close_f32(reward, golden[f"ir_surrogate_reward_{tag}"], f"ir_surrogate_reward_{tag}")
    loss = reward_hinge_loss(reward, 1.0, per_sample=True)
    assert_close_f32(loss, golden[f"ir_loss_w1_surrogate_{tag}"], f"ir_loss_w1_surrogate_{tag}")
    if f"ir_grad_img_w1_surrogate_{tag}" in golden:
        loss.backward()
        assert_close_f32(image.grad, golden[f"ir_grad_img_w1_surrogate_{tag}"], f"ir_grad_img_{tag}")


# ------------------------------------------------------------------------------------------------------------
# Golden: Gram regulariser


def golden_layers(golden) -> list[str]:
    return [key.removeprefix("feat_x_") for key in golden if key.startswith("feat_x_")]


def gram_inputs(golden) -> tuple[list[str], dict, dict, dict]:
    """The fixture's layers, reference features, released layer weights and fresh trainable features."""
    layers = golden_layers(golden)
    old = {layer: golden[f"feat_gt_{layer}"] for layer in layers}
    weights = {layer: SETTINGS.gram_layer_weights[layer] for layer in layers}
    new = {layer: golden[f"feat_x_{layer}"].clone().requires_grad_() for layer in layers}
    return layers, old, weights, new


@pytest.mark.parametrize("normalise", [True, False])
def test_golden_rfsr_gram_regulariser_float16_path(golden, normalise: bool) -> None:
    """The released float16 Gram path: Grams, per-layer L1s, weighted totals and their gradients."""
    norm = "norm" if normalise else "nonorm"
    layers, old, weights, new = gram_inputs(golden)
    for layer in layers:
        if f"gram_x_{layer}_{norm}" in golden:
            gram = gram_matrix(golden[f"feat_x_{layer}"], normalise=normalise, fp16=True)
            assert_fp16_ulp(gram, golden[f"gram_x_{layer}_{norm}"], f"gram_x_{layer}_{norm}")
        l1 = gram_style_loss({layer: golden[f"feat_x_{layer}"]}, old, {layer: 1.0}, 1.0, normalise=normalise,
                             fp16=True)  # fmt: skip
        assert_fp16_ulp(l1, golden[f"gram_l1_{layer}_{norm}"], f"gram_l1_{layer}_{norm}")
    total = gram_style_loss(new, old, weights, 1.0, normalise=normalise, fp16=True)
    assert_fp16_ulp(total, golden[f"gram_loss_{norm}_w1"], f"gram_loss_{norm}_w1")
    script = gram_style_loss(
        new, old, weights, SETTINGS.gram_regulariser.weight, normalise=normalise, fp16=True
    )
    assert_fp16_ulp(script, golden[f"gram_loss_{norm}_script"], f"gram_loss_{norm}_script")
    total.backward()
    for layer in layers:
        ref = golden[f"gram_grad_x_{layer}_{norm}_w1"]
        error = (new[layer].grad - ref).abs().max().item()
        assert error <= 2e-2 * ref.abs().max().item(), f"gram_grad_x_{layer}_{norm}_w1: {error:.3g}"
        print(f"gram_grad_x_{layer}_{norm}_w1: max |Δ| {error:.3g} (max |ref| {ref.abs().max().item():.3g})")


@pytest.mark.parametrize("normalise", [True, False])
def test_golden_rfsr_gram_regulariser_float32_variant(golden, normalise: bool) -> None:
    norm = "norm" if normalise else "nonorm"
    layers, old, weights, new = gram_inputs(golden)
    for layer in layers:
        l1 = gram_style_loss(
            {layer: golden[f"feat_x_{layer}"]}, old, {layer: 1.0}, 1.0, normalise=normalise, fp16=False
        )
        assert l1.dtype == torch.float32
        assert_close_f32(l1, golden[f"gram_l1_{layer}_{norm}_fp32"], f"gram_l1_{layer}_{norm}_fp32")
    total = gram_style_loss(new, old, weights, 1.0, normalise=normalise, fp16=False)
    assert_close_f32(total, golden[f"gram_loss_{norm}_w1_fp32"], f"gram_loss_{norm}_w1_fp32")
    total.backward()
    for layer in layers:
        if f"gram_grad_x_{layer}_{norm}_w1_fp32" in golden:
            ref = golden[f"gram_grad_x_{layer}_{norm}_w1_fp32"]
            assert_close_f32(new[layer].grad, ref, f"gram_grad_x_{layer}_{norm}_w1_fp32")


def test_golden_rfsr_vgg19_taps_layout(golden) -> None:
    """basicsr's names ↔ torchvision indices, pre-ReLU taps, and the fixture's feature shapes for its size."""
    layers = golden_layers(golden)
    taps = VGG19Taps(layers)
    assert {name: index for index, name in taps.tap_index.items()} == {
        name: {"conv1_2": 2, "conv2_2": 7, "conv3_4": 16, "conv4_4": 25, "conv5_4": 34}[name]
        for name in layers
    }
    with torch.device("meta"):
        from torchvision.models import vgg19

        reference = vgg19(weights=None).features
    assert str(taps.features) == str(reference[: len(taps.features)]).replace("ReLU(inplace=True)", "ReLU()")
    size = golden[f"feat_x_{layers[0]}"].shape[-2:]  # conv1_2 keeps the input's resolution
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    features = taps(images)
    for layer in layers:
        assert features[layer].shape == golden[f"feat_x_{layer}"].shape, layer
        assert bool((features[layer] < 0).any()), f"{layer} is not taken before its ReLU"
    first = min(taps.tap_index)
    normalised = (images - taps.mean) / taps.std
    torch.testing.assert_close(features[taps.tap_index[first]], taps.features[: first + 1](normalised))


# ------------------------------------------------------------------------------------------------------------
# Golden: the training step's x̂0, with srkit.diffusion.schedule.NoiseSchedule (RFSR needs no formula of its own)


def test_golden_rfsr_training_step_x0(golden) -> None:
    from srkit.diffusion.schedule import NoiseSchedule

    sd2_base = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": golden["alphas_cumprod"].numel(), "clip_sample": False,
                "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1}  # fmt: skip
    schedule = NoiseSchedule.from_config(sd2_base)
    assert_close_f32(schedule.alphas_cumprod, golden["alphas_cumprod"], "alphas_cumprod")
    timesteps = sampler_timesteps(golden["timesteps_50"].numel(), schedule.num_train_timesteps)
    assert torch.equal(timesteps, golden["timesteps_50"])
    from diffusers import DDPMScheduler

    for steps in (20, golden["timesteps_50"].numel()):
        scheduler = DDPMScheduler.from_config(sd2_base)
        scheduler.set_timesteps(steps)
        assert torch.equal(sampler_timesteps(steps, schedule.num_train_timesteps), scheduler.timesteps.long())
    assert torch.equal(timesteps[golden["x0_indices"]], golden["x0_timesteps"])
    # the start point: only batch element 0 of the LR latents, noised to the last training timestep
    start = schedule.add_noise(golden["x0_z_lr"][0:1], golden["x0_noise"], schedule.num_train_timesteps - 1)
    assert_close_f32(start, golden["x0_latents_start"], "x0_latents_start")
    for row, t in enumerate(golden["x0_timesteps"].tolist()):
        x0 = schedule.predict_x0(golden["x0_latents_start"], golden["x0_eps_hat"], t)
        assert_close_f32(x0, golden["x0_hat"][row], f"x0_hat[t={t}]")


# ------------------------------------------------------------------------------------------------------------
# The timestep-aware window schedule


def test_released_windows_fire_where_the_script_applies_each_loss() -> None:
    assert SETTINGS.losses_at(0) == SETTINGS.losses_at(19) == (STRUCTURE,)
    assert all(SETTINGS.losses_at(index) == () for index in range(20, 40))
    assert SETTINGS.losses_at(40) == SETTINGS.losses_at(49) == (CLIPIQA, IMAGE_REWARD, GRAM_REGULARISER)
    assert SETTINGS.timesteps()[[0, 19, 40, 49]].tolist() == [981, 601, 181, 1]
    no_rewards = RFSRLossSettings(clipiqa=LossWindow(0.0, 40, 49))  # weight 0 disables a loss
    assert CLIPIQA not in no_rewards.losses_at(45)


def released_draw(settings: RFSRLossSettings, rng: random.Random) -> int:
    """The released loop, transcribed: draw; on a miss draw once more, then loop (and draw again)."""
    lo, hi = settings.index_range
    while True:
        index = rng.randint(lo, hi)
        if any(window.covers(index) for window in settings.windows().values()):
            return index
        index = rng.randint(lo, hi)


def test_step_index_draw_follows_the_released_redraw_rule() -> None:
    ours = [SETTINGS.draw_step_index(random.Random(seed)) for seed in range(200)]
    theirs = [released_draw(SETTINGS, random.Random(seed)) for seed in range(200)]
    assert ours == theirs
    rng, reference = random.Random(7), random.Random(7)
    sequence = [SETTINGS.draw_step_index(rng) for _ in range(3000)]
    assert sequence == [released_draw(SETTINGS, reference) for _ in range(3000)]
    assert set(sequence) == set(range(20)) | set(range(40, 50))
    structure_share = sum(index < 20 for index in sequence) / len(sequence)
    assert abs(structure_share - 2 / 3) < 0.05  # uniform over the 30 covered indices


class ScriptedDraws:
    """A stand-in for `random.Random` whose `randint` returns a given sequence, to show each draw's fate."""

    def __init__(self, draws: list[int]) -> None:
        self.draws = list(draws)

    def randint(self, lo: int, hi: int) -> int:
        value = self.draws.pop(0)
        assert lo <= value <= hi
        return value


def test_a_missed_draw_is_followed_by_a_discarded_one() -> None:
    """Released quirk: after an uncovered index the loop draws once more and throws that draw away."""
    assert SETTINGS.draw_step_index(ScriptedDraws([45])) == 45
    assert SETTINGS.draw_step_index(ScriptedDraws([25, 30, 5])) == 5
    script = ScriptedDraws([25, 3, 30, 44, 12])  # 3 is covered but discarded, as is 44
    assert SETTINGS.draw_step_index(script) == 12 and script.draws == []


def test_step_index_draw_refuses_a_range_no_loss_covers() -> None:
    with pytest.raises(ValueError, match="no enabled loss"):
        RFSRLossSettings(index_range=(20, 39)).draw_step_index(random.Random(0))
    with pytest.raises(ValueError, match="structure window"):
        RFSRLossSettings(structure=LossWindow(1.0, 0, 50))


# ------------------------------------------------------------------------------------------------------------
# Gram regulariser module (random VGG through the loading path)


def test_gram_regulariser_module_matches_the_loss_on_its_features_and_loads_torchvision_files(
    tmp_path,
) -> None:
    layer_weights = {
        "conv1_2": 0.1,
        "conv2_2": 0.1,
        "conv3_4": 1.0,
    }  # the first three taps keep the file small
    regulariser = GramRegulariser(1.0, layer_weights, fp16=False)
    gen = torch.Generator().manual_seed(0)
    state = {  # He-scaled random weights, so that activations stay finite through the stack
        f"features.{key}": torch.randn(value.shape, generator=gen) * (2 / value[0].numel()) ** 0.5
        for key, value in regulariser.vgg.features.state_dict().items()
    }
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg19.pth")
    loaded = GramRegulariser(1.0, layer_weights, fp16=False, vgg_weights=tmp_path / "vgg19.pth")
    torch.testing.assert_close(loaded.vgg.features[2].weight, state["features.2.weight"])

    new, reference = (
        torch.rand(1, 3, 32, 32, generator=gen).requires_grad_(),
        torch.rand(1, 3, 32, 32, generator=gen),
    )
    value = loaded(new, reference)
    expected = gram_style_loss(
        loaded.vgg(new), loaded.vgg(reference), layer_weights, 1.0, normalise=True, fp16=False
    )
    assert torch.isfinite(value) and value > 0
    torch.testing.assert_close(value, expected)
    value.backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loaded.parameters())

    del state["features.16.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="features.16.bias") as error:
        GramRegulariser(1.0, layer_weights, vgg_weights=tmp_path / "broken.pth")
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------------------
# Rewards: the interface with random models, and missing weights


def official_image_reward_checkpoint(width: int = 64, depth: int = 2, text_layers: int = 2, vocab: int = 14):
    """A tiny random state dict in the layout of THUDM's ImageReward.pt (BLIP ViT, BLIP BERT, MLP head), with
    its med_config.json and vocabulary."""
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    def linear(name: str, out: int, inp: int) -> None:
        state[name + ".weight"], state[name + ".bias"] = rand(out, inp), rand(out)

    def norm(name: str, dim: int) -> None:
        state[name + ".weight"], state[name + ".bias"] = 1 + rand(dim), rand(dim)

    hidden, ffn, patch, grid, positions = 32, 48, 16, 2, 40
    vit, bert = "blip.visual_encoder.", "blip.text_encoder."
    state[vit + "cls_token"] = rand(1, 1, width)
    state[vit + "pos_embed"] = rand(1, grid**2 + 1, width)
    state[vit + "patch_embed.proj.weight"], state[vit + "patch_embed.proj.bias"] = (
        rand(width, 3, patch, patch),
        rand(width),
    )
    norm(vit + "norm", width)
    for i in range(depth):
        norm(f"{vit}blocks.{i}.norm1", width)
        norm(f"{vit}blocks.{i}.norm2", width)
        linear(f"{vit}blocks.{i}.attn.qkv", 3 * width, width)
        linear(f"{vit}blocks.{i}.attn.proj", width, width)
        linear(f"{vit}blocks.{i}.mlp.fc1", 2 * width, width)
        linear(f"{vit}blocks.{i}.mlp.fc2", width, 2 * width)
    linear("blip.vision_proj", 8, width)  # present in the release, unused by the reward
    state[bert + "embeddings.word_embeddings.weight"] = rand(vocab, hidden)
    state[bert + "embeddings.position_embeddings.weight"] = rand(positions, hidden)
    state[bert + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    norm(bert + "embeddings.LayerNorm", hidden)
    for i in range(text_layers):
        layer = f"{bert}encoder.layer.{i}."
        for attention in ("attention", "crossattention"):
            source = width if attention == "crossattention" else hidden
            linear(layer + attention + ".self.query", hidden, hidden)
            linear(layer + attention + ".self.key", hidden, source)
            linear(layer + attention + ".self.value", hidden, source)
            linear(layer + attention + ".output.dense", hidden, hidden)
            norm(layer + attention + ".output.LayerNorm", hidden)
        linear(layer + "intermediate.dense", ffn, hidden)
        linear(layer + "output.dense", hidden, ffn)
        norm(layer + "output.LayerNorm", hidden)
    for index, (out, inp) in {0: (24, hidden), 2: (16, 24), 4: (8, 16), 6: (4, 8), 7: (1, 4)}.items():
        linear(f"mlp.layers.{index}", out, inp)
    med_config = {
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": positions,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": text_layers,
        "pad_token_id": 0,
        "vocab_size": vocab,
        "encoder_width": 768,
        "add_cross_attention": True,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
    }
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "tree", ","]
    return state, med_config, words


@pytest.fixture(scope="module")
def image_reward_files(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    folder = tmp_path_factory.mktemp("image_reward")
    state, med_config, words = official_image_reward_checkpoint()
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med_config))
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder / "ImageReward.pt", folder / "med_config.json", folder / "vocab.txt", state


def test_image_reward_scorer_is_a_frozen_differentiable_reward(image_reward_files) -> None:
    checkpoint, med_config, vocab, state = image_reward_files
    scorer = ImageRewardScorer.from_files(checkpoint, med_config, vocab)
    assert isinstance(scorer, RewardModel) and scorer.name == IMAGE_REWARD
    torch.testing.assert_close(
        scorer.vision.embeddings.class_embedding, state["blip.visual_encoder.cls_token"]
    )
    torch.testing.assert_close(scorer.vision.encoder.layers[1].self_attn.projection.weight,
                               state["blip.visual_encoder.blocks.1.attn.proj.weight"])  # fmt: skip
    assert scorer.vision.config.image_size == 32 and scorer.vision.config.num_attention_heads == 1

    images = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(1)).requires_grad_()
    prompts = ["a photo of a cat", ""]
    scorer.train()  # a trainer's .train() must not switch on dropout
    rewards = scorer(images, prompts)
    assert rewards.shape == (2,) and not scorer.training
    torch.testing.assert_close(scorer(images, prompts), rewards)
    assert not torch.allclose(scorer(images, ["a photo of a dog", ""]), rewards)  # the prompt matters
    ids, mask = scorer.tokenize(prompts)
    assert ids.shape == mask.shape == (2, 35) and mask[1].sum() == 2  # '' -> [CLS] [SEP], then padding
    SETTINGS.image_reward.loss(rewards).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in scorer.parameters())
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(images, prompts[:1])


def test_image_reward_configs_for_the_released_shapes() -> None:
    """ImageReward.pt holds BLIP ViT-L/16 at 224 px: 24 blocks, width 1024, 16 heads, MLP 4096."""
    meta = {"device": "meta"}
    vision_state = {
        "cls_token": torch.empty(1, 1, 1024, **meta),
        "pos_embed": torch.empty(1, 197, 1024, **meta),
        "patch_embed.proj.weight": torch.empty(1024, 3, 16, 16, **meta),
        **{f"blocks.{i}.mlp.fc1.weight": torch.empty(4096, 1024, **meta) for i in range(24)},
    }
    vision = vision_config(vision_state)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.image_size, vision.patch_size, vision.intermediate_size) == (224, 16, 4096)
    assert vision.layer_norm_eps == 1e-6
    med_config = {"hidden_size": 768, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
    text = text_config(med_config, vision.hidden_size)
    assert text.encoder_hidden_size == 1024 and text.is_decoder and text.vocab_size == 30524
    with pytest.raises(WeightsError, match="not BLIP's text encoder"):
        text_config({"hidden_size": 768, "add_cross_attention": False}, 1024)


def test_image_reward_missing_or_foreign_files_give_one_line_errors(image_reward_files, tmp_path) -> None:
    _, med_config, vocab, state = image_reward_files
    with pytest.raises(WeightsError) as error:
        ImageRewardScorer.from_files(tmp_path / "ImageReward.pt", tmp_path / "med_config.json", vocab)
    message = str(error.value)
    assert "\n" not in message and "ImageReward.pt" in message and "med_config.json" in message
    assert "THUDM/ImageReward" in message and "vocab.txt" not in message
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")
    with pytest.raises(WeightsError, match="no blip.visual_encoder.cls_token") as error:
        ImageRewardScorer.from_files(tmp_path / "wrapped.pt", med_config, vocab)
    assert "\n" not in str(error.value)
    broken = {key: value for key, value in state.items() if "blocks.1.attn.qkv" not in key}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(WeightsError, match="missing encoder.layers.1.self_attn.qkv") as error:
        ImageRewardScorer.from_files(tmp_path / "broken.pt", med_config, vocab)
    assert "\n" not in str(error.value)


class TinyQualityNet(torch.nn.Module):
    """A random stand-in for a pyiqa metric: (B, 3, H, W) -> (B, 1) scores in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(images).mean(dim=(1, 2, 3))).unsqueeze(1)


def test_clipiqa_reward_interface_with_a_random_metric() -> None:
    reward = ClipIqaReward(TinyQualityNet())
    assert isinstance(reward, RewardModel) and reward.name == CLIPIQA
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    scores = reward(images, ["", "a", "b"])
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    SETTINGS.clipiqa.loss(scores).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_clipiqa_reward_without_weights_names_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        load_clipiqa_reward()
    assert "\n" not in str(error.value) and "RN50.pt" in str(error.value)
