"""Toy SiD distillation on a 2-D ring of Gaussians: sliced Wasserstein distance of the one-step student to the
data before and after distillation, next to the teacher's multi-step samples (srkit/train/distill/toy.py).

    PYTHONPATH=. python benchmarks/toy_distill.py [--distill-steps 400] [--alpha 1.2] [--seed 0]
    PYTHONPATH=. python benchmarks/toy_distill.py --task restore --loss cid   # GenDR's CiD on paired points
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from srkit.train.distill.toy import ToySettings, run_toy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(ToySettings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny MLPs run fastest on one)")
    arguments = vars(parser.parse_args(argv))
    torch.set_num_threads(arguments.pop("threads"))
    settings = ToySettings(**arguments)
    result = run_toy(settings)
    print(f"settings: {settings}")
    print(f"sliced W1 to the data, one-step student before distillation: {result.distance_before:.4f}")
    print(
        f"sliced W1 to the data, one-step student after {settings.distill_steps} steps: {result.distance_after:.4f}"
    )
    print(
        f"sliced W1 to the data, teacher with {settings.sampler_steps} DDIM steps (floor): {result.teacher_distance:.4f}"
    )
    if result.paired_error_before is not None:
        print(
            f"RMS distance of each restored point to its own HR point: {result.paired_error_before:.4f} before, "
            f"{result.paired_error_after:.4f} after"
        )
    print(f"time: {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
