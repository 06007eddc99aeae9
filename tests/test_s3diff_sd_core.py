"""The shared SD plumbing S3Diff runs on (srkit/diffusion/) and the upstream latent tiling (srkit/tiling.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from srkit.diffusion.denoiser import Conditioning, UNetDenoiser, guided
from srkit.diffusion.latents import crop_to, pad_to_multiple
from srkit.diffusion.loading import SDLoadError, has_text_encoder
from srkit.diffusion.schedule import SD_TURBO_SCHEDULER, NoiseSchedule
from srkit.diffusion.text import prompt_embeddings, save_prompt_embeddings
from srkit.tiling import (
    gaussian_weights,
    gaussian_weights_rows,
    plan_axis_snapped,
    plan_latent_tiles,
    run_latent_tiled,
)


def test_s3diff_schedule_alpha_bar_999() -> None:
    schedule = NoiseSchedule.from_config(SD_TURBO_SCHEDULER)
    assert schedule.alphas_cumprod.dtype == torch.float32
    assert schedule.alpha_bar(999).item() == pytest.approx(0.0046600951, abs=1e-9)


def test_s3diff_x0_equals_one_ddpm_step_at_999() -> None:
    """The direct formula equals what the official code gets from DDPMScheduler.step (trailing spacing)."""
    from diffusers import DDPMScheduler

    schedule = NoiseSchedule.from_config(SD_TURBO_SCHEDULER)
    scheduler = DDPMScheduler.from_config(SD_TURBO_SCHEDULER)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [999]
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    stepped = scheduler.step(eps, 999, z, generator=gen).prev_sample
    x0 = schedule.predict_x0(z, eps, 999)
    torch.testing.assert_close(x0, stepped, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x0, 14.648828 * z - 14.614656 * eps, atol=1e-4, rtol=1e-5)


def test_s3diff_schedule_honours_clip_sample_and_prediction_type() -> None:
    config = {k: v for k, v in SD_TURBO_SCHEDULER.items() if k != "clip_sample"}  # DDPM's default: clip
    clipped = NoiseSchedule.from_config(config)
    assert clipped.clip_sample
    assert clipped.predict_x0(torch.full((1,), 1.0), torch.full((1,), -1.0), 999).item() == 1.0
    v = NoiseSchedule.from_config({**SD_TURBO_SCHEDULER, "prediction_type": "v_prediction"})
    a = v.alpha_bar(500)
    z, out = torch.tensor([0.3]), torch.tensor([-0.2])
    torch.testing.assert_close(v.predict_x0(z, out, 500), a.sqrt() * z - (1 - a).sqrt() * out)
    noisy = v.add_noise(torch.tensor([1.0]), torch.tensor([0.0]), 250)
    assert noisy.item() == pytest.approx(math.sqrt(v.alpha_bar(250).item()))


def test_s3diff_pad_to_multiple_reflects_and_survives_tiny_inputs() -> None:
    x = torch.arange(2 * 3 * 40 * 30, dtype=torch.float32).reshape(2, 3, 40, 30)
    padded, size = pad_to_multiple(x, 64)
    assert size == (40, 30) and padded.shape[-2:] == (64, 64)
    torch.testing.assert_close(padded[..., :40, :33], F.pad(x, (0, 3, 0, 0), mode="reflect")[..., :40, :33])
    torch.testing.assert_close(crop_to(padded, size), x)
    tiny, _ = pad_to_multiple(torch.rand(1, 3, 4, 5), 64)
    assert tiny.shape[-2:] == (64, 64)


def test_s3diff_prompt_embeddings_are_computed_once_per_prompt(tmp_path) -> None:
    calls: list[str] = []

    def encoder(prompt: str) -> torch.Tensor:
        calls.append(prompt)
        return torch.full((1, 77, 4), float(len(prompt)))

    table = prompt_embeddings({"pos": "sharp", "neg": "blurry", "again": "sharp"}, encoder=encoder)
    assert sorted(calls) == ["blurry", "sharp"] and table["again"][0, 0, 0] == 5
    path = save_prompt_embeddings(tmp_path / "e.safetensors", {"pos": table["pos"]})
    assert torch.equal(prompt_embeddings({"pos": "ignored"}, precomputed=path)["pos"], table["pos"])
    with pytest.raises(SDLoadError, match="lack neg"):
        prompt_embeddings({"pos": "a", "neg": "b"}, precomputed=path)
    with pytest.raises(SDLoadError, match="no text encoder"):
        prompt_embeddings({"pos": "a"}, folder=tmp_path)


def test_s3diff_unet_eps_batches_guidance() -> None:
    """One batched call equals the two separate passes of the official code."""

    class FakeUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x, t, encoder_hidden_states):
            out = (
                x * self.scale
                + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
                + t.float() / 1000
            )
            return type("Out", (), {"sample": out})()

    unet = FakeUNet()
    z = torch.randn(2, 4, 3, 3)
    pos, neg = torch.ones(1, 77, 8), -torch.ones(1, 77, 8)
    denoiser = UNetDenoiser(unet)
    eps = guided(denoiser, Conditioning({"text": neg}), 1.07)(z, 999, Conditioning({"text": pos}))
    t = torch.tensor([999])
    e_pos = unet(z, t, encoder_hidden_states=pos.expand(2, -1, -1)).sample
    e_neg = unet(z, t, encoder_hidden_states=neg.expand(2, -1, -1)).sample
    torch.testing.assert_close(eps, e_neg + 1.07 * (e_pos - e_neg))
    unguided = guided(denoiser, Conditioning({"text": neg}), 1.0)(z, 999, Conditioning({"text": pos}))
    torch.testing.assert_close(unguided, e_pos)


def test_s3diff_latent_tile_plan_matches_upstream() -> None:
    assert plan_axis_snapped(104, 96, 32) == [0, 8]
    assert plan_axis_snapped(200, 96, 32) == [0, 64, 104]
    assert plan_axis_snapped(96, 96, 32) == [0]
    assert plan_latent_tiles(96, 96) is None and plan_latent_tiles(128, 64) is None  # area test, not sides
    grid = plan_latent_tiles(104, 104)
    assert grid.ys == grid.xs == [0, 8] and grid.tile == 96
    thin = plan_latent_tiles(200, 56)
    assert thin.tile == 56 and thin.xs == [0] and thin.ys == [0, 24, 48, 72, 96, 120, 144]


def test_s3diff_latent_tile_weights_have_the_row_quirk() -> None:
    """Columns are centred at (W−1)/2, rows at H/2; the blend is normalised."""
    grid = plan_latent_tiles(104, 104)
    raw_x, raw_y = gaussian_weights(96, 0, 0), gaussian_weights_rows(96, 0, 0)
    assert raw_x.argmax() in (47, 48) and torch.allclose(raw_x, raw_x.flip(0))
    assert raw_y.argmax() == 48 and not torch.allclose(raw_y, raw_y.flip(0))
    total_y = torch.zeros(104, dtype=torch.float64)
    for y, w in zip(grid.ys, grid.wy):
        total_y[y : y + 96] += w
    torch.testing.assert_close(total_y, torch.ones(104, dtype=torch.float64))
    expected = raw_y[40] / (raw_y[40] + raw_y[32])  # row 40: tile 0 at 40, tile 1 at 32
    assert grid.wy[0][40].item() == pytest.approx(expected.item())


def test_s3diff_run_latent_tiled_blends_to_identity_and_batches_tiles() -> None:
    latents = torch.randn(2, 4, 104, 136)
    seen: list[int] = []

    def fn(x: torch.Tensor, boxes: list) -> torch.Tensor:
        seen.append(x.shape[0])
        assert x.shape[0] % len(boxes) == 0 and all(side == x.shape[-1] for _, _, side in boxes)
        return x

    torch.testing.assert_close(run_latent_tiled(fn, latents), latents)
    assert seen == [2] * 4  # rows [0, 8] x columns [0, 40]
    seen.clear()
    torch.testing.assert_close(run_latent_tiled(fn, latents, tile_batch=3), latents)
    assert seen == [6, 2]
    small = torch.randn(1, 4, 64, 64)
    assert torch.equal(run_latent_tiled(fn, small), small)


def test_s3diff_text_encoder_from_a_diffusers_folder(tmp_path) -> None:
    """The folder path: tokenizer + CLIP text model loaded offline, 77-token padding, embeddings per prompt."""
    import json
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = list(string.ascii_lowercase + " ,.")
    vocab = {s: i for i, s in enumerate(symbols)} | {
        s + "</w>": len(symbols) + i for i, s in enumerate(symbols)
    }
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(tmp_path / "vocab.json"),
        str(tmp_path / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    folder = tmp_path / "base"
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77)  # fmt: skip
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    assert has_text_encoder(folder)
    table = prompt_embeddings({"pos": "a sharp photo", "neg": "blur"}, folder=folder)
    assert table["pos"].shape == (1, 77, 8) and not torch.equal(table["pos"], table["neg"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_schedule_per_sample_timesteps_equal_one_timestep_at_a_time(prediction_type: str) -> None:
    schedule = NoiseSchedule.from_config({**SD_TURBO_SCHEDULER, "prediction_type": prediction_type})
    gen = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(3, 4, 5, 5, generator=gen) for _ in range(3))
    t = torch.tensor([20, 250, 999])
    noisy = schedule.add_noise(x0, noise, t)
    predicted = schedule.predict_x0(noisy, out, t)
    for i, step in enumerate(t.tolist()):
        torch.testing.assert_close(noisy[i : i + 1], schedule.add_noise(x0[i : i + 1], noise[i : i + 1], step))
        torch.testing.assert_close(predicted[i : i + 1], schedule.predict_x0(noisy[i : i + 1], out[i : i + 1], step))
    with pytest.raises(ValueError, match="outside the schedule"):
        schedule.alpha_bar(torch.tensor([5, 1000]))
