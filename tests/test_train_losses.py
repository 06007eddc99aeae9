"""GDPO, Diffusion-DPO and VSD losses against hand-computed values and their defining properties."""

from __future__ import annotations

import math

import torch

from srkit.train.losses import diffusion_dpo_loss, gdpo_loss, per_sample_error, vsd_loss
from srkit.train.rewards import group_advantages


def test_per_sample_error_means_over_all_but_the_batch_axis() -> None:
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(per_sample_error(prediction, target), torch.tensor([1.0, 4.0]))


def test_gdpo_loss_hand_value() -> None:
    advantages = torch.tensor([[-1.0, 0.0, 1.0]])
    policy = torch.tensor([[0.101, 0.2, 0.298]])
    reference = torch.tensor([[0.100, 0.2, 0.300]])
    # Σ A·Δ = -0.001 + 0 - 0.002 = -0.003;  inside = -(5000/2)·(-0.003) = 7.5;  loss = log(1 + e^-7.5)
    loss = gdpo_loss(policy, reference, advantages)
    assert math.isclose(loss.item(), math.log1p(math.exp(-7.5)), rel_tol=1e-4)


def test_gdpo_with_two_samples_is_diffusion_dpo() -> None:
    """G = 2: advantages ±1/√2, so GDPO(ω) = Diffusion-DPO(β = ω/√2) with the better sample as the winner."""
    gen = torch.Generator().manual_seed(0)
    policy, reference = torch.rand(4, 2, generator=gen) * 1e-3, torch.rand(4, 2, generator=gen) * 1e-3
    rewards = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 1.5]])
    advantages = group_advantages(rewards)
    win = rewards.argmax(dim=1)
    lose = 1 - win
    rows = torch.arange(4)
    expected = diffusion_dpo_loss(
        policy[rows, win], reference[rows, win], policy[rows, lose], reference[rows, lose], beta=5000 / math.sqrt(2)
    )
    torch.testing.assert_close(gdpo_loss(policy, reference, advantages), expected, rtol=1e-5, atol=1e-7)


def test_gdpo_gradient_lowers_the_error_of_good_samples() -> None:
    policy = torch.tensor([[0.2, 0.2]], requires_grad=True)
    loss = gdpo_loss(policy, torch.tensor([[0.2, 0.2]]), torch.tensor([[1.0, -1.0]]))
    loss.backward()
    assert policy.grad[0, 0] > 0 > policy.grad[0, 1]  # descent lowers e for A > 0, raises it for A < 0
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)  # equal errors: σ(0)


def test_vsd_gradient_points_from_the_fake_score_to_the_real_one() -> None:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    x0_fake, x0_real = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    vsd_loss(latents, x0_fake, x0_real).backward()
    weight = (latents.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 2 * (x0_fake - x0_real) / weight / latents.numel()
    torch.testing.assert_close(latents.grad, expected)
    # a gradient step moves ẑ towards x0_real relative to x0_fake: <−grad, x0_real − x0_fake> > 0
    assert (-(latents.grad) * (x0_real - x0_fake)).sum() > 0
