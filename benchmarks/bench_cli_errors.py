"""How long `srkit upscale` takes to refuse a bad option, end to end (a fresh interpreter per run, wall clock).

The floor is one second.  Each case runs `python -m srkit upscale IMAGE <bad option>` `--repeats` times and reports
the median; `import torch` alone is timed beside it for scale.  With `--compare DIR` (a checkout of another commit)
every case also runs from that tree (PYTHONPATH=DIR), interleaved with this one, and the ratio is reported.

    python benchmarks/bench_cli_errors.py --repeats 5 --compare /tmp/srkit-old --json-out results/cli_errors.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import machine
from PIL import Image

CASES = {
    "--ext bmp": ["--ext", "bmp"],
    "--scale 0": ["--scale", "0"],
    "--tile abc": ["--tile", "abc"],
    "--alpha keep": ["--alpha", "keep"],
    "--denoise-strength on x4plus": ["--denoise-strength", "0.3"],
    "-m osediff --blur 0.3": ["-m", "osediff", "--blur", "0.3"],
    "-o unwritable": ["-o", "/proc/srkit-nope/out"],
    "--quality high (parser)": ["--quality", "high"],
}


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, env=env, cwd=cwd)
    return time.perf_counter() - started, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", type=Path, help="Another srkit checkout to time side by side.")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    trees = {"this tree": None} | ({"compared tree": args.compare.resolve()} if args.compare else {})
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(cwd / "in.png")
        rows = {}
        torch_times = [timed([sys.executable, "-c", "import torch"], dict(os.environ), cwd)[0] for _ in range(args.repeats)]
        for name, options in CASES.items():
            times: dict[str, list[float]] = {tree: [] for tree in trees}
            codes: dict[str, int] = {}
            for _ in range(args.repeats):
                for tree, path in trees.items():  # interleaved: both trees see the same machine load
                    env = dict(os.environ) | ({"PYTHONPATH": str(path)} if path else {})
                    seconds, codes[tree] = timed([sys.executable, "-m", "srkit", "upscale", "in.png", *options], env, cwd)
                    times[tree].append(seconds)
            rows[name] = {tree: {"median_s": round(statistics.median(t), 3), "exit_code": codes[tree]}
                          for tree, t in times.items()}  # fmt: skip
    report = {"machine": machine(), "repeats": args.repeats, "import_torch_median_s": round(statistics.median(torch_times), 3),
              "cases": rows}  # fmt: skip
    print(f"import torch alone: {report['import_torch_median_s']:.2f} s (median of {args.repeats})")
    for name, row in rows.items():
        line = "  ".join(f"{tree}: {cell['median_s']:.2f} s (exit {cell['exit_code']})" for tree, cell in row.items())
        if len(row) == 2:
            line += f"  ratio {row['compared tree']['median_s'] / row['this tree']['median_s']:.2f}x"
        print(f"{name:32s} {line}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
