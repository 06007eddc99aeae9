"""Throughput of the Real-ESRGAN degradation pipeline: LR/HR pairs per second at 512×512 HR.

Two numbers, each the median of several runs over the same samples (same seeds, so every run does the same
work):
1. pipeline: `DegradationPipeline` on HR tensors already in memory (parameter draws, sharpening, both stages,
   JPEG round trips) - what a training data loader pays per sample;
2. pairs: `write_pairs` on a folder of PNGs (adds PNG decode of the HR and encode of HR and LR) - what
   `srkit degrade` pays per file.

Run:  .venv/bin/python benchmarks/bench_degrade.py [--size 512] [--pairs 8] [--runs 3] [--batch 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srkit.degrade.pairs import write_pairs
from srkit.degrade.pipeline import DegradationPipeline


def test_picture(size: int, seed: int) -> np.ndarray:
    """Float32 size×size×3: smooth gradients plus fine texture, so JPEG and the noise models see real detail."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, 0.5 + 0.3 * np.sin(20 * x + 13 * y)], axis=2)
    return np.clip(base + 0.05 * rng.standard_normal((size, size, 3)), 0, 1).astype(np.float32)


def time_runs(work, runs: int) -> list[float]:
    work()  # warm-up: kernel caches, OpenCV and torch thread pools
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="HR side in pixels")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="batch size for the in-memory pipeline")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = DegradationPipeline(scale=args.scale)
    pictures = [test_picture(args.size, i) for i in range(args.pairs)]
    hr = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in pictures]).to(args.device)

    def in_memory() -> None:
        for start in range(0, args.pairs, args.batch):
            pipeline(hr[start : start + args.batch], seed=0, indices=range(start, min(start + args.batch, args.pairs)))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hr"
        folder.mkdir()
        for i, picture in enumerate(pictures):
            Image.fromarray((picture * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
        pipeline_times = time_runs(in_memory, args.runs)
        pair_times = time_runs(lambda: write_pairs(folder, Path(tmp) / "out", pipeline, 0, device=args.device),
                               args.runs)

    result = {
        "hr_size": args.size, "scale": args.scale, "pairs_per_run": args.pairs, "runs": args.runs,
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "pipeline_pairs_per_s": round(args.pairs / statistics.median(pipeline_times), 2),
        "files_pairs_per_s": round(args.pairs / statistics.median(pair_times), 2),
        "pipeline_run_s": [round(t, 3) for t in pipeline_times],
        "files_run_s": [round(t, 3) for t in pair_times],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
