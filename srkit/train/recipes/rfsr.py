"""RFSR (Sun et al., arXiv:2412.03268): timestep-aware reward-feedback fine-tuning of a multi-step SR model.

Per batch (notes §2): a step index k of the 50-step sampler is drawn (re-drawn until a loss window covers it); the
model's prediction x̂0 at that step is decoded with gradient; early steps (k ≤ 19) are held to the ground truth's
low frequencies (DT-CWT low-pass L1), late steps (k ≥ 40) are pushed by rewards (CLIP-IQA, ImageReward: relu(2 − r))
and kept near a frozen reference by the Gram regulariser.  Two ways to reach step k:
- `rollout` (the paper): sample without gradient from the start down to step k, then one step with gradient;
- `fast` (the released code): one call on the start latent (the LR latent noised to t = 999) told t_k.
Fixed against the released script (and said in --help): the EMA covers the ControlNet too (a no-op upstream), the
export is written once in the engine's loadable format (upstream's final save overwrote the ControlNet with the
UNet), and every batch element gets its own start latent (upstream used element 0 for all).

Models: SeeSR (trainable: the whole ControlNet and the UNet's image cross-attention, as released) and ConsisSR
(its stage-2 set); `reference`: `initial` (a frozen copy of the model being tuned, srkit's default) or `sd_base`
(SeeSR only: the vanilla SD2-base UNet fed the current ControlNet's residuals, as released).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from srkit.common import check_choice
from srkit.train.recipes import RecipeInputs, TrainingSetup, local_or_registry
from srkit.train.reward_models import RewardModel
from srkit.train.rfsr import CLIPIQA, GRAM_REGULARISER, IMAGE_REWARD, STRUCTURE, RFSRLossSettings
from srkit.train.rfsr_models import MODELS, RFSRModel, load_rfsr_model

MODES = ("rollout", "fast")
REFERENCES = ("initial", "sd_base")
TRAINING = TrainingSetup(
    train={"lr": 5e-6, "batch_size": 1, "grad_accum": 2, "ema_decay": 0.999},
    source="train_seesr_kl_ema.sh: --learning_rate 5e-6, --train_batch_size 1, --gradient_accumulation_steps 2, "
    "--ema_decay 0.999",
)
"""The released run's optimisation; `srkit finetune` options override it."""


@dataclass
class RFSRSettings(RFSRLossSettings):
    model: str = "seesr"
    """seesr | consissr: the model family being tuned (`--base` names its weights: a registry name or a path)."""
    mode: str = "rollout"
    """rollout: sample down to the drawn step without gradient, then one step with it (the paper); fast: one call
    on the t=999-noised LR latent told the drawn timestep (the released code)."""
    reference: str = "initial"
    """initial: the Gram regulariser compares with a frozen copy of the starting model (srkit); sd_base: with the
    vanilla SD2-base UNet on the current ControlNet's residuals (the released script; SeeSR only)."""
    rewards: str = "clipiqa,image_reward"
    """Reward models of the reward windows (their weights from the registry; tests pass random ones)."""
    model_config: str | None = None
    """ConsisSR only: an official-layout model yaml for a checkpoint of other sizes (exports carry theirs)."""
    clip_config: str | None = None
    """ConsisSR only: the OpenCLIP config json going with `model_config`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("model", self.model, tuple(MODELS)), ("mode", self.mode, MODES),
                                     ("reference", self.reference, REFERENCES)):  # fmt: skip
            check_choice(value, allowed, name)
        if self.reference == "sd_base" and self.model != "seesr":
            raise ValueError("reference sd_base is the released SeeSR script's; use initial for ConsisSR")

    @property
    def reward_names(self) -> list[str]:
        return [name.strip() for name in self.rewards.split(",") if name.strip()]


SETTINGS = RFSRSettings


def build(settings: RFSRSettings, inputs: RecipeInputs) -> RFSRRecipe:
    """`--base seesr|consissr` (registry) or a path to that model's weights; the rewards from the registry."""
    if inputs.base is not None and str(inputs.base) in MODELS:  # `--base seesr|consissr`: the registry's weights
        settings.model, base = str(inputs.base), None
    else:
        base = inputs.base
    model = load_rfsr_model(settings, base, lambda name: local_or_registry(None, name, inputs.offline))
    rewards = inputs.extras.get("rewards") or _registry_rewards(settings, inputs.offline)
    return RFSRRecipe(model, settings, rewards, vgg_weights=inputs.extras.get("vgg_weights", "registry"),
                      offline=inputs.offline)  # fmt: skip


class RFSRRecipe:
    name = "rfsr"

    def __init__(
        self,
        model: RFSRModel,
        settings: RFSRSettings,
        rewards: dict[str, RewardModel],
        *,
        vgg_weights: str | Path | None = "registry",
        offline: bool = False,
    ) -> None:
        from srkit.train.gram_regulariser import GramRegulariser
        from srkit.train.wavelet_losses import LowPassL1Loss

        self.model, self.settings = model, settings
        s = settings
        missing = [name for name in (CLIPIQA, IMAGE_REWARD) if name in s.reward_names and name not in rewards]
        if missing:
            raise ValueError(f"no reward model for {', '.join(missing)}")
        self.rewards = {name: rewards[name] for name in s.reward_names}
        self.structure = LowPassL1Loss(s.structure.weight, s.structure_transform)
        if vgg_weights == "registry":  # torchvision's VGG19 file (its name is checked on load)
            vgg_weights = local_or_registry(None, "vgg19", offline) if s.gram_regulariser.weight else None
        self.gram = GramRegulariser(s.gram_regulariser.weight, s.gram_layer_weights, normalise=s.gram_normalise,
                                    fp16=s.gram_fp16, vgg_weights=vgg_weights).requires_grad_(False)  # fmt: skip
        self.rng = TorchRandom()
        self.groups = {"model": model.trainable()}

    def parameter_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return self.groups

    def to(self, device: torch.device) -> RFSRRecipe:
        self.model.to(device)
        for module in (self.structure, self.gram, *self.rewards.values()):
            if isinstance(module, torch.nn.Module):
                module.to(device)
        return self

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        s = self.settings
        index = s.draw_step_index(self.rng)
        fired = s.losses_at(index)
        hr = batch["hr"]
        prompts = self.prompts(hr)
        cond = self.model.condition(batch["lr"], hr, prompts)
        x = self.model.start(cond)
        if s.mode == "rollout":
            x = self.model.rollout(x, cond, index)
        x0 = self.model.predict_x0(x, index, cond)
        sr = self.model.decode(x0)
        terms: dict[str, torch.Tensor] = {}
        if STRUCTURE in fired:
            terms[STRUCTURE] = self.structure(sr, hr)
        for name, reward in self.rewards.items():
            if name in fired:
                terms[name] = s.windows()[name].loss(reward(sr, prompts))
        if GRAM_REGULARISER in fired:
            with torch.no_grad():
                reference = self.model.decode(self.model.predict_x0(x, index, cond, reference=True))
            terms[GRAM_REGULARISER] = self.gram(sr, reference).float()
        total = sum(terms.values())
        logs = {name: value.item() for name, value in terms.items()} | {"step_index": float(index)}
        yield "model", total, logs

    def prompts(self, hr: torch.Tensor) -> list[str]:
        """The tag prompt of each HR crop (training tags come from the ground truth, as upstream's tag files);
        '' for a `null_text_ratio` share of them."""
        tags = self.model.tags(hr)
        return ["" if self.rng.random() < self.settings.null_text_ratio else text for text in tags]

    def export(self, folder: Path) -> Path:
        return self.model.export(folder)


class TorchRandom:
    """`random.Random`'s two calls the recipe makes, drawn from torch's generator: the trainer checkpoints that
    generator, so a resumed run draws the same step indices and null prompts as an uninterrupted one."""

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, ()))

    def random(self) -> float:
        return float(torch.rand(()))


def _registry_rewards(settings: RFSRSettings, offline: bool) -> dict[str, RewardModel]:
    """The real reward models; one line naming the files when their weights are missing."""
    from srkit.train.image_reward import ImageRewardScorer
    from srkit.train.reward_models import load_clipiqa_reward

    rewards: dict[str, RewardModel] = {}
    for name in settings.reward_names:
        if name == CLIPIQA:
            rewards[name] = load_clipiqa_reward()
        elif name == IMAGE_REWARD:
            checkpoint = local_or_registry(None, "image-reward", offline)  # ImageReward.pt, med_config.json beside it
            vocab = local_or_registry(None, "bert-base-uncased-vocab", offline)
            rewards[name] = ImageRewardScorer.from_files(checkpoint, checkpoint.parent / "med_config.json", vocab)
        else:
            raise ValueError(f"unknown reward '{name}'; rewards: {CLIPIQA}, {IMAGE_REWARD}")
    return rewards


__all__ = ["SETTINGS", "TRAINING", "RFSRRecipe", "RFSRSettings", "build"]
