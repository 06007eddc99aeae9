"""Toy SiD distillation on a 2-D ring of Gaussians: sliced Wasserstein distance of the one-step student to the
data before and after distillation, next to the teacher's multi-step samples (srkit/train/distill/toy.py).

    PYTHONPATH=. python benchmarks/toy_distill.py [--distill-steps 400] [--alpha 1.2] [--seed 0]
    PYTHONPATH=. python benchmarks/toy_distill.py --task restore --loss cid --cid-form paper   # GenDR's CiD as written
    PYTHONPATH=. python benchmarks/toy_distill.py --compare --seeds 0 1 2   # the CiD candidates, one table

`--compare` runs GenDR's restoration toy for every way of putting the HR point into the CiD loss that srkit
considered (srkit.train.distill.cid.CiDForm, with and without Eq. 6's regression term, and the trainer's
simultaneous update order) and prints a Markdown table: W1 to the data (realism; the teacher's multi-step
samples are the floor) and the RMS distance of each restored point to its own HR point (fidelity). It is the
evidence behind the `form` and `lambda_mse` defaults of `srkit distill --recipe cid|cida`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from srkit.train.distill.toy import ToySettings, run_toy

CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("SiD (z_g in both)", {"cid_form": "sid"}),
    ("paper: z_h in inner product and ω", {"cid_form": "paper"}),
    ("paper + 0.1·MSE", {"cid_form": "paper", "regression": 0.1}),
    ("paper + 1·MSE", {"cid_form": "paper", "regression": 1.0}),
    ("hr-weight: z_h in ω only", {"cid_form": "hr-weight"}),
    ("hr-weight + 0.1·MSE (srkit default)", {"cid_form": "hr-weight", "regression": 0.1}),
    ("hr-weight + 1·MSE", {"cid_form": "hr-weight", "regression": 1.0}),
    ("hr-weight + 0.1·MSE, simultaneous updates", {"cid_form": "hr-weight", "regression": 0.1, "simultaneous": True}),
)


def parse_value(kind: type):
    """argparse converter for a ToySettings field of type `kind` (bools spelled true/false)."""
    if kind is bool:
        return lambda text: text.lower() in ("1", "true", "yes")
    return kind


def compare(base: ToySettings, seeds: list[int]) -> None:
    """One row per candidate: mean (min–max over seeds) of the numbers before and after distillation."""
    base = dataclasses.replace(base, task="restore", loss="cid")
    print(f"settings: {base}, seeds {seeds}; each row overrides cid_form, regression, simultaneous\n")
    print("| candidate | W1 before | W1 after | teacher W1 (floor) | paired RMS before | paired RMS after |")
    print("|---|---|---|---|---|---|")
    for label, overrides in CANDIDATES:
        results = [run_toy(dataclasses.replace(base, seed=seed, **overrides)) for seed in seeds]

        def cell(values: list[float]) -> str:
            return f"{statistics.mean(values):.4g} ({min(values):.3g}–{max(values):.3g})"

        print(
            f"| {label} | {cell([r.distance_before for r in results])} | {cell([r.distance_after for r in results])} "
            f"| {cell([r.teacher_distance for r in results])} | {cell([r.paired_error_before for r in results])} "
            f"| {cell([r.paired_error_after for r in results])} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in dataclasses.fields(ToySettings):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=parse_value(type(field.default)), default=field.default
        )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny MLPs run fastest on one)")
    parser.add_argument("--compare", action="store_true", help="run every CiD candidate (task restore)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--compare: seeds per candidate")
    arguments = vars(parser.parse_args(argv))
    torch.set_num_threads(arguments.pop("threads"))
    seeds, comparing = arguments.pop("seeds"), arguments.pop("compare")
    settings = ToySettings(**arguments)
    if comparing:
        compare(settings, seeds)
        return
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
