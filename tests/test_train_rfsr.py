"""RFSR fine-tuning on tiny SeeSR and ConsisSR models and 8 HR crops: both modes (rollout, fast) train with finite
losses, every loss fires in its window, checkpoints resume to the same weights as an uninterrupted run, the export
loads in the engine, and a two-process CPU run writes the same checkpoint layout.  Rewards are randomly initialised
networks through the reward interface; the VGG19 of the Gram regulariser is random too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_CROP
from safetensors.torch import load_file
from tiny_models import tiny_consissr, tiny_seesr

from srkit.common import build_options
from srkit.engines.base import WeightsSet, get_engine
from srkit.train.data import DegradedHRDataset
from srkit.train.recipes.rfsr import RFSRRecipe, RFSRSettings
from srkit.train.rfsr import CLIPIQA, GRAM_REGULARISER, IMAGE_REWARD, STRUCTURE, LossWindow, RewardWindow
from srkit.train.rfsr_models import ConsisSRModel, SeeSRModel
from srkit.train.trainer import TrainConfig, Trainer, checkpoints

REPO = Path(__file__).resolve().parents[1]


class RandomReward(torch.nn.Module):
    """A frozen random 'quality network' scoring images in [0, 1] (stands in for CLIP-IQA / ImageReward)."""

    def __init__(self, name: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.name = name
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1))
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        assert len(prompts) == images.shape[0]
        return self.net(images).flatten(1).mean(1)


def settings(**values) -> RFSRSettings:
    """Four sampler steps: structure at 0–1, rewards and the regulariser at 2–3 (every loss reachable fast)."""
    windows = {
        "structure": LossWindow(1.0, 0, 1),
        "clipiqa": RewardWindow(1.0, 2, 3),
        "image_reward": RewardWindow(1.0, 2, 3, hinge_per_sample=True),
        "gram_regulariser": LossWindow(1.0, 2, 3),
    }
    return RFSRSettings(sampler_steps=4, index_range=(0, 3), gram_fp16=False, **windows, **values)


def rewards() -> dict:
    return {CLIPIQA: RandomReward(CLIPIQA, 1), IMAGE_REWARD: RandomReward(IMAGE_REWARD, 2)}


@pytest.fixture(scope="module")
def seesr_files(tmp_path_factory):
    paths, _ = tiny_seesr(tmp_path_factory.mktemp("rfsr_seesr"))
    return paths


@pytest.fixture(scope="module")
def consissr_files(tmp_path_factory):
    return tiny_consissr(tmp_path_factory.mktemp("rfsr_consissr"), latent_size=TRAIN_CROP // 8)


def seesr_model(paths, mode: str) -> SeeSRModel:
    from srkit.train.rfsr_models import load_seesr_model

    return load_seesr_model(settings(mode=mode), paths["seesr"], lambda name: paths[name])


def recipe(paths, mode: str) -> RFSRRecipe:
    return RFSRRecipe(seesr_model(paths, mode), settings(mode=mode), rewards(), vgg_weights=None)


def train(recipe_value: RFSRRecipe, data: Path, out: Path, steps: int, resume: bool = False) -> Trainer:
    dataset = DegradedHRDataset(data, crop=TRAIN_CROP, scale=4, seed=1)
    config = TrainConfig(out=out, steps=steps, batch_size=2, checkpoint_every=2, log_every=1, seed=1, resume=resume,
                         lr=1e-3, ema_decay=0.9)  # fmt: skip
    trainer = Trainer(recipe_value, dataset, config, device="cpu")
    trainer.train()
    return trainer


def test_rfsr_trainable_sets_are_the_released_ones(seesr_files, consissr_files) -> None:
    model = seesr_model(seesr_files, "fast")
    names = set(model.trainable())
    assert names and all(n.startswith("controlnet.") or "image_attentions" in n for n in names)
    assert {n for n in names if n.startswith("controlnet.")} == {f"controlnet.{n}" for n, _ in model.controlnet.named_parameters()}
    assert not any(p.requires_grad for n, p in model.unet.named_parameters() if "image_attentions" not in n)
    from srkit.engines.consissr import load_export

    paths, options = consissr_files
    nets = load_export(paths["consissr"], options["model_config"], options["clip_config"])
    chosen = set(ConsisSRModel(nets, None, 4, "fast").trainable())
    assert any(".attn2.to_out_ip" in n for n in chosen if n.startswith("controlnet."))
    assert not any(".attn2.to_q" in n or ".transformer_blocks.0.norm2." in n for n in chosen if n.startswith("controlnet."))
    assert any(".resnets.0.norm2." in n for n in chosen)  # upstream's `out_layers.0`: trained
    unet = {n for n in chosen if n.startswith("unet.")}
    assert unet and all(any(k in n for k in ("position_emb", "attnT", "normT", "to_out_ip")) for n in unet)
    assert {n for n in chosen if n.startswith("prompt.")} == {f"prompt.{n}" for n, _ in nets.prompt.image_proj.named_parameters(prefix="image_proj")}


@pytest.mark.parametrize("mode", ["fast", "rollout"])
def test_rfsr_every_loss_fires_in_its_window_with_finite_values(mode, seesr_files, training_files) -> None:
    built = recipe(seesr_files, mode)
    batch = DegradedHRDataset(training_files["hr"], crop=TRAIN_CROP, scale=4, seed=1)[0]
    batch = {k: v[None] for k, v in batch.items()}
    seen: set[str] = set()
    for step in range(12):
        [(group, loss, logs)] = list(built.losses(batch, step))
        fired = set(logs) - {"step_index"}
        assert group == "model" and torch.isfinite(loss) and loss.requires_grad
        assert fired == set(built.settings.losses_at(int(logs["step_index"])))
        seen |= fired
        loss.backward()
    assert seen == {STRUCTURE, CLIPIQA, IMAGE_REWARD, GRAM_REGULARISER}
    grads = [p.grad for p in built.parameter_groups()["model"].values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_rfsr_resumes_exactly_exports_and_the_export_upscales(seesr_files, training_files, tmp_path) -> None:
    straight = train(recipe(seesr_files, "rollout"), training_files["hr"], tmp_path / "straight", steps=4)
    train(recipe(seesr_files, "rollout"), training_files["hr"], tmp_path / "halves", steps=2)
    resumed = train(recipe(seesr_files, "rollout"), training_files["hr"], tmp_path / "halves", steps=4, resume=True)
    a = load_file(str(checkpoints(tmp_path / "straight")[-1] / "trainable.safetensors"))
    b = load_file(str(checkpoints(tmp_path / "halves")[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.step == straight.step == 4
    ema = load_file(str(checkpoints(tmp_path / "straight")[-1] / "ema.safetensors"))
    assert any(k.startswith("controlnet.") and not torch.equal(ema[k], a[k]) for k in a)  # the ControlNet has an EMA
    export = tmp_path / "straight" / "export"
    engine_class, _ = get_engine("seesr")
    _, defaults = tiny_seesr(tmp_path / "again")
    weights = WeightsSet({**seesr_files, "seesr": export})
    engine = engine_class.from_weights(weights, torch.device("cpu"), torch.float32,
                                       build_options(engine_class.options_class, defaults))  # fmt: skip
    out = engine.upscale(torch.rand(1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_rfsr_on_consissr_trains_and_exports(consissr_files, seesr_files, training_files, tmp_path) -> None:
    from srkit.train.rfsr_models import load_consissr_model

    paths, options = consissr_files
    values = settings(model="consissr", mode="fast", model_config=options["model_config"],
                      clip_config=options["clip_config"])  # fmt: skip
    resolve = {**seesr_files, "consissr": paths["consissr"]}.__getitem__
    model = load_consissr_model(values, None, resolve)
    trainer = train(RFSRRecipe(model, values, rewards(), vgg_weights=None), training_files["hr"], tmp_path, steps=2)
    assert trainer.step == 2
    engine_class, _ = get_engine("consissr")
    engine = engine_class.from_weights(WeightsSet({"consissr": tmp_path / "export"}), torch.device("cpu"),
                                       torch.float32, build_options(engine_class.options_class,
                                                                    {"steps": 1, "latent_tile": 8, "latent_overlap": 4}))  # fmt: skip
    out = engine.upscale(torch.rand(1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 32, 32)


def test_rfsr_two_processes_write_the_same_checkpoint_layout(seesr_files, training_files, tmp_path) -> None:
    script = tmp_path / "run.py"
    tests, hr = str(REPO / "tests"), str(training_files["hr"])
    files = {k: str(v) for k, v in seesr_files.items()}
    script.write_text(
        f"import sys; sys.path.insert(0, {tests!r})\n"
        "from pathlib import Path\n"
        "from test_train_rfsr import recipe, train\n"
        f"paths = {{k: Path(v) for k, v in {files!r}.items()}}\n"
        f"train(recipe(paths, 'fast'), Path({hr!r}), Path(sys.argv[1]), steps=2)\n"
    )
    launcher = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for procs, out in (("1", tmp_path / "one"), ("2", tmp_path / "two")):
        done = subprocess.run([launcher, "--standalone", "--nproc_per_node", procs, str(script), str(out)],
                              env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = checkpoints(tmp_path / "one")[-1], checkpoints(tmp_path / "two")[-1]
    assert sorted(p.name for p in one.iterdir() if not p.name.startswith("rank")) == sorted(
        p.name for p in two.iterdir() if not p.name.startswith("rank")
    )
    assert {p.name for p in two.glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}


def test_rfsr_settings_from_the_command_line_and_missing_reward_weights(tmp_path, monkeypatch) -> None:
    """Windows are `-O name=weight@first-last`; a real run without the reward weights is one line naming them."""
    from srkit.registry import WeightsError
    from srkit.train.recipes import describe_settings
    from srkit.train.recipes.rfsr import _registry_rewards

    values = build_options(RFSRSettings, {"structure": "1e-3@0-9", "image_reward": "0", "mode": "fast"})
    assert values.structure == LossWindow(1e-3, 0, 9) and not values.image_reward.covers(45)
    assert values.image_reward.hinge_per_sample  # the other fields keep the release's
    with pytest.raises(ValueError, match="weight@first-last"):
        build_options(RFSRSettings, {"structure": "strong"})
    assert "structure=LossWindow(weight=0.0005" in describe_settings("rfsr") and "--dwt_loss_weight" in describe_settings("rfsr")
    monkeypatch.setenv("SRKIT_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as caught:
        _registry_rewards(build_options(RFSRSettings, {"rewards": "image_reward"}), offline=True)
    assert "image-reward" in str(caught.value) and len(str(caught.value).splitlines()) == 1



class TargetBrightness(torch.nn.Module):
    """A reward with a known optimum: 10·(distance of the mean brightness from 0.8), negated (hinge always on)."""

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return -10 * (images.mean(dim=(1, 2, 3)) - 0.8).abs()


@pytest.mark.parametrize(("window", "fall"), [(STRUCTURE, 0.05), (CLIPIQA, 0.015)])
def test_rfsr_learns_its_objective_on_a_fixed_batch(window, fall, seesr_files, training_files) -> None:
    """Learning, not only running: with one loss on over steps 0–1 of a 4-step sampler (fast mode: at the late steps
    x̂0 of the noised LR start is almost the start itself, so a tiny random model can only learn early), twelve Adam
    steps on two HR crops lower that loss (the ground truth's low-pass L1, or the hinge on a brightness reward)
    measured at the same draws of step index, prompt and start noise before and after."""
    off = {name: LossWindow(0.0, 0, 1) for name in (STRUCTURE, GRAM_REGULARISER)} | {
        name: RewardWindow(0.0, 0, 1) for name in (CLIPIQA, IMAGE_REWARD)
    }
    on = RewardWindow(1.0, 0, 1) if window == CLIPIQA else LossWindow(1.0, 0, 1)
    values = RFSRSettings(sampler_steps=4, index_range=(0, 1), gram_fp16=False, mode="fast", **(off | {window: on}))
    from srkit.train.rfsr_models import load_seesr_model

    model = load_seesr_model(values, seesr_files["seesr"], lambda name: seesr_files[name])
    built = RFSRRecipe(model, values, {CLIPIQA: TargetBrightness(), IMAGE_REWARD: TargetBrightness()}, vgg_weights=None)
    dataset = DegradedHRDataset(training_files["hr"], crop=TRAIN_CROP, scale=4, seed=1)
    batch = {k: torch.stack([dataset[0][k], dataset[1][k]]) for k in ("lr", "hr")}

    def measured() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            [(_, loss, logs)] = list(built.losses(batch, 0))
        assert set(logs) == {window, "step_index"}
        return loss.item()

    before = measured()
    optimiser = torch.optim.Adam(built.parameter_groups()["model"].values(), lr=1e-2)
    for step in range(12):
        [(_, loss, _)] = list(built.losses(batch, step))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = measured()
    assert after < (1 - fall) * before, (before, after)
