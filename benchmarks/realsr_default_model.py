"""Does the embedded default (Real-ESRGAN x4plus rebuilt from the wheel's fp16 ncnn copy) match the published model?

Upscales the RealSR test crops (LR 128² -> 512²) with srkit, then scores them against the HR crops with PSNR and SSIM
on the Y channel of YCbCr (BT.601, no border crop, mean over images: the protocol of the diffusion-SR papers) and
compares with Real-ESRGAN's row in the S3Diff paper's RealSR table (25.65 dB / 0.7603). Tolerance: 0.10 dB, 0.003.

Run:  .venv/bin/python benchmarks/realsr_default_model.py [--root ../shared/data/realsr] [--sr-dir DIR]
      (about 8 minutes on 2 CPU cores for the 100 images; --sr-dir rescores existing outputs)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from srkit.api import load_engine, upscale_paths
from srkit.bench.metrics import psnr_y, ssim_y

PAPER = {"psnr": 25.65, "ssim": 0.7603}
TOLERANCE = {"psnr": 0.10, "ssim": 0.003}
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "realsr"


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with test_LR/ and test_HR/")
    parser.add_argument("--model", default="realesrgan-x4plus")
    parser.add_argument("--sr-dir", type=Path, help="score these outputs instead of running the model")
    args = parser.parse_args()
    lr_dir, hr_dir = args.root / "test_LR", args.root / "test_HR"
    if not lr_dir.is_dir() or not hr_dir.is_dir():
        print(f"no RealSR crops under {args.root}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        sr_dir = args.sr_dir
        if sr_dir is None:
            sr_dir = Path(tmp)
            started = time.perf_counter()
            report = upscale_paths([lr_dir], sr_dir, upscaler=load_engine(args.model, log=lambda m: None))
            assert report.ok, report.to_json()
            print(f"upscaled {len(report.results)} images in {time.perf_counter() - started:.0f} s")
        names = sorted(p.name for p in hr_dir.glob("*.png"))
        scores = [(psnr_y(read(sr_dir / n), read(hr_dir / n)), ssim_y(read(sr_dir / n), read(hr_dir / n))) for n in names]
    psnr, ssim = (float(np.mean(column)) for column in zip(*scores))
    print(f"\n| {args.model} on RealSR ({len(names)} images) | PSNR-Y dB | SSIM-Y |\n|---|---|---|")
    print(f"| srkit | {psnr:.4f} | {ssim:.4f} |")
    print(f"| published weights (S3Diff paper table) | {PAPER['psnr']:.2f} | {PAPER['ssim']:.4f} |")
    print(f"| difference | {psnr - PAPER['psnr']:+.4f} | {ssim - PAPER['ssim']:+.4f} |")
    within = abs(psnr - PAPER["psnr"]) <= TOLERANCE["psnr"] and abs(ssim - PAPER["ssim"]) <= TOLERANCE["ssim"]
    print("within tolerance" if within else "OUTSIDE tolerance")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
