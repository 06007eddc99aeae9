"""The trainer on a toy recipe (least squares): accumulation equals a larger batch, EMA follows its formula,
clipping bounds the step, a non-finite loss stops the run, and resume checks the recipe."""

from __future__ import annotations

import json

import pytest
import torch

from srkit.train.trainer import TrainConfig, Trainer, checkpoints


class Points(torch.utils.data.Dataset):
    def __init__(self, count: int = 8) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 3, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(count, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}


class LeastSquares:
    name = "toy"

    def __init__(self, scale: float = 1.0) -> None:
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.scale = scale

    def parameter_groups(self):
        return {"main": {"w": self.w}}

    def to(self, device):
        return self

    def losses(self, batch, step):
        loss = self.scale * ((batch["x"] @ self.w - batch["y"]) ** 2).mean()
        yield "main", loss, {"mse": loss.item()}

    def export(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "w.json").write_text(json.dumps(self.w.tolist()))
        return folder


def run(tmp_path, name: str, recipe=None, **config) -> Trainer:
    settings = {"steps": 4, "lr": 0.05, "weight_decay": 0.0, "checkpoint_every": 2, "log_every": 100, **config}
    trainer = Trainer(recipe or LeastSquares(), Points(), TrainConfig(out=tmp_path / name, **settings), device="cpu")
    trainer.train()
    return trainer


def test_accumulation_equals_the_larger_batch(tmp_path):
    big = run(tmp_path, "big", batch_size=2, grad_accum=1)
    accumulated = run(tmp_path, "accumulated", batch_size=1, grad_accum=2)
    torch.testing.assert_close(accumulated.recipe.w, big.recipe.w, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "big" / "export" / "w.json").read_text()) == pytest.approx(big.recipe.w.tolist())


def test_ema_is_exported_and_follows_its_formula(tmp_path):
    trainer = run(tmp_path, "ema", ema_decay=0.5, steps=1, checkpoint_every=1)
    # one step from w0 = 0: ema = 0.5·0 + 0.5·w1, and the export holds the EMA weights
    exported = torch.tensor(json.loads((tmp_path / "ema" / "export" / "w.json").read_text()))
    w1 = run(tmp_path, "plain", steps=1).recipe.w.detach()
    torch.testing.assert_close(exported, 0.5 * w1)
    assert (checkpoints(tmp_path / "ema")[-1] / "ema.safetensors").is_file()
    assert trainer.step == 1


def test_clipping_bounds_the_step(tmp_path):
    """With plain SGD (lr 1) in place of AdamW, the step is the clipped gradient: norm exactly max_grad_norm."""
    recipe = LeastSquares(scale=1e6)
    trainer = Trainer(recipe, Points(), TrainConfig(out=tmp_path / "clip", max_grad_norm=1.0), device="cpu")
    trainer.optimizers["main"] = torch.optim.SGD([recipe.w], lr=1.0)
    [(_, loss, _)] = list(recipe.losses(next(trainer.batches()), 0))
    loss.backward()
    assert recipe.w.grad.norm() > 1e3
    trainer._apply("main")
    assert recipe.w.detach().norm() == pytest.approx(1.0, rel=1e-5) and recipe.w.grad is None


def test_non_finite_loss_stops_and_resume_checks_the_recipe(tmp_path):
    with pytest.raises(FloatingPointError, match="main loss is nan"):
        run(tmp_path, "nan", recipe=LeastSquares(scale=float("nan")))
    run(tmp_path, "toy", steps=2)
    other = LeastSquares()
    other.name = "other"
    with pytest.raises(ValueError, match="written by recipe 'toy'"):
        run(tmp_path, "toy", recipe=other, steps=3, resume=True)
    resumed = run(tmp_path, "toy", steps=3, resume=True)
    assert resumed.step == 3 and [p.name for p in checkpoints(tmp_path / "toy")][-1] == "step_0000003"


class TwoPhase(LeastSquares):
    """Two losses per batch for one group, stepped one after the other (`step_each_loss`), a learning-rate
    schedule (nothing moves at step 0), and a buffer the recipe changes in place (counted forward passes)."""

    name = "two-phase"
    step_each_loss = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[float]] = []
        self.calls = torch.zeros(1)

    def lr_factor(self, group, step):
        return 0.0 if step == 0 else 1.0

    def state_buffers(self):
        return {"calls": self.calls}

    def losses(self, batch, step):
        self.calls += 1
        yield "main", ((batch["x"] @ self.w - batch["y"]) ** 2).mean(), {}
        self.seen.append(self.w.detach().tolist())  # the weights the second loss is computed with
        yield "main", (self.w**2).sum(), {}


def test_step_each_loss_steps_before_the_next_loss_and_accumulates_per_phase(tmp_path):
    recipe = TwoPhase()
    run(tmp_path, "phases", recipe=recipe, steps=2, grad_accum=2)
    # step 0 runs at rate 0: nothing moves; step 1: the second losses of both micro-batches see the first step
    assert recipe.seen[0] == recipe.seen[1] == [0.0, 0.0, 0.0]
    assert recipe.seen[2] == recipe.seen[3] != [0.0, 0.0, 0.0]
    assert recipe.w.detach().tolist() != recipe.seen[3]  # and the second loss was stepped too


def test_state_buffers_are_checkpointed_and_restored(tmp_path):
    straight = run(tmp_path, "straight", recipe=TwoPhase(), steps=3)
    assert (checkpoints(tmp_path / "straight")[0] / "buffers.safetensors").is_file()
    run(tmp_path, "resumed", recipe=TwoPhase(), steps=2)
    resumed = run(tmp_path, "resumed", recipe=TwoPhase(), steps=3, resume=True)
    assert resumed.recipe.calls.item() == straight.recipe.calls.item() == 3
    torch.testing.assert_close(resumed.recipe.w, straight.recipe.w, rtol=0, atol=0)
    assert resumed.optimizers["main"].param_groups[0]["lr"] == pytest.approx(0.05)
