"""SiD / SiD-LSG / CiD / CiDA losses: golden values of the official SiD code (fixture ../shared/golden/sid_losses),
hand-computed values on tiny tensors, and a toy distillation that has to learn.

The golden tests rebuild the fixture's tiny networks from its README, run everything in float64 (the README's
advice), and read sizes, constants and tolerances from golden.json; set SRKIT_GOLDEN_DIR to check another fixture
root of the same layout. `-k "golden and sid"` selects them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from golden import fixture_dir, needs
from torch import nn

from srkit.train.distill.cid import cid_generator_loss, regression_loss
from srkit.train.distill.cida import (
    CiDASettings,
    DiscriminatorHead,
    RepaProjector,
    cida_generator_loss,
    discriminator_loss,
    feature_tokens,
    generator_adversarial_loss,
    repa_alignment_loss,
)
from srkit.train.distill.sid import (
    edm_fake_score_loss,
    edm_loss_weight,
    reduce_loss,
    score_identity_loss,
    score_matching_loss,
    sid_generator_loss_edm,
    sid_generator_loss_vp,
    sid_generator_sigma,
)
from srkit.train.distill.vp import (
    PromptGuidance,
    drop_prompts,
    guided_eps,
    scaled_linear_alphas_cumprod,
    vp_coefficients,
    x0_from_eps,
)

GOLDEN = fixture_dir("sid_losses")
golden = needs(GOLDEN)

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# The fixture's tiny networks, rebuilt from its README
# ---------------------------------------------------------------------------------------------------------------


def constant_channel(x: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """One extra channel holding a per-sample value, concatenated to x."""
    plane = per_sample.to(x.dtype).view(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
    return torch.cat([x, plane], dim=1)


class TinyF(nn.Module):
    """The raw EDM network F(x, c_noise) = conv2(SiLU(conv1([x, c_noise])))."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.conv1(constant_channel(x, c_noise))))


class TinyEDM(nn.Module):
    """EDMPrecond around TinyF: D(x; σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4)."""

    def __init__(self, channels: int, hidden: int, sigma_data: float) -> None:
        super().__init__()
        self.F = TinyF(channels, hidden)
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip * x + c_out * self.F(c_in * x, sigma.log().flatten() / 4)


class TinyEps(nn.Module):
    """ε-prediction: conv2(SiLU(conv1([x, t/1000]) + ctx(mean over tokens of e)))."""

    def __init__(self, channels: int, hidden: int, ctx_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.ctx = nn.Linear(ctx_dim, hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(constant_channel(x, t.to(x.dtype) / 1000))
        hidden = hidden + self.ctx(embedding.mean(dim=1))[:, :, None, None]
        return self.conv2(F.silu(hidden))


class Fixture:
    """The golden's inputs, expected values, networks and tolerance check (float64)."""

    def __init__(self, root: Path) -> None:
        from safetensors.torch import load_file

        self.meta = json.loads((root / "golden.json").read_text())
        self.inputs = load_file(str(root / "inputs.safetensors"))
        self.expected = load_file(str(root / "expected.safetensors"))
        self.weights = load_file(str(root / "tiny_nets.safetensors"))
        self.errors: dict[str, float] = {}
        """Largest relative error per key: over the whole tensor (scalars included)."""
        self.sample_errors: dict[str, float] = {}
        """Largest per-sample relative error per batched key."""

    @property
    def constants(self) -> dict:
        return self.meta["constants"]

    def input(self, key: str) -> torch.Tensor:
        value = self.inputs[key]
        return value if not value.is_floating_point() else value.to(DTYPE)

    def net(self, prefix: str) -> nn.Module:
        sizes = self.meta["sizes"]
        if prefix.startswith("edm_"):
            module = TinyEDM(sizes["C"], sizes["hidden"], self.constants["sigma_data"])
        else:
            module = TinyEps(sizes["C"], sizes["hidden"], sizes["ctx_dim"])
        state = {k[len(prefix) + 1 :]: v for k, v in self.weights.items() if k.startswith(prefix + ".")}
        module.load_state_dict(state)
        return module.to(DTYPE).requires_grad_(False)

    def guidance(self, scale: float) -> PromptGuidance:
        return PromptGuidance(self.input("ctx.cond"), self.input("ctx.uncond"), scale)

    def cases(self, pattern: str) -> list[str]:
        """The case names whose scalar `<case>.L` matches the regex `pattern`, e.g. the α values present; a fixture
        without any fails the test (a loop over no cases would check nothing)."""
        names = sorted({k[:-2] for k in self.expected if k.endswith(".L") and re.fullmatch(pattern, k[:-2])})
        assert names, f"the fixture has no case matching {pattern}"
        return names

    def check(self, key: str, got: torch.Tensor) -> None:
        """The README's rule: scalars and whole tensors within `whole` relative to the largest expected value;
        batched (non-gradient) tensors also per sample within `per_sample`."""
        tolerance = self.meta["tolerance"]
        expected = self.expected[key].to(DTYPE)
        got = got.detach().to(DTYPE).reshape(expected.shape)
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        self.errors[key] = error
        assert error <= tolerance["whole"], f"{key}: relative error {error:.2e} > {tolerance['whole']:.0e}"
        if key.endswith(".L") or ".grad." in key:
            return
        for i, (g, e) in enumerate(zip(got, expected)):
            sample_error = ((g - e).abs().max() / e.abs().max()).item()
            self.sample_errors[key] = max(self.sample_errors.get(key, 0.0), sample_error)
            assert sample_error <= tolerance["per_sample"], f"{key}[{i}]: relative error {sample_error:.2e}"

    def check_grads(self, case: str, prefix: str, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        keys = [k for k in self.expected if k.startswith(f"{case}.grad.{prefix}.")]
        assert keys, f"no expected gradients for {case} / {prefix}"
        for key in keys:
            self.check(key, params[key[len(f"{case}.grad.{prefix}.") :]].grad)

    def report(self, group: str) -> None:
        """Print the worst errors of a group (seen with pytest -s)."""
        whole = [v for k, v in self.errors.items() if k.startswith(group)]
        sample = [v for k, v in self.sample_errors.items() if k.startswith(group)]
        print(
            f"\n{group}: {len(whole)} keys, max whole-tensor relative error {max(whole, default=0):.2e}, "
            f"max per-sample {max(sample, default=0):.2e}"
        )


@pytest.fixture(scope="module")
def fixture() -> Fixture:
    return Fixture(GOLDEN)


def scale_of(case: str, letter: str) -> float:
    """The number after `_<letter>` in a case name such as ddpm.gen_k2.0_a1.2."""
    return float(re.search(rf"[_.]{letter}(\d+(?:\.\d+)?)", case).group(1))


def trainable(module: nn.Module) -> nn.Module:
    return module.requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# Golden: edm.*
# ---------------------------------------------------------------------------------------------------------------


def check_generator_case(fixture, case: str, sample_key: str, sample, terms, term_keys, grad_key: str,
                         generator: nn.Module, network: str) -> None:  # fmt: skip
    """One generator case against the fixture: the sample, the score terms (real, fake, weight), the per-element
    loss and its sum, and the gradients of the sample and of the generator network `network`."""
    loss = reduce_loss(terms.elements, "sum")
    loss.backward()
    fixture.check(sample_key, sample)
    for key, value in zip(term_keys, (terms.x0_real, terms.x0_fake, terms.weight_factor), strict=True):
        fixture.check(key, value)
    fixture.check(f"{case}.loss_elem", terms.elements)
    fixture.check(f"{case}.L", loss)
    fixture.check(f"{case}.{grad_key}", sample.grad)
    fixture.check_grads(case, network, generator)


@golden
def test_golden_sid_edm_generator_sigma(fixture: Fixture) -> None:
    u = fixture.inputs["edm.gen.u"]
    sigma = sid_generator_sigma(u, tmax=fixture.constants["edm_tmax"])
    torch.testing.assert_close(sigma, fixture.inputs["edm.gen.sigma"], rtol=1e-5, atol=0)


@golden
def test_golden_sid_edm_generator(fixture: Fixture) -> None:
    for case in fixture.cases(r"edm\.gen_a[\d.]+"):
        generator = trainable(fixture.net("edm_gen"))
        z = fixture.input("edm.z")
        y = generator(z, torch.full((z.shape[0],), fixture.constants["init_sigma"], dtype=DTYPE))
        y.retain_grad()
        terms = sid_generator_loss_edm(
            y,
            fixture.net("edm_true"),
            fixture.net("edm_fake"),
            fixture.input("edm.gen.sigma"),
            fixture.input("edm.gen.eps"),
            alpha=scale_of(case, "a"),
        )
        keys = ("edm.gen.y_real", "edm.gen.y_fake", "edm.gen.weight_factor")
        check_generator_case(fixture, case, "edm.y", y, terms, keys, "grad_y", generator, "edm_gen")
        detached = fixture.expected[f"{case}.grad_y_inputs_detached"].to(DTYPE)
        assert (y.grad - detached).abs().max() > 0.05 * detached.abs().max(), "network inputs were detached"
    fixture.report("edm.gen")


@golden
def test_golden_sid_edm_fake_score(fixture: Fixture) -> None:
    fake = trainable(fixture.net("edm_fake"))
    sigma = fixture.input("edm.fake.sigma")
    elements = edm_fake_score_loss(
        fixture.expected["edm.y"].to(DTYPE),
        fake,
        sigma,
        fixture.input("edm.fake.eps"),
        fixture.constants["sigma_data"],
    )
    loss = reduce_loss(elements, "sum")
    loss.backward()
    fixture.check("edm.fake.weight", edm_loss_weight(sigma, fixture.constants["sigma_data"]))
    fixture.check("edm.fake.loss_elem", elements)
    fixture.check("edm.fake.L", loss)
    fixture.check_grads("edm.fake", "edm_fake", fake)
    fixture.report("edm.fake")


# ---------------------------------------------------------------------------------------------------------------
# Golden: ddpm.* (SiD-LSG)
# ---------------------------------------------------------------------------------------------------------------


@golden
def test_golden_sid_schedule_is_sd_scaled_linear(fixture: Fixture) -> None:
    torch.testing.assert_close(
        scaled_linear_alphas_cumprod(), fixture.inputs["sched.alphas_cumprod"], rtol=1e-6, atol=0
    )


def lsg_generate(fixture: Fixture, generator: nn.Module) -> torch.Tensor:
    """SiD-LSG's one-step sampler: z_t = b·z at the init timestep (noise added to zero), y = x0 of the prediction."""
    z = fixture.input("lsg.z")
    step = fixture.constants["init_timestep"]
    acp = fixture.input("sched.alphas_cumprod")
    a, b = vp_coefficients(acp, step, z)
    noisy = b * z
    return x0_from_eps(noisy, guided_eps(generator, noisy, step, fixture.guidance(1.0)), a, b)


@golden
def test_golden_sid_ddpm_generator(fixture: Fixture) -> None:
    for case in fixture.cases(r"ddpm\.gen_k[\d.]+_a[\d.]+"):
        kappa, alpha = scale_of(case, "k"), scale_of(case, "a")
        generator = trainable(fixture.net("eps_gen"))
        y = lsg_generate(fixture, generator)
        y.retain_grad()
        terms = sid_generator_loss_vp(
            y,
            fixture.net("eps_true"),
            fixture.net("eps_fake"),
            fixture.input("ddpm.t_gen"),
            fixture.input("ddpm.eps_gen"),
            fixture.input("sched.alphas_cumprod"),
            fixture.guidance(kappa),
            alpha=alpha,
        )
        per_kappa = case.rsplit("_a", 1)[0]
        keys = (f"{per_kappa}.y_real", f"{per_kappa}.y_fake", f"{per_kappa}.weight_factor")
        check_generator_case(fixture, case, "ddpm.y", y, terms, keys, "grad_y", generator, "eps_gen")
    fixture.report("ddpm.gen")


@golden
def test_golden_sid_ddpm_fake_score(fixture: Fixture) -> None:
    for case in fixture.cases(r"ddpm\.fake_k[\d.]+"):
        fake = trainable(fixture.net("eps_fake"))
        elements = score_matching_loss(
            fake,
            fixture.expected["ddpm.y"].to(DTYPE),
            fixture.input("ddpm.t_fake"),
            fixture.input("ddpm.eps_fake"),
            fixture.input("sched.alphas_cumprod"),
            fixture.guidance(scale_of(case, "k")),
            target="eps",
        )
        loss = reduce_loss(elements, "sum")
        loss.backward()
        fixture.check(f"{case}.loss_elem", elements)
        fixture.check(f"{case}.L", loss)
        fixture.check_grads(case, "eps_fake", fake)
    fixture.report("ddpm.fake")


# ---------------------------------------------------------------------------------------------------------------
# Golden: cid.* (srkit's reading of GenDR)
# ---------------------------------------------------------------------------------------------------------------


def gendr_generate(fixture: Fixture, generator: nn.Module) -> torch.Tensor:
    """GenDR's one-step update (Eq. 2 with §4.4's ᾱ = β̄ = 0.5): z_g = (z_l − 0.5·ε(z_l, t_s, c))/0.5."""
    z_l = fixture.input("cid.z_l")
    scale = fixture.constants["gendr_abar_bbar"]
    eps = guided_eps(generator, z_l, fixture.constants["gendr_t_s"], fixture.guidance(1.0))
    return x0_from_eps(z_l, eps, scale, scale)


@golden
def test_golden_sid_cid_generator(fixture: Fixture) -> None:
    for case in fixture.cases(r"cid\.gen_xi[\d.]+"):
        generator = trainable(fixture.net("eps_gen"))
        z_g = gendr_generate(fixture, generator)
        z_g.retain_grad()
        terms = cid_generator_loss(
            z_g,
            fixture.input("cid.z_h"),
            fixture.net("eps_real"),
            fixture.net("eps_fake"),
            fixture.input("ddpm.t_gen"),
            fixture.input("ddpm.eps_gen"),
            fixture.input("sched.alphas_cumprod"),
            fixture.guidance(fixture.constants["cid_kappa"]),
            xi=scale_of(case, "xi"),
        )
        keys = ("cid.gen.f_real", "cid.gen.f_fake", "cid.gen.omega_inv")
        check_generator_case(fixture, case, "cid.z_g", z_g, terms, keys, "grad_z_g", generator, "eps_gen")
    fixture.report("cid.gen")


@golden
def test_golden_sid_cid_score_networks(fixture: Fixture) -> None:
    """Eq. 7: ϕ learns z_h (cid.real), ψ learns the generator's z_g (cid.fake), both x0 MSE without guidance."""
    with torch.no_grad():
        z_g = gendr_generate(fixture, fixture.net("eps_gen"))
    acp = fixture.input("sched.alphas_cumprod")
    for case, prefix, clean, t, noise in [
        ("cid.real", "eps_real", fixture.input("cid.z_h"), "cid.t_real", "cid.eps_real"),
        ("cid.fake", "eps_fake", z_g, "ddpm.t_fake", "ddpm.eps_fake"),
    ]:
        network = trainable(fixture.net(prefix))
        elements = score_matching_loss(
            network, clean, fixture.input(t), fixture.input(noise), acp, fixture.guidance(1.0), target="x0"
        )
        loss = reduce_loss(elements, "sum")
        loss.backward()
        fixture.check(f"{case}.loss_elem", elements)
        fixture.check(f"{case}.L", loss)
        fixture.check_grads(case, prefix, network)
    fixture.report("cid.real")
    fixture.report("cid.fake")


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------------------------


def constant(value: float, shape: tuple[int, ...] = (2, 1, 2, 2)) -> torch.Tensor:
    return torch.full(shape, value, dtype=DTYPE)


def test_sid_loss_formula_by_hand() -> None:
    # gap = 3 − 1 = 2, r-term = 3 − 2 = 1, w = |2 − 3| = 1:  ℓ = 2·(1 − 1.2·2) = −2.8
    elements, weight = score_identity_loss(constant(3.0), constant(1.0), constant(2.0), alpha=1.2)
    torch.testing.assert_close(elements, constant(-2.8))
    torch.testing.assert_close(weight, torch.ones(2, dtype=DTYPE))
    # w divides: reference 5 → w = 2, r-term = −2:  ℓ = 2·(−2 − 2)/2 = −4
    elements, weight = score_identity_loss(constant(3.0), constant(1.0), constant(5.0), alpha=1.0)
    torch.testing.assert_close(elements, constant(-4.0))
    # w is floored: reference = x0_real → w = 1e-5
    _, weight = score_identity_loss(constant(3.0), constant(1.0), constant(3.0), alpha=1.0)
    torch.testing.assert_close(weight, torch.full((2,), 1e-5, dtype=DTYPE))


def test_reduce_loss_sum_over_batch_and_mean() -> None:
    elements = torch.arange(8, dtype=DTYPE).view(2, 1, 2, 2)  # Σ = 28
    assert reduce_loss(elements, "sum").item() == 14.0
    assert reduce_loss(elements, "mean").item() == 3.5
    with pytest.raises(ValueError):
        reduce_loss(elements, "max")


def zero_eps(z: torch.Tensor, t: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros_like(z)


def constant_eps(value: float):
    return lambda z, t, e: torch.full_like(z, value)


ACP = scaled_linear_alphas_cumprod().to(DTYPE)


def cid_by_hand(z_g_value: float, z_h_value: float, gap: float, xi: float, form: str = "paper"):
    """CiD with networks whose x0 estimates are known: ε_real = 0 gives f_real = z_t/a = z_g (noise 0), and a
    constant ε_fake = gap·a/b gives f_fake = z_g − gap. Returns the reduced loss and ∂L/∂z_g."""
    t = torch.tensor([500, 500])
    a, b = (v.item() for v in vp_coefficients(ACP, 500, ACP))
    z_g = constant(z_g_value).requires_grad_(True)
    terms = cid_generator_loss(
        z_g,
        constant(z_h_value),
        zero_eps,
        constant_eps(gap * a / b),
        t,
        constant(0.0),
        ACP,
        PromptGuidance(),
        xi=xi,
        form=form,
    )
    loss = reduce_loss(terms.elements, "sum")
    loss.backward()
    return terms, loss, z_g.grad


def test_cid_sr_term_by_hand() -> None:
    # f_real = 2, f_fake = 1.5, z_h = 1: ω⁻¹ = |1 − 2| = 1;  ℓ = 0.5·((2 − 1) − 1·0.5) = 0.25
    terms, loss, grad = cid_by_hand(z_g_value=2.0, z_h_value=1.0, gap=0.5, xi=1.0)
    torch.testing.assert_close(terms.elements, constant(0.25))
    torch.testing.assert_close(terms.weight_factor, torch.ones(2, dtype=DTYPE))
    assert math.isclose(loss.item(), 0.25 * 4, rel_tol=1e-9)  # Σ over 4 elements per sample, /B
    # ∂ℓ/∂z_g: the gap is constant, f_real − z_h moves with z_g through the real network: gap·ω = 0.5 per element,
    # /B = 0.25 after the reduction. (SiD's f_real − z_g would not move: its gradient here would be 0.)
    torch.testing.assert_close(grad, constant(0.25))
    # ω from z_h, not z_g: z_h = 0 → ω⁻¹ = 2;  ℓ = 0.5·(2 − 1.2·0.5)/2 = 0.35
    terms, _, grad = cid_by_hand(z_g_value=2.0, z_h_value=0.0, gap=0.5, xi=1.2)
    torch.testing.assert_close(terms.elements, constant(0.35))
    torch.testing.assert_close(terms.weight_factor, torch.full((2,), 2.0, dtype=DTYPE))
    torch.testing.assert_close(grad, constant(0.5 / 2 / 2))


def test_cid_forms_and_regression_term_by_hand() -> None:
    """Where z_h enters (srkit.train.distill.cid.CiDForm), with f_real = z_g = 2, f_fake = 1.5, z_h = 0, ξ = 1."""
    # "hr-weight" (the recipe's default): SiD's inner product, f_real − z_g = 0, ω⁻¹ = |0 − 2| = 2:
    # ℓ = 0.5·(0 − 0.5)/2 = −0.125; the direct term −gap·ω and the real network's Jacobian +gap·ω cancel.
    terms, _, grad = cid_by_hand(z_g_value=2.0, z_h_value=0.0, gap=0.5, xi=1.0, form="hr-weight")
    torch.testing.assert_close(terms.elements, constant(-0.125))
    torch.testing.assert_close(terms.weight_factor, torch.full((2,), 2.0, dtype=DTYPE))
    torch.testing.assert_close(grad, constant(0.0))
    # "paper": ℓ = 0.5·((2 − 0) − 0.5)/2 = 0.375, gradient gap·ω/B = 0.125 (through the real network only).
    terms, _, grad = cid_by_hand(z_g_value=2.0, z_h_value=0.0, gap=0.5, xi=1.0, form="paper")
    torch.testing.assert_close(terms.elements, constant(0.375))
    torch.testing.assert_close(grad, constant(0.125))
    # "sid": ω from z_g, |2 − 2| = 0, floored at 1e-5: ℓ = 0.5·(0 − 0.5)/1e-5.
    terms, _, _ = cid_by_hand(z_g_value=2.0, z_h_value=0.0, gap=0.5, xi=1.0, form="sid")
    torch.testing.assert_close(terms.elements, constant(-25_000.0))
    with pytest.raises(ValueError, match="unknown CiD form"):
        cid_by_hand(z_g_value=2.0, z_h_value=0.0, gap=0.5, xi=1.0, form="zh")
    # Eq. 6: (z_g − z_h)², gradient 2·(z_g − z_h), none into z_h.
    z_g, z_h = constant(3.0).requires_grad_(True), constant(1.0).requires_grad_(True)
    elements = regression_loss(z_g, z_h)
    torch.testing.assert_close(elements, constant(4.0))
    elements.sum().backward()
    torch.testing.assert_close(z_g.grad, constant(4.0))
    assert z_h.grad is None


def test_cid_gradient_vanishes_with_detached_network_inputs() -> None:
    """The notes' warning: with z_h constant, all of CiD's gradient goes through the networks' inputs."""
    z_g = torch.randn(2, 1, 4, 4, dtype=DTYPE, requires_grad=True)
    net = nn.Conv2d(1, 1, 3, padding=1).to(DTYPE).requires_grad_(False)
    model = lambda z, t, e: net(z)
    args = (torch.randn_like(z_g), model, zero_eps, torch.tensor([100, 900]), torch.randn_like(z_g), ACP)
    terms = cid_generator_loss(z_g, *args, PromptGuidance())
    (full,) = torch.autograd.grad(terms.elements.sum(), z_g)
    terms_detached = cid_generator_loss(z_g.detach(), *args, PromptGuidance())
    assert not terms_detached.elements.requires_grad
    assert full.abs().max() > 0


def test_sid_direct_term_without_network_gradient() -> None:
    """SiD with networks that ignore their input: only the direct part −(y_real − y_fake)/w remains."""
    y = constant(0.0).requires_grad_(True)
    terms = sid_generator_loss_edm(
        y,
        lambda x, s: torch.full_like(x, 1.0),
        lambda x, s: torch.full_like(x, 0.5),
        torch.ones(2),
        constant(0.0),
    )
    reduce_loss(terms.elements, "sum").backward()
    # w = |0 − 1| = 1, ∂ℓ/∂y = −(1 − 0.5) per element, /B = 2
    torch.testing.assert_close(y.grad, constant(-0.25))


def test_guidance_combines_unconditional_and_conditional_by_hand() -> None:
    def embedding_mean(z, t, e):
        return e.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand_as(z)

    z = constant(0.0)
    guidance = PromptGuidance(
        cond=torch.ones(3, 2, dtype=DTYPE), uncond=torch.zeros(3, 2, dtype=DTYPE), scale=2.0
    )
    torch.testing.assert_close(guided_eps(embedding_mean, z, 10, guidance), constant(2.0))  # 0 + 2·(1 − 0)
    torch.testing.assert_close(guided_eps(embedding_mean, z, 10, guidance.with_scale(1.0)), constant(1.0))
    with pytest.raises(ValueError):
        guided_eps(embedding_mean, z, 10, PromptGuidance(cond=torch.ones(3, 2), scale=2.0))


def test_prompt_dropout_replaces_the_prompt_by_the_empty_one() -> None:
    guidance = PromptGuidance(cond=torch.ones(3, 2), uncond=torch.zeros(3, 2))
    assert drop_prompts(guidance, 4, 0.0) is guidance
    all_dropped = drop_prompts(guidance, 4, 1.0)
    assert all_dropped.cond.shape == (4, 3, 2) and all_dropped.cond.abs().sum() == 0
    some = drop_prompts(guidance, 1000, 0.1, torch.Generator().manual_seed(0)).cond[:, 0, 0]
    assert 0.05 < (some == 0).float().mean().item() < 0.15


def test_score_matching_targets_by_hand() -> None:
    """With ε̂ = 0: the ε loss is ε², the x0 loss is ((z_t/a) − z)² = (b/a·ε)²."""
    clean, noise, t = constant(1.0), constant(2.0), torch.tensor([250, 250])
    a, b = (v.item() for v in vp_coefficients(ACP, 250, ACP))
    eps_loss = score_matching_loss(zero_eps, clean, t, noise, ACP, PromptGuidance(), target="eps")
    x0_loss = score_matching_loss(zero_eps, clean, t, noise, ACP, PromptGuidance(), target="x0")
    torch.testing.assert_close(eps_loss, constant(4.0))
    torch.testing.assert_close(x0_loss, constant((2 * b / a) ** 2))


def test_vp_coefficients_match_the_notes_table_and_the_engine_schedule() -> None:
    from srkit.diffusion.schedule import NoiseSchedule

    acp = scaled_linear_alphas_cumprod()
    a, b = vp_coefficients(acp, torch.tensor([500, 354]), torch.zeros(2, 1))
    torch.testing.assert_close(a.flatten(), torch.tensor([0.5257, 0.7070]), atol=1e-4, rtol=0)
    torch.testing.assert_close((b / a).flatten(), torch.tensor([1.618, 1.000]), atol=1e-3, rtol=0)
    schedule = NoiseSchedule(alphas_cumprod=acp)
    z, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([20, 979])
    a, b = vp_coefficients(acp, t, z)
    noisy = a * z + b * eps
    torch.testing.assert_close(noisy, schedule.add_noise(z, eps, t))
    torch.testing.assert_close(x0_from_eps(noisy, eps, a, b), schedule.predict_x0(noisy, eps, t))


def test_edm_sigma_range_and_weight_by_hand() -> None:
    sigma = sid_generator_sigma(torch.tensor([0.0, 1.0], dtype=DTYPE))
    torch.testing.assert_close(sigma[0], torch.tensor(0.002, dtype=DTYPE))
    assert math.isclose(sigma[1].item(), 24.41, rel_tol=1e-3)
    # λ(0.5) = (0.25 + 0.25)/(0.5·0.5)² = 8
    assert edm_loss_weight(torch.tensor(0.5)).item() == pytest.approx(8.0)


def test_adversarial_losses_by_hand() -> None:
    logit = torch.full((2, 1, 2, 2), math.log(3.0), requires_grad=True)  # D = σ(ln 3) = 0.75
    generator = generator_adversarial_loss(logit)
    torch.testing.assert_close(generator, torch.full_like(logit, -math.log(0.75)))
    generator.sum().backward()
    torch.testing.assert_close(logit.grad, torch.full_like(logit, -0.25))  # −(1 − D)
    real, fake = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2, requires_grad=True)
    torch.testing.assert_close(discriminator_loss(real, fake), torch.full_like(real, 2 * math.log(2.0)))
    confident = discriminator_loss(
        torch.full_like(real, math.log(3.0)), torch.full_like(real, -math.log(3.0))
    )
    torch.testing.assert_close(confident, torch.full_like(real, -2 * math.log(0.75)))
    # The head learns from both maps: ∂/∂D_fake = σ(D_fake) = 0.5 at 0, ∂/∂D_real = −(1 − σ(D_real)) = −0.5.
    real.requires_grad_(True)
    discriminator_loss(real, fake).sum().backward()
    torch.testing.assert_close(fake.grad, torch.full_like(real, 0.5))
    torch.testing.assert_close(real.grad, torch.full_like(real, -0.5))


def test_repa_alignment_by_hand() -> None:
    target = torch.tensor([[[1.0, 1.0], [0.0, 3.0], [2.0, 0.0]]])
    projected = torch.tensor([[[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    torch.testing.assert_close(
        repa_alignment_loss(projected, target), torch.tensor([[-1 / math.sqrt(2), 0.0, 1.0]])
    )
    with pytest.raises(ValueError):
        repa_alignment_loss(projected, target[:, :2])
    feature_map = torch.arange(8.0).view(1, 2, 2, 2)  # channels (0..3), (4..7)
    torch.testing.assert_close(feature_tokens(feature_map)[0, 1], torch.tensor([1.0, 5.0]))
    assert RepaProjector(320, 64, 768)(torch.zeros(2, 5, 320)).shape == (2, 5, 768)


def test_discriminator_head_maps_features_to_a_logit_map() -> None:
    head = DiscriminatorHead(in_channels=64, width=32, groups=8)
    assert head(torch.randn(2, 64, 8, 8)).shape == (2, 1, 8, 8)


def test_cida_total_by_hand() -> None:
    settings = CiDASettings()
    cid, adversarial, repa = (
        torch.ones(2, 4, 2, 2),
        torch.full((2, 1, 3, 3), math.log(2.0)),
        torch.full((2, 9), -0.5),
    )
    early = cida_generator_loss(cid, adversarial, repa, settings, step=0)
    assert early.total.item() == pytest.approx(10 * 1 + 0.01 * math.log(2.0) + 0.1 * -0.5)
    late = cida_generator_loss(cid, adversarial, repa, settings, step=settings.lambda_cid_steps)
    assert late.total.item() == pytest.approx(1 + 0.01 * math.log(2.0) - 0.05)
    only_cid = cida_generator_loss(cid, None, None, settings, step=0)
    assert only_cid.total.item() == pytest.approx(10.0) and only_cid.adversarial is None


# ---------------------------------------------------------------------------------------------------------------
# Learning: a 2-D toy distillation
# ---------------------------------------------------------------------------------------------------------------


def test_sid_toy_distillation_learns() -> None:
    """A one-step student distilled with the SiD generator loss and the fake-score loss alternating moves from the
    teacher's blurred one-step guess to (nearly) the teacher's multi-step sample quality."""
    from srkit.train.distill.toy import ToySettings, run_toy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs: one thread is faster, and far faster on a busy machine
    try:
        result = run_toy(ToySettings(teacher_steps=1000, distill_steps=300))
    finally:
        torch.set_num_threads(threads)
    print(
        f"\ntoy: before {result.distance_before:.3f}, after {result.distance_after:.3f}, "
        f"teacher {result.teacher_distance:.3f}, {result.seconds:.1f} s"
    )
    assert result.distance_after < 0.3 * result.distance_before
    assert result.distance_after < 1.8 * result.teacher_distance


def run_restore_toy(**overrides):
    """GenDR's restoration in miniature (srkit/train/distill/toy.py, task "restore"), on one thread."""
    from srkit.train.distill.toy import ToySettings, run_toy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_toy(ToySettings(**{"task": "restore", "loss": "cid", "teacher_steps": 1000, "distill_steps": 300, **overrides}))
    finally:
        torch.set_num_threads(threads)


def test_cid_toy_distillation_with_the_recipe_default_learns() -> None:
    """`srkit distill`'s default CiD (z_h in ω only, plus 0.1·‖z_g − z_h‖²), with the trainer's simultaneous
    updates: the restored points move toward the data (sliced W1) and each toward its own HR point.  600 steps: at
    300 the falls are real on every seed but near the thresholds (seeds 0–7: W1 −19…−40 %, paired RMS −0.019…−0.066);
    at 600, W1 −27…−43 % and below the teacher's on all eight, paired RMS −0.030…−0.068 (seed 2: −0.0299, a hair
    short of the 0.03 asked here; the test's seed 0: −0.051)."""
    from srkit.train.recipes.cid import CiDRecipeSettings

    defaults = CiDRecipeSettings()
    result = run_restore_toy(
        cid_form=defaults.form, regression=defaults.lambda_mse, simultaneous=True, distill_steps=600
    )
    print(
        f"\ntoy restore: W1 {result.distance_before:.3f} -> {result.distance_after:.3f} "
        f"(teacher {result.teacher_distance:.3f}), paired RMS {result.paired_error_before:.3f} -> "
        f"{result.paired_error_after:.3f}, {result.seconds:.1f} s"
    )
    assert result.distance_after < 0.8 * result.distance_before
    assert result.distance_after < 1.2 * result.teacher_distance
    assert result.paired_error_after < result.paired_error_before - 0.03


def test_cid_toy_distillation_as_the_paper_writes_it_diverges() -> None:
    """The evidence behind the default: with z_h in the inner product (Eq. 8) SiD's direct gradient is gone and the
    student runs away from the data (the golden-pinned loss is right as maths; it does not learn as a loss)."""
    result = run_restore_toy(cid_form="paper", distill_steps=200)
    print(f"\ntoy restore, paper form: W1 {result.distance_before:.3f} -> {result.distance_after:.3f}")
    assert result.distance_after > 3 * result.distance_before
