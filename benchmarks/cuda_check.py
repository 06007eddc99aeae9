"""CUDA check of every diffusion engine on tiny random models (for a session that is lent a GPU machine).

For each engine of tests/tiny_models.py (or those named): build it on the GPU in fp32, bf16 and fp16 (the dtypes
its spec allows), with SDPA and, when the package is installed, xformers attention; upscale one 32² image with one
seed; report the max |difference| from the fp32/SDPA output and the time of a second call (the first compiles
kernels).  Exit code 1 when an output is not finite or a half-precision output moves by more than `--tolerance`
(the tiny random models amplify rounding much less than trained ones; 0.1 on [0, 1] is a loose sanity bound,
tighter numbers are in the printed table).  Minutes at most on one GPU.

Run (on the device machine):  python benchmarks/cuda_check.py [--engines consissr s3diff] [--json out.json]
A CPU dry run of the same code path (fp32 only):  python benchmarks/cuda_check.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import TINY_MODELS

from srkit.common import build_options
from srkit.engines.base import WeightsSet, get_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def variants(device: torch.device, cuda_dtypes: tuple[str, ...]) -> list[tuple[str, str]]:
    if device.type != "cuda":
        return [("fp32", "sdpa")]
    names = ["fp32"] + [n for n, d in DTYPES.items() if n != "fp32" and str(d).removeprefix("torch.") in cuda_dtypes]
    try:
        import xformers  # noqa: F401

        attentions = ["sdpa", "xformers"]
    except ImportError:
        attentions = ["sdpa"]
    return [(dtype, attention) for dtype in names for attention in attentions]


def check(name: str, device: torch.device, tolerance: float) -> list[dict]:
    engine_class, spec = get_engine(name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, options = TINY_MODELS[name](Path(tmp))
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        reference = None
        for dtype, attention in variants(device, spec.cuda_dtypes):
            values = build_options(engine_class.options_class, {**options, "attention": attention})
            engine = engine_class.from_weights(WeightsSet(paths), device, DTYPES[dtype], values)

            def run(engine=engine) -> torch.Tensor:
                generator = torch.Generator(device).manual_seed(0) if spec.stochastic else None
                out = engine.upscale(image.to(device), generator=generator)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return out.float().cpu()

            run()
            started = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - started
            reference = out if reference is None else reference
            diff = (out - reference).abs().max().item()
            ok = bool(torch.isfinite(out).all()) and diff <= tolerance
            rows.append({"engine": name, "dtype": dtype, "attention": attention, "seconds": round(seconds, 3),
                         "max_abs_diff_vs_fp32": diff, "ok": ok})  # fmt: skip
            print(f"{name:12s} {dtype:5s} {attention:9s} {seconds:7.3f} s  max|Δ| {diff:.2e}  {'ok' if ok else 'FAIL'}",
                  flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    diffusion = [n for n in TINY_MODELS if get_engine(n)[1].tiling == "latent"]
    parser.add_argument("--engines", nargs="*", default=diffusion)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or --device cpu for a dry run")
    rows = [row for name in args.engines for row in check(name, device, args.tolerance)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
