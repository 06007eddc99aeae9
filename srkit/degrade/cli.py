"""`srkit degrade`: the Typer command that builds LR/HR pairs; registered on the main app by srkit/cli.py.

The synthesis (PyTorch) is imported when the command runs, after its options were checked: the command line
imports this module at start-up, and a typo should be refused in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from srkit.common import check_choice, resolve_device
from srkit.degrade.config import CROP_MODES, DegradationConfig

if TYPE_CHECKING:
    import torch

err = Console(stderr=True, soft_wrap=True)  # one message = one line, whatever the terminal width


def _fail(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(2)


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as exc:
        _fail(str(exc))


def degrade(
    hr_dir: Annotated[Path, typer.Argument(metavar="HR_DIR", help="Folder of HR images (not searched recursively).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder; pairs go to OUT/HR and OUT/LR.")],
    scale: Annotated[int, typer.Option("--scale", min=1, help="Downscale factor: LR = HR / scale.")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed; sample i of a run is seeded by (seed, i).")] = 0,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file overriding the Real-ESRGAN defaults.")] = None,
    crop: Annotated[int | None, typer.Option("--crop", min=1, help="Crop each HR to CROP×CROP first.")] = None,
    crop_mode: Annotated[str, typer.Option("--crop-mode", help="Where --crop cuts: center or random (seeded).")] = "center",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N (same seed, same LR up to rounding).")] = "auto",
) -> None:
    """Synthesise LR/HR pairs with the Real-ESRGAN second-order degradation (blur, resize, noise, JPEG, twice)."""
    if not hr_dir.is_dir():
        _fail(f"{hr_dir} is not a folder; give the folder of HR images")
    if hr_dir.resolve() in {(out / "HR").resolve(), (out / "LR").resolve()}:
        _fail(f"{out} would write into the input folder {hr_dir}; choose another --out")
    try:
        check_choice(crop_mode, CROP_MODES, "--crop-mode")
        settings = DegradationConfig.from_toml(config) if config is not None else DegradationConfig()
    except ValueError as exc:
        _fail(str(exc))
    from srkit.degrade.pairs import write_pairs
    from srkit.degrade.pipeline import DegradationPipeline

    counts = write_pairs(hr_dir, out, DegradationPipeline(settings, scale), seed, crop=crop, crop_mode=crop_mode,
                         device=_device(device),
                         warn=lambda message: err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False))
    if counts.written == 0 and counts.failed == 0:
        _fail(f"no images in {hr_dir}")
    failed = f", {counts.failed} files failed" if counts.failed else ""
    err.print(escape(f"wrote {counts.written} pairs to {out}{failed}"), highlight=False)
    if counts.failed:
        raise typer.Exit(1)
