"""Where the golden fixtures live and how tests read them, once for every golden test module.

The root is `SRKIT_GOLDEN_DIR` (default: the workspace's `../shared/golden`), so the same tests check any fixture of
the same layout; a module whose fixture is absent skips with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(os.environ.get("SRKIT_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def fixture_dir(name: str) -> Path:
    return ROOT / name


def needs(folder: Path) -> pytest.MarkDecorator:
    """Skip (with the reason) when the fixture folder is absent, e.g. in a clone without the workspace."""
    return pytest.mark.skipif(not folder.is_dir(), reason=f"golden fixture {folder} is absent")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def json_fixture(path: Path):
    """A module-scoped pytest fixture returning the parsed JSON file (assign it to the fixture's name)."""
    return pytest.fixture(scope="module")(lambda: json.loads(path.read_text()))


def tensors_fixture(path: Path):
    """A module-scoped pytest fixture returning the safetensors file's tensors."""
    return pytest.fixture(scope="module")(lambda: read_tensors(path))
