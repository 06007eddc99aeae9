"""The layering of the house: data flows cli -> api -> engines -> building blocks, never back.

Building blocks (srkit/diffusion/, srkit/nn/, srkit/taggers/, srkit/convert/ and the I/O, tiling and shared helper
modules) must not import engines, training, the api or the CLI — not even lazily inside a function — so that each
can be used and tested alone.  Engines never import the CLI or training; training never imports the CLI or the api.
Read from the source (every `import` statement anywhere in a module), so nothing needs importing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "srkit"
BUILDING_BLOCKS = ("diffusion", "nn", "taggers", "convert", "imageio.py", "tiling.py", "alpha.py", "colorfix.py",
                   "common.py", "registry.py", "toml_text.py", "cpu_memory.py", "cpu_features.py", "degrade",
                   "batch.py", "distributed.py", "checkpoints.py", "option_values.py", "report.py")  # fmt: skip
FORBIDDEN = {
    "building block": ("srkit.engines", "srkit.train", "srkit.api", "srkit.cli", "srkit.bench"),
    "engine": ("srkit.cli", "srkit.train", "srkit.api"),
    "training": ("srkit.cli", "srkit.api"),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_of(part: str) -> list[Path]:
    target = PACKAGE / part
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def layer_of(path: Path) -> str | None:
    relative = path.relative_to(PACKAGE).parts
    if relative[0] == "engines":
        return "engine"
    if relative[0] == "train":
        return "training"
    return "building block" if any(path in modules_of(part) for part in BUILDING_BLOCKS) else None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_downwards(path: Path) -> None:
    layer = layer_of(path)
    if layer is None:
        pytest.skip("api, cli and bench may import any layer below them")
    bad = sorted(
        name for name in imported_modules(path) for banned in FORBIDDEN[layer] if name == banned or name.startswith(banned + ".")
    )
    assert not bad, f"{path.relative_to(PACKAGE)} ({layer}) imports {bad}"


def test_every_building_block_exists() -> None:
    """The list above names real files and folders (a rename must not silently drop a check)."""
    assert all((PACKAGE / part).exists() for part in BUILDING_BLOCKS)
