"""What the engine benchmarks share: the command line's start, the CPU setting `srkit upscale` uses, and the facts
about the machine every report must carry (a speed-up measured on one CPU kind is a claim about that kind)."""

from __future__ import annotations

import argparse
import platform

import torch

from srkit.cpu_features import detect
from srkit.cpu_memory import keep_freed_memory


def start(doc: str) -> argparse.ArgumentParser:
    """A parser titled by the script's first docstring paragraph; keeps freed memory as srkit does on the CPU."""
    keep_freed_memory()
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def machine() -> dict:
    """Threads, PyTorch's CPU capability (AVX2, AVX512, ...), the processor and the CPU features srkit's choice of
    dtype and kernels follows (`srkit.cpu_features`), for the results."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "cpu": detect().summary(),
    }
