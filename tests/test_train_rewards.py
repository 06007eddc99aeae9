"""GDPO-SR's ARF reward and advantages against values computed by hand (notes §4.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from srkit.train.rewards import (
    arf_rewards,
    attribute_ratios,
    detail_mask,
    gradient_entropy,
    group_advantages,
    histogram_entropy,
    minmax_normalise,
    to_gray,
)


def test_histogram_entropy_in_bits() -> None:
    assert histogram_entropy(np.zeros(100)) == pytest.approx(0.0, abs=1e-8)
    assert histogram_entropy(np.array([0.0, 1.0] * 50)) == pytest.approx(1.0, abs=1e-8)  # two equal bins
    assert histogram_entropy(np.array([0.0, 1.0, 2.0, 3.0] * 25)) == pytest.approx(2.0, abs=1e-8)
    assert histogram_entropy(np.array([6.0, 7.0])) == 0.0  # outside (−5.5, 5.5): nothing counted


def test_gradient_entropy_flat_is_zero_and_noise_is_high() -> None:
    assert gradient_entropy(np.full((10, 10), 0.4)) == pytest.approx(0.0, abs=1e-8)
    noise = np.random.default_rng(0).random((10, 10))
    assert gradient_entropy(noise) > 5.0  # spread over many of the 512 bins


def test_official_gray_swaps_red_and_blue() -> None:
    red = np.zeros((1, 1, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert to_gray(red)[0, 0] == pytest.approx(29 / 255)  # OpenCV BGR2GRAY weight of B (0.114) hits R
    assert to_gray(red, official_gray=False)[0, 0] == pytest.approx(76 / 255)  # BT.601 weight of R (0.299)


def test_attribute_ratios_split_smooth_and_textured_halves() -> None:
    rng = np.random.default_rng(1)
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    image[:, :30] = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)  # left half: texture
    mask = detail_mask(image)
    assert mask[:, :30].all() and not mask[:, 30:].any()
    assert attribute_ratios(image) == (0.5, 0.5)
    assert attribute_ratios(np.full((23, 17, 3), 7, dtype=np.uint8)) == (1.0, 0.0)  # remainder patches too


def test_remainder_patches_scale_complexity_by_their_area() -> None:
    """A 2-pixel-wide textured strip: same entropy as a full patch but 1/5 of the area, so below the threshold
    unless its entropy exceeds 2.5 bits."""
    strip = np.random.default_rng(2).random((10, 2))
    image = np.zeros((10, 12, 3), dtype=np.uint8)
    image[:, 10:] = (strip[..., None] * 255).round().astype(np.uint8)
    entropy = gradient_entropy(to_gray(image)[:, 10:])
    assert detail_mask(image)[:, 10:].all() == (entropy * 20 > 50)


def test_minmax_normalise_and_constant_groups() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 5.0], [4.0, 4.0, 4.0, 4.0]])
    expected = torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(minmax_normalise(scores), expected)


def test_arf_reward_and_advantages_on_a_known_group() -> None:
    metrics = {
        "psnr": torch.tensor([[20.0, 22.0, 24.0]]),
        "maniqa": torch.tensor([[0.3, 0.5, 0.4]]),
        "musiq": torch.tensor([[50.0, 40.0, 60.0]]),
    }
    # normalised: psnr [0, .5, 1], maniqa [0, 1, .5], musiq [.5, 0, 1]
    # r = 0.6·psnr + 0.4·½(maniqa + musiq) = [0.1, 0.5, 0.9]
    rewards = arf_rewards(metrics, torch.tensor([0.6]), torch.tensor([0.4]))
    torch.testing.assert_close(rewards, torch.tensor([[0.1, 0.5, 0.9]], dtype=torch.float64))
    # mean 0.5, unbiased std sqrt((0.16 + 0 + 0.16) / 2) = 0.4 -> [-1, 0, 1]
    torch.testing.assert_close(group_advantages(rewards), torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64))


def test_advantages_of_two_samples_are_plus_minus_one_over_root_two() -> None:
    advantages = group_advantages(torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[1 / math.sqrt(2), -1 / math.sqrt(2)]]))


def test_arf_reward_needs_its_metrics() -> None:
    with pytest.raises(ValueError, match="musiq"):
        arf_rewards({"psnr": torch.zeros(1, 2), "maniqa": torch.zeros(1, 2)}, torch.ones(1), torch.zeros(1))
