"""The built-in registry is the top-level `weights.toml`, one copy in the tree; the sdist carries it and a
wheel built from that sdist ships it inside the package: an installed wheel lists the source's entries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import tomllib

from srkit import registry

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "weights.toml", "srkit")


def test_the_built_in_registry_is_the_one_top_level_file():
    assert registry.REGISTRY_FILE == REPO / "weights.toml"
    assert not (REPO / "srkit" / "weights.toml").exists()


def _build(hook: str, source: Path, out: Path) -> Path:
    """setuptools' PEP 517 hook, as `pip wheel --no-build-isolation` / `python -m build` call it (no network)."""
    code = f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=source, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_an_installed_wheel_lists_the_same_entries_as_the_source_tree(tmp_path):
    tree = tmp_path / "tree"
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(source, tree / name)
    sdist = _build("build_sdist", tree, tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    [unpacked] = (tmp_path / "unpacked").iterdir()
    assert (unpacked / "weights.toml").read_bytes() == (REPO / "weights.toml").read_bytes()
    wheel = _build("build_wheel", unpacked, tmp_path / "dist")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    assert (site / "srkit" / "weights.toml").read_bytes() == (REPO / "weights.toml").read_bytes()

    # The installed package reads its own copy (not this tree's) and finds every built-in entry.
    env = {k: v for k, v in os.environ.items() if k != "SRKIT_REGISTRY"}
    env |= {"PYTHONPATH": str(site), "SRKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    code = ("import json, srkit.registry as r; "
            "print(json.dumps([r.__file__, str(r.REGISTRY_FILE), sorted(r.load_registry().entries)]))")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module, registry_file, names = json.loads(done.stdout)
    assert Path(module).is_relative_to(site) and Path(registry_file) == site / "srkit" / "weights.toml"
    assert names == sorted(tomllib.loads((REPO / "weights.toml").read_text()))
