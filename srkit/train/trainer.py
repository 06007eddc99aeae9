"""One training loop for every recipe: accelerate (CPU, one or many GPUs/nodes), accumulation, clipping, EMA,
checkpoints with resume, rich console logging and optional tensorboard.

A recipe (see `Recipe`) owns the networks and the maths; the trainer owns everything around it.  A recipe names its
optimiser groups (NAOSD: the generator and the VSD regulariser) and, for every batch, yields (group, loss, logs)
pairs in the order they must be stepped — the official scripts update the regulariser after the generator in the
same iteration, on the generator's detached output.  A recipe may also say `learning_rates()` ({group: lr}) for
groups whose rate differs from the run's `lr`.

Optional recipe features (general, read with getattr so simple recipes need none of them):
- `step_each_loss = True`: every yielded loss is stepped before the next one is computed, so a later loss sees the
  weights the earlier step produced (S3Diff: reconstruction step, then a second generator pass for the GAN step,
  then the discriminator's real and fake steps).  With accumulation, the k-th losses of the micro-batches are
  accumulated and stepped together before the (k+1)-th losses are computed.  Without it, all losses of an
  iteration are back-propagated first and every group is stepped once (groups are disjoint).
- `lr_factor(group, step) -> float`: a learning-rate schedule (and per-group rates), the AdamW rate of `group`
  being `config.lr · lr_factor(group, step)` at optimiser step `step` (0-based).
- `state_buffers() -> {name: tensor}`: tensors besides the trainable parameters that training changes in place
  (a discriminator's spectral-norm vectors); saved in checkpoints and restored on resume.

Gradients are averaged across processes explicitly (`accelerator.reduce`) rather than by wrapping the networks in
DDP: recipes keep frozen copies and several trainable modules, LoRA gradients are small, and the checkpoint layout
is then the same for one process and for many.

Checkpoint layout (`OUT/checkpoints/step_0000010/`): `trainable.safetensors` (every trainable tensor by name),
`ema.safetensors` (when EMA is on), `buffers.safetensors` (a recipe's `state_buffers`, when it has any),
`optim_<group>.pt` (optimiser states), `rank<i>.pt` (each process's RNG state), `state.json` (step, config).  `--resume` continues from the newest one with the same data order (the
sampler is seeded by the epoch) and, with the same process count, the same random draws: a resumed run ends
with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from srkit.common import atomic_folder
from srkit.cpu_memory import keep_freed_memory

CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    """What every recipe shares.  Defaults are GDPO-SR's / NAOSD's published optimisation settings."""

    out: Path
    steps: int = 10_000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    """no | fp16 | bf16 (CUDA); CPU runs stay fp32."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    ema_decay: float = 0.0
    """0 = no EMA; else the decay of an exponential moving average of the trainable weights, saved beside them."""
    seed: int = 123
    log_every: int = 10
    tensorboard: bool = False
    resume: bool = False


class Recipe(Protocol):
    """What the trainer needs from a recipe."""

    name: str

    def parameter_groups(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """group -> {unique name: trainable parameter}; one AdamW per group."""
        ...

    def losses(self, batch: dict[str, torch.Tensor], step: int) -> Iterator[tuple[str, torch.Tensor, dict[str, float]]]:
        """For one batch: (group, loss to minimise, numbers to log), in stepping order."""
        ...

    def export(self, folder: Path) -> Path:
        """Write the trained model in the format its engine loads; returns what to pass to `--weights`."""
        ...

    def to(self, device: torch.device) -> Recipe:
        """Move every network the recipe runs to `device`."""
        ...


class Trainer:
    def __init__(self, recipe: Recipe, dataset: torch.utils.data.Dataset, config: TrainConfig, device: str = "auto"):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cpu = device == "cpu" or not torch.cuda.is_available()
        if cpu:
            keep_freed_memory()
        self.accelerator = Accelerator(mixed_precision="no" if cpu else config.mixed_precision, cpu=cpu)
        set_seed(config.seed + self.accelerator.process_index)
        self.recipe, self.dataset, self.config = recipe, dataset, config
        self.console = Console(stderr=True, quiet=not self.accelerator.is_main_process)
        recipe.to(self.accelerator.device)
        self.groups = recipe.parameter_groups()
        rates = recipe.learning_rates() if hasattr(recipe, "learning_rates") else {}
        self.optimizers = {
            group: torch.optim.AdamW(params.values(), lr=rates.get(group, config.lr), weight_decay=config.weight_decay)
            for group, params in self.groups.items()
        }
        self.ema = (
            {name: p.detach().clone() for params in self.groups.values() for name, p in params.items()}
            if config.ema_decay > 0
            else None
        )
        self.step = 0
        self.writer = None
        if config.tensorboard and self.accelerator.is_main_process:
            # needs `pip install tensorboard` (srkit[train])
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(config.out) / "tensorboard"))

    # ------------------------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches, this process's share of a seeded shuffle per epoch; resumes at `self.step`."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.config.batch_size * world
        epoch_len = max(1, len(self.dataset) // per_step)
        start = self.step * self.config.grad_accum
        epoch, offset = divmod(start, epoch_len)
        while True:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed + epoch))
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            for position in range(offset, epoch_len):
                chosen = order[position * per_step : (position + 1) * per_step][rank::world]
                samples = [self.dataset[int(i)] for i in chosen]
                yield {k: torch.stack([s[k] for s in samples]).to(self.accelerator.device) for k in samples[0]}
            epoch, offset = epoch + 1, 0

    def train(self) -> Path:
        """Run to `config.steps`, checkpointing on the way; export the model; returns the export folder."""
        config = self.config
        if config.resume:
            self.load_latest()
        batches = self.batches()
        started, sums = time.perf_counter(), {}
        try:
            while self.step < config.steps:
                if getattr(self.recipe, "step_each_loss", False):
                    sums = self._iterate_stepping_each_loss(batches)
                else:
                    sums = self._iterate(batches)
                self.step += 1
                self._update_ema()
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self.log(sums, time.perf_counter() - started)
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save_checkpoint()
        finally:
            if self.writer is not None:  # its last events on disk now, also when a run stops early
                self.writer.close()
        self.accelerator.wait_for_everyone()
        exported = Path(config.out) / "export"
        if self.accelerator.is_main_process:
            if self.ema is not None:
                self._load_trainable(self.ema)
            result = self.recipe.export(exported)
            self.console.print(f"exported {result} (use it with `srkit upscale --weights {result}`)")
        self.accelerator.wait_for_everyone()
        return exported

    def _iterate(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimiser step: every loss of every micro-batch back-propagated, then each group stepped once."""
        sums: dict[str, float] = {}
        for _ in range(self.config.grad_accum):
            with self.accelerator.autocast():  # a no-op on the CPU and with mixed_precision "no"
                steps = list(self.recipe.losses(next(batches), self.step))
            for group, loss, logs in steps:
                self._backward(group, loss, logs, sums)
        for group in self.optimizers:  # groups are disjoint, so stepping them together equals in turn
            self._apply(group)
        return sums

    def _iterate_stepping_each_loss(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One iteration of a `step_each_loss` recipe: the micro-batches' k-th losses accumulated, then stepped,
        before any (k+1)-th loss is computed."""
        sums: dict[str, float] = {}
        runs = [self.recipe.losses(next(batches), self.step) for _ in range(self.config.grad_accum)]
        while True:
            with self.accelerator.autocast():
                pulled = [next(run, None) for run in runs]
            if all(item is None for item in pulled):
                return sums
            groups = {item[0] if item is not None else None for item in pulled}
            if len(groups) != 1:
                raise RuntimeError(f"recipe '{self.recipe.name}' yielded different losses for the micro-batches")
            for group, loss, logs in pulled:
                self._backward(group, loss, logs, sums)
            self._apply(groups.pop())

    def _backward(self, group: str, loss: torch.Tensor, logs: dict[str, float], sums: dict[str, float]) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{group} loss is {loss.item()} at step {self.step}")
        self.accelerator.backward(loss / self.config.grad_accum)
        for key, value in logs.items():
            sums[key] = sums.get(key, 0.0) + value / self.config.grad_accum

    def _apply(self, group: str) -> None:
        """Average the group's gradients over processes, clip, step (at the recipe's rate), clear."""
        lr_factor = getattr(self.recipe, "lr_factor", None)
        if lr_factor is not None:
            for settings in self.optimizers[group].param_groups:
                settings["lr"] = self.config.lr * lr_factor(group, self.step)
        params = list(self.groups[group].values())
        grads = [p for p in params if p.grad is not None]
        if self.accelerator.num_processes > 1:
            for p in grads:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if grads and self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(grads, self.config.max_grad_norm)
        self.optimizers[group].step()
        self.optimizers[group].zero_grad(set_to_none=True)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        for params in self.groups.values():
            for name, p in params.items():
                self.ema[name].lerp_(p.detach(), 1 - self.config.ema_decay)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for params in self.groups.values() for name, p in params.items()}

    @torch.no_grad()
    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        for params in self.groups.values():
            for name, p in params.items():
                if name not in state:
                    raise ValueError(f"checkpoint lacks the trainable tensor '{name}' (another recipe or options?)")
                p.copy_(state[name].to(p.device, p.dtype))

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self) -> Path:
        folder = Path(self.config.out) / CHECKPOINTS / f"step_{self.step:07d}"
        rng_folder = Path(self.config.out) / CHECKPOINTS / "rng"
        rng_folder.mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), rng_folder / f"step_{self.step:07d}_rank{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with atomic_folder(folder) as partial:
                self._write_checkpoint(partial, rng_folder)
            self._prune()
        self.accelerator.wait_for_everyone()
        return folder

    def _write_checkpoint(self, partial: Path, rng_folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.trainable_state(), str(partial / "trainable.safetensors"))
        if self.ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, str(partial / "ema.safetensors"))
        if buffers := self._state_buffers():
            save_file({k: v.detach().cpu().contiguous() for k, v in buffers.items()}, str(partial / "buffers.safetensors"))
        for group, optimizer in self.optimizers.items():
            torch.save(optimizer.state_dict(), partial / f"optim_{group}.pt")
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        state = {"step": self.step, "recipe": self.recipe.name, "config": config}
        (partial / "state.json").write_text(json.dumps(state, indent=2))
        for rng in rng_folder.glob(f"step_{self.step:07d}_rank*.pt"):
            shutil.move(rng, partial / rng.name.split("_", 2)[2])

    def _prune(self) -> None:
        keep = self.config.keep_checkpoints
        if keep > 0:
            for old in checkpoints(Path(self.config.out))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load_latest(self) -> None:
        """Continue from the newest checkpoint in OUT (none: start at step 0, said on the console)."""
        from safetensors.torch import load_file

        found = checkpoints(Path(self.config.out))
        if not found:
            self.console.print(f"no checkpoint in {Path(self.config.out) / CHECKPOINTS}; starting at step 0")
            return
        folder = found[-1]
        state = json.loads((folder / "state.json").read_text())
        if state["recipe"] != self.recipe.name:
            raise ValueError(f"{folder} was written by recipe '{state['recipe']}', not '{self.recipe.name}'")
        self._load_trainable(load_file(str(folder / "trainable.safetensors")))
        if buffers := self._state_buffers():
            stored = load_file(str(folder / "buffers.safetensors"))
            with torch.no_grad():
                for name, tensor in buffers.items():
                    tensor.copy_(stored[name].to(tensor.device, tensor.dtype))
        if self.ema is not None and (folder / "ema.safetensors").is_file():
            self.ema = {k: v.to(self.accelerator.device) for k, v in load_file(str(folder / "ema.safetensors")).items()}
        for group, optimizer in self.optimizers.items():
            optimizer.load_state_dict(torch.load(folder / f"optim_{group}.pt", map_location="cpu", weights_only=True))
        rng = folder / f"rank{self.accelerator.process_index}.pt"
        if rng.is_file():  # same process count: the run continues exactly as if never stopped
            _set_rng_state(torch.load(rng, weights_only=True))
        self.step = int(state["step"])
        self.console.print(f"resumed from {folder} at step {self.step}")

    def _state_buffers(self) -> dict[str, torch.Tensor]:
        state_buffers = getattr(self.recipe, "state_buffers", None)
        return state_buffers() if state_buffers is not None else {}

    def log(self, values: dict[str, float], elapsed: float) -> None:
        text = "  ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()))
        rate = self.step / elapsed if elapsed > 0 else math.inf
        self.console.print(f"step {self.step}/{self.config.steps}  {text}  ({rate:.2f} steps/s)", highlight=False)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, self.step)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name)


def _rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
