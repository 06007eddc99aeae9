"""Build hook: wheels carry the top-level `weights.toml` (the one built-in registry) as `srkit/weights.toml`.

The repository keeps a single copy at its root, beside pyproject.toml; `build_py` places it inside the package
in the build tree only, so no second copy lives in git and none can drift.  Editable installs skip the copy
and read the root file (srkit/registry.py looks beside the package, then one folder up).  sdists take it via
MANIFEST.in.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REGISTRY = "weights.toml"


class BuildPyWithRegistry(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            self.copy_file(REGISTRY, self._registry_target())

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), self._registry_target()]

    def _registry_target(self) -> str:
        return str(Path(self.build_lib) / "srkit" / REGISTRY)


setup(cmdclass={"build_py": BuildPyWithRegistry})
