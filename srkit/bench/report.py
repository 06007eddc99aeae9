"""Benchmark reports: per-image CSV and JSON, a Markdown table of means, and a quality-vs-time plot.

Every file is written to a temporary name and renamed into place, so an interrupted run never leaves a
half-written report next to good ones.  matplotlib is optional (`pip install 'srkit[bench]'`): without it the
plot is skipped with one line and everything else is still written.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from srkit import api
from srkit.bench.metrics import MetricSpec
from srkit.common import atomic_path
from srkit.cpu_features import detect

COST_COLUMNS = ("seconds", "peak_rss_sampled_mib", "peak_cuda_alloc_mib")
COST_LABELS = {
    "seconds": "s/image",
    "peak_rss_sampled_mib": "peak RSS MiB",
    "peak_cuda_alloc_mib": "peak CUDA MiB",
}
COST_NOTE = (
    "Cost per image, model call only: `seconds` is wall time (CUDA synchronised; one untimed warm-up call per model "
    "first); `peak_rss_sampled_mib` is the process's resident memory sampled every 5 ms during the call (it "
    "includes the loaded model); `peak_cuda_alloc_mib` is `torch.cuda.max_memory_allocated` during the call "
    "(CUDA only). Outputs read from `--sr-dir` have no cost."
)
FILES = {"csv": "per_image.csv", "json": "results.json", "markdown": "summary.md", "plot": "quality_vs_time.png"}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(
    rows: list[dict[str, Any]], folder_scores: dict[tuple[str, str], dict[str, float]], specs: list[MetricSpec]
) -> list[dict[str, Any]]:
    """One entry per (set, model): mean of each metric and of time, peak of memory, plus folder metrics."""
    summary = []
    for (set_name, model), scores in folder_scores.items():
        mine = [r for r in rows if r["set"] == set_name and r["model"] == model]
        entry: dict[str, Any] = {"set": set_name, "model": model, "images": len(mine)}
        for spec in specs:
            if spec.per_image:
                entry[spec.name] = _mean([r[spec.name] for r in mine if r.get(spec.name) is not None])
            else:
                entry[spec.name] = scores.get(spec.name)
        entry["seconds"] = _mean([r["seconds"] for r in mine if r["seconds"] is not None])
        for column in COST_COLUMNS[1:]:
            values = [r[column] for r in mine if r[column] is not None]
            entry[column] = max(values) if values else None
        summary.append(entry)
    return summary


def describe_run(config: Any, device: torch.device) -> dict[str, Any]:
    """What produced these numbers: the configuration, versions and hardware."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "log"}
    cpu = detect()
    return {
        "config": json.loads(json.dumps(settings, default=str)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {cpu.kind}: {cpu.name})",
        "cpu_threads": torch.get_num_threads(),
        "cpu": cpu.summary(),
        "precision": {  # network part -> dtype and kernels, per model (`srkit info`)
            model: {part: k.describe() for part, k in api.precision_plan(model, device, config.dtype).items()}
            for model in getattr(config, "models", ())
        },
        "versions": {name: version(name) for name in ("srkit", "torch", "pyiqa", "spandrel", "diffusers")},
    }


# ---------------------------------------------------------------------------------------------------------------
# Writers


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def per_image_csv(rows: list[dict[str, Any]], specs: list[MetricSpec]) -> str:
    columns = ["set", "model", "image", *COST_COLUMNS, *(s.name for s in specs if s.per_image)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return buffer.getvalue()


def results_json(
    rows: list[dict[str, Any]], summary: list[dict[str, Any]], specs: list[MetricSpec], skipped: dict[str, str],
    run: dict[str, Any],
) -> str:
    metrics = [
        {"name": s.name, "label": s.label, "variant": s.variant, "higher_better": s.higher_better,
         "full_reference": s.needs_gt, "per_image": s.per_image}
        for s in specs
    ]
    document = {"run": run, "metrics": metrics, "skipped_metrics": skipped, "cost_note": COST_NOTE,
                "summary": summary, "images": rows}
    return json.dumps(document, indent=2, allow_nan=False, default=str)


def _format(value: float | None, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column == "seconds":
        return f"{value:.3f}"
    if column in COST_COLUMNS:
        return f"{value:.0f}"
    return f"{value:.4f}"


def _best(entries: list[dict[str, Any]], column: str, higher_better: bool) -> float | None:
    values = [e[column] for e in entries if e.get(column) is not None]
    if len(set(values)) < 2:  # one model, or all equal: nothing stands out
        return None
    return max(values) if higher_better else min(values)


def _row(cells: list[str]) -> str:
    """One Markdown table row, as many cells as the header whatever ran (`|` in a name escaped)."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def markdown(summary: list[dict[str, Any]], specs: list[MetricSpec], skipped: dict[str, str], run: dict) -> str:
    """Mean per model × metric, one table per set, best value in bold, arrows for the better direction."""
    columns = [(s.name, f"{s.label} {s.arrow}", s.higher_better) for s in specs]
    columns += [(c, f"{COST_LABELS[c]} ↓", False) for c in COST_COLUMNS if any(e[c] is not None for e in summary)]
    lines = [
        "# srkit benchmark",
        "",
        "Means over images (FID: over the folder); ↑ higher is better, ↓ lower is better; best in bold. Device: "
        + run["device"],
    ]
    for model, parts in run.get("precision", {}).items():
        lines.append(f"- {model}: " + "; ".join(f"{part}: {choice}" for part, choice in parts.items()))
    for set_name in dict.fromkeys(e["set"] for e in summary):
        entries = [e for e in summary if e["set"] == set_name]
        lines += ["", f"## {set_name} ({entries[0]['images']} images)", ""]
        lines.append(_row(["model", *(title for _, title, _ in columns)]))
        lines.append("|---|" + "---:|" * len(columns))
        for entry in entries:
            cells = [entry["model"]]
            for name, _, higher in columns:
                text = _format(entry.get(name), name)
                best = _best(entries, name, higher)
                cells.append(f"**{text}**" if best is not None and entry.get(name) == best else text)
            lines.append(_row(cells))
    lines += ["", "## Metrics", ""] + [f"- {s.label} (`{s.name}`): {s.variant}" for s in specs]
    lines += [f"- {reason}" for reason in skipped.values()]
    lines += ["", COST_NOTE, ""]
    return "\n".join(lines)


def quality_vs_time_plot(path: Path, summary: list[dict[str, Any]], specs: list[MetricSpec]) -> str | None:
    """One panel per quality metric: mean score against mean seconds per image. Returns why it was skipped."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'srkit[bench]')"
    timed = [e for e in summary if e["seconds"] is not None]
    panels = [s for s in specs if any(e.get(s.name) is not None for e in timed)]
    if not panels:
        return "plot skipped: no model was timed and scored (outputs from --sr-dir have no time)"
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    markers = dict(zip(dict.fromkeys(e["set"] for e in timed), "osD^v<>phX*", strict=False))
    colours = {model: f"C{index % 10}" for index, model in enumerate(dict.fromkeys(e["model"] for e in timed))}
    seconds = [e["seconds"] for e in timed]
    log_x = min(seconds) > 0 and max(seconds) / min(seconds) > 20
    for index, spec in enumerate(panels):
        axes = figure.add_subplot(rows, cols, index + 1)
        for entry in (e for e in timed if e.get(spec.name) is not None):
            axes.scatter(entry["seconds"], entry[spec.name], marker=markers.get(entry["set"], "o"),
                         color=colours[entry["model"]])
            axes.annotate(entry["model"], (entry["seconds"], entry[spec.name]), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
        axes.set_title(f"{spec.label} {spec.arrow}", fontsize=9)
        axes.set_xlabel("seconds per image", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        if log_x:
            axes.set_xscale("log")
        else:
            axes.set_xlim(left=0)
    if len(markers) > 1:  # colour = model (named on the points), marker = set
        handles = [Line2D([], [], linestyle="", marker=m, color="grey", label=name) for name, m in markers.items()]
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    _atomic_write(path, buffer.getvalue())
    return None


def write_reports(
    out_dir: Path,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    specs: list[MetricSpec],
    skipped: dict[str, str],
    run: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Path]:
    """All report files into `out_dir`; returns kind -> path of those written."""
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    _atomic_write(paths["csv"], per_image_csv(rows, specs).encode())
    _atomic_write(paths["json"], results_json(rows, summary, specs, skipped, run).encode())
    _atomic_write(paths["markdown"], markdown(summary, specs, skipped, run).encode())
    if (reason := quality_vs_time_plot(paths["plot"], summary, specs)) is not None:
        say(reason)
        del paths["plot"]
    return paths
