"""What srkit's pipeline costs on top of the network, and how much memory a large tiled run takes.

1. Overhead: `srkit.upscale_paths` (read, EXIF/ICC, alpha/gray logic, tiling decision, atomic write) versus a bare
   loop over the same images with the same network (PIL read -> tensor -> forward -> PIL write). Model loading is
   included on both sides. Ratio = srkit / bare; the target is <= 1.10 untiled.
2. Memory: peak RSS of `srkit upscale` on a 2048x2048 input through the compact model, tiled and untiled, each in
   a fresh subprocess (ru_maxrss of the child), next to the size of the float32 output it must hold.

Run:  .venv/bin/python benchmarks/bench_overhead.py [--images DIR] [--count 10] [--models realesr-animevideov3,realesrgan-x4plus]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srkit import registry
from srkit.api import load_engine, upscale_paths
from srkit.engines.gan import load_state_dict

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "realsr" / "test_LR"


def sample_images(folder: Path | None, count: int, workdir: Path) -> list[Path]:
    if folder and folder.is_dir():
        return sorted(folder.glob("*.png"))[:count]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = workdir / f"gen_{i}.png"
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def bare_loop(model: str, images: list[Path], out_dir: Path) -> float:
    """The minimum any tool must do: load the checkpoint, then read, forward, write each image."""
    from spandrel import ModelLoader

    started = time.perf_counter()
    network = ModelLoader().load_from_state_dict(load_state_dict(registry.resolve(model))).model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for path in images:
            x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            y = network(x).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
            Image.fromarray(y).save(out_dir / path.name)
    return time.perf_counter() - started


def srkit_pipeline(model: str, images: list[Path], out_dir: Path) -> float:
    started = time.perf_counter()
    upscaler = load_engine(model, tile=None, log=lambda m: None)
    report = upscale_paths(images, out_dir, upscaler=upscaler, warn=lambda m: None)
    assert report.ok, report.to_json()
    return time.perf_counter() - started


def peak_rss_of(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `srkit` subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "srkit.cli", *args], check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss of children did not grow; run each measurement in a fresh process")
    return peak / 1024, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--models", default="realesr-animevideov3,realesrgan-x4plus")
    parser.add_argument("--big", type=int, default=2048, help="side of the memory test input")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = sample_images(args.images, args.count, work)
        print(f"\n## Overhead ({len(images)} images from {images[0].parent})\n")
        print("| model | bare loop s/img | srkit s/img | ratio (median of repeats) |\n|---|---|---|---|")
        for model in args.models.split(","):
            bare_loop(model, images[:1], work / "warm")  # first-touch costs (conversion, page cache) out of both
            bare_times, ours_times = [], []
            for repeat in range(args.repeats):  # interleaved, alternating order: CPU clock drift hits both
                runs = [("bare", bare_loop), ("srkit", srkit_pipeline)]
                for label, run in runs if repeat % 2 == 0 else runs[::-1]:
                    seconds = run(model, images, work / f"{label}_{model}")
                    (bare_times if label == "bare" else ours_times).append(seconds / len(images))
            bare, ours = statistics.median(bare_times), statistics.median(ours_times)
            ratio = statistics.median(o / b for o, b in zip(ours_times, bare_times))
            print(f"| {model} | {bare:.3f} | {ours:.3f} | {ratio:.3f} |")
        if args.skip_memory:
            return
        big = work / "big.png"
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 255, (args.big, args.big, 3), dtype=np.uint8)).save(big)
        output_mib = (args.big * 4) ** 2 * 3 * 4 / 2**20
        print(f"\n## Peak RSS, {args.big}² input -> {args.big * 4}² output (float32 output alone: {output_mib:.0f} MiB)\n")
        print("| run | peak RSS MiB | seconds |\n|---|---|---|")
        for label, tile in (("tiled 512", "512"), ("untiled", "0")):
            rss, seconds = peak_rss_of(
                ["upscale", str(big), "-o", str(work / f"big_{tile}.png"), "-m", "realesr-animevideov3",
                 "--tile", tile, "-q"]
            )
            print(f"| {label} | {rss:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
