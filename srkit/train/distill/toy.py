"""A 2-D score distillation that runs on a CPU in seconds: evidence that the SiD losses *learn*, not only run.

The procedure is SiD-LSG's, shrunk to points in the plane (task "generate"):
1. Teacher: an MLP ε-network trained by denoising on a ring of Gaussian modes, on SD's ᾱ schedule.
2. Generator and fake score: copies of the teacher. The generator is the teacher's one-step x0 guess from pure
   noise at t_init = 625 (SiD-LSG's sampler); at the start that guess is a blurred, shrunken ring.
3. Alternate: one fake-score step (ε-MSE on the generator's detached samples), one generator step (the SiD
   generator loss at t ~ U{20..979}, one ε shared by teacher and fake score).
4. Measure the sliced Wasserstein distance of generator samples to fresh data before and after, next to the
   teacher's own multi-step (DDIM) samples as the floor.

Task "restore" is GenDR's setting in miniature: each ring point z_h is degraded to z_l = s·z_h + σ·n, the generator
is GenDR's one-step update z_g = (z_l − 0.5·ε(z_l, 500))/0.5, the real score is trained on z_h and the fake score
on z_g (Eq. 7, x0 targets), and the generator loss is SiD's ("sid") or CiD's ("cid", with z_h where `cid_form`
puts it, plus `regression`·‖z_g − z_h‖²). The paired distance ‖z_g − z_h‖ is reported too. `simultaneous` steps
the generator against the scores of the start of the iteration, as srkit's trainer does.

`benchmarks/toy_distill.py` prints the numbers (`--compare`: every CiD candidate); tests/test_sid_losses.py
asserts that the distances fall for the recipe's default and that the paper's literal form diverges.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from srkit.train.distill.cid import cid_generator_loss, regression_loss, sample_timesteps
from srkit.train.distill.sid import (
    ScoreIdentityTerms,
    reduce_loss,
    score_matching_loss,
    sid_generator_loss_vp,
)
from srkit.train.distill.vp import (
    PromptGuidance,
    guided_eps,
    scaled_linear_alphas_cumprod,
    vp_coefficients,
    x0_from_eps,
)
from srkit.train.lora import frozen

UNCONDITIONAL = PromptGuidance()


@dataclass
class ToySettings:
    """Sizes and step counts of the toy (chosen to finish in seconds on one CPU thread)."""

    task: str = "generate"
    """"generate": noise → ring with SiD-LSG's sampler; "restore": degraded point → ring with GenDR's update."""
    loss: str = "sid"
    """Generator loss: "sid", or "cid" (task "restore" only: it needs the HR point)."""
    cid_form: str = "paper"
    """Where "cid" puts the HR point (srkit.train.distill.cid.CiDForm)."""
    regression: float = 0.0
    """Task "restore": weight of Eq. 6's ‖z_g − z_h‖² added to the generator loss."""
    simultaneous: bool = False
    """Step the generator with the score networks of the start of the iteration, as srkit's trainer does (every
    group steps after all forwards), instead of SiD's alternation (scores first)."""
    seed: int = 0
    modes: int = 8
    radius: float = 2.0
    mode_std: float = 0.15
    width: int = 64
    teacher_steps: int = 1500
    teacher_lr: float = 2e-3
    distill_steps: int = 400
    batch: int = 256
    generator_lr: float = 2e-4
    fake_lr: float = 1e-3
    real_lr: float = 1e-4
    """Task "restore": the real score keeps learning the HR points (GenDR Eq. 7 L_ϕ)."""
    alpha: float = 1.2
    """SiD's α (CiD's ξ)."""
    init_timestep: int = 625
    gendr_timestep: int = 500
    gendr_scale: float = 0.5
    degradation_scale: float = 0.6
    degradation_noise: float = 0.3
    t_min: int = 20
    t_max: int = 980
    eval_samples: int = 2000
    sampler_steps: int = 50


@dataclass(frozen=True)
class ToyResult:
    distance_before: float
    distance_after: float
    teacher_distance: float
    """Sliced Wasserstein distance of the teacher's multi-step samples to the data: what a perfect student of this
    teacher would reach."""
    seconds: float
    paired_error_before: float | None = None
    """Task "restore": RMS distance ‖z_g − z_h‖ of each restored point to its own HR point."""
    paired_error_after: float | None = None


class ToyEpsNet(nn.Module):
    """ε(z_t, t) for points in the plane: an MLP on the point and sinusoidal features of t/1000."""

    def __init__(self, width: int = 64, frequencies: int = 8) -> None:
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        self.layers = nn.Sequential(
            nn.Linear(2 + 2 * frequencies, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(
        self, noisy: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        phase = (t.to(noisy.dtype) / 1000)[:, None] * self.frequencies
        return self.layers(torch.cat([noisy, phase.sin(), phase.cos()], dim=1))


def ring_samples(n: int, settings: ToySettings, generator: torch.Generator) -> torch.Tensor:
    """n points from `modes` Gaussians evenly spaced on a circle."""
    angle = 2 * math.pi * torch.randint(settings.modes, (n,), generator=generator) / settings.modes
    centres = settings.radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + settings.mode_std * torch.randn(n, 2, generator=generator)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """W1 averaged over random 1-D projections, from sorted projected samples (equal sample counts)."""
    directions = torch.randn(2, projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0, keepdim=True)
    return ((x @ directions).sort(dim=0).values - (y @ directions).sort(dim=0).values).abs().mean().item()


def one_step_generate(
    network: nn.Module, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t_init: int
) -> torch.Tensor:
    """SiD-LSG's generator: the network's x0 estimate at t_init from z_t = b·z (noise only)."""
    a, b = vp_coefficients(alphas_cumprod, t_init, noise)
    noisy = b * noise
    return x0_from_eps(noisy, guided_eps(network, noisy, t_init, UNCONDITIONAL), a, b)


def draw_batch(
    settings: ToySettings, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generator input, data points): noise and unpaired ring points, or degraded ring points and their HR."""
    data = ring_samples(n, settings, generator)
    noise = torch.randn(n, 2, generator=generator)
    if settings.task == "generate":
        return noise, data
    if settings.task == "restore":
        return settings.degradation_scale * data + settings.degradation_noise * noise, data
    raise ValueError(f"unknown toy task '{settings.task}' (expected 'generate' or 'restore')")


def generate(
    network: nn.Module, inputs: torch.Tensor, settings: ToySettings, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The one-step generator of the task."""
    if settings.task == "generate":
        return one_step_generate(network, inputs, alphas_cumprod, settings.init_timestep)
    eps = guided_eps(network, inputs, settings.gendr_timestep, UNCONDITIONAL)
    return x0_from_eps(inputs, eps, settings.gendr_scale, settings.gendr_scale)


@torch.no_grad()
def ddim_sample(
    network: nn.Module, noise: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int
) -> torch.Tensor:
    """The teacher's deterministic multi-step samples (DDIM, η = 0) from t = T−1 down to 0."""
    timesteps = torch.linspace(alphas_cumprod.numel() - 1, 0, steps).round().long().tolist()
    sample = noise
    for current, following in zip(timesteps, timesteps[1:] + [None]):
        a, b = vp_coefficients(alphas_cumprod, current, sample)
        eps = guided_eps(network, sample, current, UNCONDITIONAL)
        x0 = x0_from_eps(sample, eps, a, b)
        if following is None:
            return x0
        a_next, b_next = vp_coefficients(alphas_cumprod, following, sample)
        sample = a_next * x0 + b_next * eps
    return sample


def score_step(
    network: nn.Module,
    optimiser: torch.optim.Optimizer,
    clean: torch.Tensor,
    target: str,
    t_range: tuple[int, int],
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
) -> None:
    """One denoising step of a score network on `clean` at t ~ U{t_range[0]..t_range[1] − 1}."""
    t = sample_timesteps(clean.shape[0], *t_range, generator)
    noise = torch.randn(clean.shape, generator=generator)
    loss = score_matching_loss(network, clean, t, noise, alphas_cumprod, UNCONDITIONAL, target)
    optimiser.zero_grad(set_to_none=True)
    reduce_loss(loss, "mean").backward()
    optimiser.step()


def train_teacher(
    settings: ToySettings, alphas_cumprod: torch.Tensor, generator: torch.Generator
) -> ToyEpsNet:
    """Denoising score matching (ε-MSE, t uniform over the whole schedule) on fresh ring samples each step."""
    with torch.random.fork_rng(devices=[]):  # the initial weights are seeded too: a run repeats exactly
        torch.manual_seed(settings.seed)
        teacher = ToyEpsNet(settings.width)
    optimiser = torch.optim.Adam(teacher.parameters(), lr=settings.teacher_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.teacher_steps)
    for _ in range(settings.teacher_steps):
        data = ring_samples(settings.batch, settings, generator)
        score_step(teacher, optimiser, data, "eps", (0, alphas_cumprod.numel()), alphas_cumprod, generator)
        schedule.step()
    return teacher.requires_grad_(False)


def generator_terms(
    samples: torch.Tensor,
    hr: torch.Tensor,
    real: nn.Module,
    fake: nn.Module,
    settings: ToySettings,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
) -> ScoreIdentityTerms:
    """The generator loss of the step at fresh t and ε: SiD's, or CiD's with the HR points as its reference."""
    t = sample_timesteps(samples.shape[0], settings.t_min, settings.t_max, generator)
    noise = torch.randn(samples.shape, generator=generator)
    if settings.loss == "sid":
        return sid_generator_loss_vp(
            samples, real, fake, t, noise, alphas_cumprod, UNCONDITIONAL, alpha=settings.alpha
        )
    if settings.loss == "cid" and settings.task == "restore":
        return cid_generator_loss(
            samples, hr, real, fake, t, noise, alphas_cumprod, UNCONDITIONAL, settings.alpha, settings.cid_form
        )
    raise ValueError(f"toy loss '{settings.loss}' does not apply to task '{settings.task}'")


def distill(
    teacher: nn.Module, settings: ToySettings, alphas_cumprod: torch.Tensor, generator: torch.Generator
) -> nn.Module:
    """SiD's alternation (CiD's in task "restore"); returns the trained one-step generator network (a copy of the
    teacher at the start)."""
    restore = settings.task == "restore"
    score_target = "x0" if restore else "eps"  # GenDR Eq. 7 / SiD-LSG
    t_range = (settings.t_min, settings.t_max)
    student, fake = (copy.deepcopy(teacher).requires_grad_(True) for _ in range(2))
    real = copy.deepcopy(teacher).requires_grad_(True) if restore else teacher
    student_optimiser = torch.optim.Adam(student.parameters(), lr=settings.generator_lr, betas=(0.0, 0.999))
    fake_optimiser = torch.optim.Adam(fake.parameters(), lr=settings.fake_lr, betas=(0.0, 0.999))
    real_optimiser = (
        torch.optim.Adam(real.parameters(), lr=settings.real_lr, betas=(0.0, 0.999)) if restore else None
    )
    def score_steps(samples: torch.Tensor, hr: torch.Tensor) -> None:
        score_step(fake, fake_optimiser, samples, score_target, t_range, alphas_cumprod, generator)
        if real_optimiser is not None:
            score_step(real, real_optimiser, hr, score_target, t_range, alphas_cumprod, generator)

    for _ in range(settings.distill_steps):
        inputs, hr = draw_batch(settings, settings.batch, generator)
        with torch.no_grad():
            samples = generate(student, inputs, settings, alphas_cumprod)
        if not settings.simultaneous:
            score_steps(samples, hr)

        with frozen(real, fake):
            generated = generate(student, inputs, settings, alphas_cumprod)
            terms = generator_terms(generated, hr, real, fake, settings, alphas_cumprod, generator)
            loss = reduce_loss(terms.elements, "mean")
            if settings.regression and restore:
                loss = loss + settings.regression * reduce_loss(regression_loss(generated, hr), "mean")
            student_optimiser.zero_grad(set_to_none=True)
            loss.backward()
        student_optimiser.step()
        if settings.simultaneous:
            score_steps(samples, hr)
    return student.requires_grad_(False)


def paired_error(samples: torch.Tensor, targets: torch.Tensor) -> float:
    """RMS Euclidean distance between matching rows."""
    return (samples - targets).pow(2).sum(dim=1).mean().sqrt().item()


def run_toy(settings: ToySettings | None = None) -> ToyResult:
    """Train the teacher, distil it, and measure the student before and after against fresh data."""
    settings = settings or ToySettings()
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    alphas_cumprod = scaled_linear_alphas_cumprod()
    teacher = train_teacher(settings, alphas_cumprod, generator)

    inputs, data = draw_batch(settings, settings.eval_samples, generator)
    with torch.no_grad():
        before = generate(teacher, inputs, settings, alphas_cumprod)
    teacher_samples = ddim_sample(
        teacher, torch.randn(data.shape, generator=generator), alphas_cumprod, settings.sampler_steps
    )
    student = distill(teacher, settings, alphas_cumprod, generator)
    with torch.no_grad():
        after = generate(student, inputs, settings, alphas_cumprod)
    restore = settings.task == "restore"
    return ToyResult(
        distance_before=sliced_wasserstein(before, data),
        distance_after=sliced_wasserstein(after, data),
        teacher_distance=sliced_wasserstein(teacher_samples, data),
        seconds=time.perf_counter() - start,
        paired_error_before=paired_error(before, data) if restore else None,
        paired_error_after=paired_error(after, data) if restore else None,
    )


__all__ = ["ToyEpsNet", "ToyResult", "ToySettings", "ddim_sample", "distill", "run_toy", "sliced_wasserstein"]
