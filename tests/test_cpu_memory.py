"""The CPU allocator setting: applied on Linux/glibc, idempotent, and switched off by the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from srkit.cpu_memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_applies_once_and_can_be_switched_off():
    assert keep_freed_memory() is True and keep_freed_memory() is True
    code = "from srkit.cpu_memory import keep_freed_memory as k; print(k())"
    env = {**os.environ, "SRKIT_KEEP_FREED_MEMORY": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert off.stdout.strip() == "False"
