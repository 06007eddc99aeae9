"""Load the official ConsisSR checkpoint (`ConsisSR.ckpt`, a PyTorch-Lightning dict) into `ConsisSRNets`.

Official code (Gujojo/ConsisSR `inference.py`): `ControlLDM` built from `configs/model/cldm.yaml`, then
`load_state_dict(torch.load(ckpt)["state_dict"], strict=True)` (a leading "module." is dropped).  The state
dict holds, by prefix:

    model.diffusion_model.         UNet, ldm names + HPA extras   → unet.        (UNet2DConditionModel)
    control_model.                 ControlNet                     → controlnet.  (srkit LatentControlNet)
    first_stage_model.             SD VAE                         → vae.         (AutoencoderKL)
    cond_encoder.                  VAE encoder + quant_conv copy  → hint_encoder.
    cond_stage_model.model.        OpenCLIP, both towers          → prompt.clip. (open_clip names)
    cond_stage_model.ft_layers_4.  image-token MLP                → prompt.image_proj.
    betas, alphas_cumprod, …, logvar: ldm schedule buffers, recognised, not loaded (`SCHEDULE_BUFFERS`).

Inside the HPA blocks everything keeps its name (position_emb, attnT, normT, to_k_ip, to_v_ip) except the
`nn.Sequential(Linear, Dropout)` wrappers: `attn2.to_out_ip.0` → `attn2.to_out_ip`, `attnT.to_out.0` →
`attnT.to_out`.  srkit reads the file with `weights_only=True` (never unpickling code), loads strictly both
ways and names the first offending keys in one line (WeightsError).  The networks are built on the meta
device and take the checkpoint's tensors (no second copy of the weights).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from srkit.common import atomic_path
from srkit.convert.ldm import (
    KeyMap,
    Rename,
    UNetLayout,
    controlnet_renames,
    fit_shape,
    ldm_shape,
    scoped,
    unet_renames,
    vae_encoder_renames,
    vae_renames,
)
from srkit.nn.consissr import ConsisSRArchitecture, ConsisSRNets, ConsisSRSchedule
from srkit.registry import WeightsError

SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
"""ldm LatentDiffusion buffers derived from the schedule; `ConsisSRSchedule` gives what a sampler needs."""

_HPA_WRAPPED = re.compile(r"\.(attn2\.to_out_ip|attnT\.to_out)\.0\.")
_HPA_UNWRAPPED = re.compile(r"\.(attn2\.to_out_ip|attnT\.to_out)\.(weight|bias)$")
SHOWN_KEYS = 3
DDP_PREFIX = "module."


def key_map(architecture: ConsisSRArchitecture) -> KeyMap:
    """Checkpoint names ↔ `ConsisSRNets` names, but for the HPA wrappers (`native_key`, `checkpoint_key`)."""
    layout = UNetLayout(
        architecture.num_res_blocks,
        tuple(2**level in architecture.attention_resolutions for level in range(architecture.levels)),
    )
    vae_levels = len(architecture.vae_channel_mult)
    hint_convs = len(architecture.hint_block_channels) * 2
    return KeyMap(
        scoped(("model.diffusion_model.", "unet."), unet_renames(layout))
        + scoped(("control_model.", "controlnet."), controlnet_renames(layout, hint_convs, "hint_embedding"))
        + scoped(("first_stage_model.", "vae."), vae_renames(vae_levels, architecture.vae_res_blocks))
        + scoped(
            ("cond_encoder.", "hint_encoder."), vae_encoder_renames(vae_levels, architecture.vae_res_blocks)
        )
        + [
            Rename("cond_stage_model.model.", "prompt.clip."),
            Rename("cond_stage_model.ft_layers_4.", "prompt.image_proj."),
        ]
    )


def native_key(keys: KeyMap, key: str) -> str | None:
    """The `ConsisSRNets` name of a checkpoint key, or None when it is not a ConsisSR parameter name."""
    native = keys.to_native(key)
    return None if native is None else _HPA_WRAPPED.sub(r".\1.", native)


def checkpoint_key(keys: KeyMap, native: str) -> str:
    """The checkpoint name a native parameter is read from (for messages)."""
    return keys.to_ldm(_HPA_UNWRAPPED.sub(r".\1.0.\2", native)) or native


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint (or a bare state dict), read without unpickling code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint (damaged?)") from None
        raise WeightsError(
            f"{path} holds Python objects besides tensors (e.g. Lightning callback states) and srkit loads "
            "weights only; if you trust the file, keep just its weights: python -c \"import torch; "
            f"torch.save({{'state_dict': torch.load('{path}', weights_only=False)['state_dict']}}, "
            "'ConsisSR-weights.ckpt')\""
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        raise WeightsError(f"cannot read ConsisSR checkpoint {path}: {str(error).splitlines()[0]}") from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a ConsisSR checkpoint (no state_dict of tensors)")
    if state and all(key.startswith(DDP_PREFIX) for key in state):
        return {key.removeprefix(DDP_PREFIX): tensor for key, tensor in state.items()}
    return dict(state)


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def _own_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 tensor with storage of its own: a checkpoint may hold views into shared (even overlapping)
    buffers, as the golden fixture does; the real checkpoint's tensors are taken as they are."""
    tensor = tensor.to(torch.float32)
    owns = (
        tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    )
    return tensor if owns else tensor.clone(memory_format=torch.contiguous_format)


def native_state_dict(
    state: Mapping[str, torch.Tensor], nets: ConsisSRNets, source: str | Path
) -> dict[str, torch.Tensor]:
    """The checkpoint under the names and shapes of `nets`; WeightsError unless the two match key for key."""
    keys = key_map(nets.architecture)
    expected = {name: tensor.shape for name, tensor in nets.state_dict().items()}
    native: dict[str, str] = {}
    unexpected = []
    for key in state:
        if key in SCHEDULE_BUFFERS:
            continue
        name = native_key(keys, key)
        if name in expected:
            native[name] = key
        else:
            unexpected.append(key)
    missing = [checkpoint_key(keys, name) for name in expected if name not in native]
    if missing or unexpected:
        problems = [f"{len(missing)} missing key(s): {_first(missing)}"] if missing else []
        problems += [f"{len(unexpected)} unexpected key(s): {_first(unexpected)}"] if unexpected else []
        raise WeightsError(f"{source} does not fit the ConsisSR architecture: {'; '.join(problems)}")
    fitted = {name: fit_shape(state[key], expected[name]) for name, key in native.items()}
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(expected[name])}"
        for name, key in native.items()
        if fitted[name] is None
    ]
    if mismatched:
        raise WeightsError(f"{source} does not fit the ConsisSR architecture: shape of {_first(mismatched)}")
    return {name: _own_float32(tensor) for name, tensor in fitted.items()}


def load_consissr(
    path: str | Path,
    architecture: ConsisSRArchitecture | None = None,
    schedule: ConsisSRSchedule | None = None,
) -> ConsisSRNets:
    """The official ConsisSR checkpoint as `ConsisSRNets` in float32 on the CPU, eval mode, no gradients."""
    path = Path(path)
    state = read_state_dict(path)
    with torch.device("meta"):
        nets = ConsisSRNets(architecture, schedule)
    nets.load_state_dict(native_state_dict(state, nets, path), strict=True, assign=True)
    nets.prompt.restore_causal_mask()
    left = [name for name, tensor in [*nets.named_parameters(), *nets.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"ConsisSR networks left unmaterialised after loading: {_first(left)}")
    return nets.eval().requires_grad_(False)


def architecture_from_ldm_config(
    config: Mapping, clip_config: Mapping
) -> tuple[ConsisSRArchitecture, ConsisSRSchedule]:
    """Architecture and schedule from the official model yaml (`configs/model/cldm.yaml` layout, parsed)
    and an OpenCLIP model config (the yaml names it by `arch`; ViT-H-14 when absent)."""
    params = config["params"]
    unet = params["unet_config"]["params"]
    control = params["control_stage_config"]["params"]
    vae = params["first_stage_config"]["params"]["ddconfig"]
    shared = (
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_resolutions",
        "num_head_channels",
        "context_dim",
        "in_channels",
    )
    differing = [name for name in shared if control[name] != unet[name]]
    if differing or control["hint_channels"] != unet["in_channels"]:
        raise ValueError(f"the ControlNet must mirror the UNet (differs in {differing or ['hint_channels']})")
    architecture = ConsisSRArchitecture(
        model_channels=unet["model_channels"],
        channel_mult=tuple(unet["channel_mult"]),
        num_res_blocks=unet["num_res_blocks"],
        attention_resolutions=tuple(unet["attention_resolutions"]),
        num_head_channels=unet["num_head_channels"],
        context_dim=unet["context_dim"],
        latent_channels=unet["in_channels"],
        vae_channels=vae["ch"],
        vae_channel_mult=tuple(vae["ch_mult"]),
        vae_res_blocks=vae["num_res_blocks"],
        latent_size=int(params.get("image_size", ConsisSRArchitecture.latent_size)),
        clip=clip_config,
    )
    schedule = ConsisSRSchedule(
        beta_start=float(params["linear_start"]),
        beta_end=float(params["linear_end"]),
        num_train_timesteps=int(params["timesteps"]),
        scale_factor=float(params["scale_factor"]),
    )
    return architecture, schedule


VAE_ATTENTION_WEIGHT = re.compile(r"(first_stage_model|cond_encoder)\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
"""ldm keeps these as 1×1 conv weights (4-D); diffusers as Linear weights."""


def ldm_schedule_buffers(schedule: ConsisSRSchedule) -> dict[str, torch.Tensor]:
    """The schedule buffers ldm's `LatentDiffusion.register_schedule` stores (float64 maths, float32 values, no
    learned log-variance), so that an exported checkpoint loads strictly in the official code too."""
    betas = schedule.betas()
    alphas = 1 - betas
    cumprod = torch.cumprod(alphas, 0)
    previous = torch.cat([cumprod.new_ones(1), cumprod[:-1]])
    posterior = betas * (1 - previous) / (1 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / cumprod - 1).sqrt(),
        "posterior_variance": posterior,
        "posterior_log_variance_clipped": posterior.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1 - cumprod),
        "posterior_mean_coef2": (1 - previous) * alphas.sqrt() / (1 - cumprod),
        "logvar": torch.zeros_like(betas),
    }
    assert buffers.keys() == SCHEDULE_BUFFERS
    return {name: value.float() for name, value in buffers.items()}


def checkpoint_state_dict(nets: ConsisSRNets) -> dict[str, torch.Tensor]:
    """`nets` under the official checkpoint's names and shapes, with ldm's schedule buffers."""
    keys = key_map(nets.architecture)
    state = {}
    for name, tensor in nets.state_dict().items():
        key = checkpoint_key(keys, name)
        dims = 4 if VAE_ATTENTION_WEIGHT.search(key) else tensor.dim()
        state[key] = ldm_shape(tensor.detach().float().cpu().contiguous(), dims)
    return state | ldm_schedule_buffers(nets.schedule)


def save_consissr(nets: ConsisSRNets, path: str | Path) -> Path:
    """Write `nets` as an official-layout Lightning checkpoint (`{"state_dict": ...}`), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": checkpoint_state_dict(nets)}, tmp)
    return path


def ldm_model_config(architecture: ConsisSRArchitecture, schedule: ConsisSRSchedule) -> dict:
    """The official model yaml's sizes (configs/model/cldm.yaml layout) for these networks: what
    `architecture_from_ldm_config` reads, so a checkpoint of other sizes travels with its config."""
    network = {
        "in_channels": architecture.latent_channels,
        "model_channels": architecture.model_channels,
        "attention_resolutions": list(architecture.attention_resolutions),
        "num_res_blocks": architecture.num_res_blocks,
        "channel_mult": list(architecture.channel_mult),
        "num_head_channels": architecture.num_head_channels,
        "context_dim": architecture.context_dim,
    }
    ddconfig = {
        "ch": architecture.vae_channels,
        "ch_mult": list(architecture.vae_channel_mult),
        "num_res_blocks": architecture.vae_res_blocks,
        "z_channels": architecture.latent_channels,
    }
    return {
        "target": "model.cldm.ControlLDM",
        "params": {
            "linear_start": schedule.beta_start,
            "linear_end": schedule.beta_end,
            "timesteps": schedule.num_train_timesteps,
            "scale_factor": schedule.scale_factor,
            "image_size": architecture.latent_size,
            "unet_config": {"params": dict(network)},
            "control_stage_config": {"params": {**network, "hint_channels": architecture.latent_channels}},
            "first_stage_config": {"params": {"embed_dim": architecture.latent_channels, "ddconfig": ddconfig}},
        },
    }
