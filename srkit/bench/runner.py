"""`srkit benchmark`: run models (or read another tool's outputs) over test sets, score every image, report.

The steps of `run_benchmark` are: 1. resolve the datasets, 2. build the metrics (skipping, with one line each,
those whose package or weights are missing), 3. for every SR source (the bicubic baseline, each model, or
`--sr-dir`) and set: get each SR image — from the model, timed, or from the cache with `--reuse` — and score
it, 4. folder-level metrics (FID), 5. write the CSV/JSON/Markdown/plot (srkit.bench.report).  Model outputs are
cached as 8-bit PNGs under `OUT/sr/<set>/<model>/` and always scored from their 8-bit values, as the papers score
saved PNGs, so a `--reuse` run gives the same numbers without running any model.

Under `torchrun`/`accelerate launch` each process scores every N-th image of each set; the rows and timings are
gathered in image order and the first process writes the one report, equal to a one-process report but for the
times.  A run that scores nothing (e.g. `--sr-dir` files named unlike the set's) is an error, not an empty report.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from srkit import api, distributed
from srkit.bench import report
from srkit.bench.datasets import Dataset, DatasetError, Sample, image_files, open_set, pair_folders
from srkit.bench.metrics import MetricSpec, MetricUnavailable, create_metric, resolve_specs
from srkit.common import one_line
from srkit.engines.base import get_engine
from srkit.imageio import ImageData, ImageReadError, read_image, write_image

TIMINGS_FILE = "timings.json"
"""Per-image time and memory of the run that produced a cache folder, so `--reuse` reports keep them."""
RSS_SAMPLE_SECONDS = 0.005


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class BenchmarkError(ValueError):
    """The benchmark cannot start as asked; the message is one line that says what to do."""


class MissingOutput(LookupError):
    """`--sr-dir` lacks one image of the set: that image is reported and skipped, the rest are scored."""


@dataclass
class BenchmarkConfig:
    """Mirrors the `srkit benchmark` flags."""

    sets: tuple[str, ...] = ()
    lr_dir: Path | None = None
    hr_dir: Path | None = None
    sr_dir: Path | None = None
    """Score images made by another tool (matched to the ground truth by file stem); named after the folder."""
    sr_pattern: str = "{name}"
    """The stem of another tool's output for the set's image `{name}`, e.g. `{name}_out` (`--sr-suffix _out`)."""
    baseline: bool = True
    """Add the bicubic row (every SR paper's first) wherever the LR images and the output size are known."""
    models: tuple[str, ...] = ()
    metrics: tuple[str, ...] | None = None
    """Metric names or aliases (psnr, ssim, lpips, ...); None = all."""
    out_dir: Path = Path("results/benchmark")
    limit: int | None = None
    reuse: bool = False
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    root: Path | None = None
    tile: str | int | None = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    log: Callable[[str], None] = _stderr


@dataclass
class BenchmarkResult:
    rows: list[dict[str, Any]]
    """One per (set, model, image): timing, memory and every metric (None where it does not apply)."""
    summary: list[dict[str, Any]]
    """One per (set, model): means over images, folder-level metrics, time and memory."""
    metrics: list[MetricSpec]
    """The metrics that ran."""
    skipped: dict[str, str]
    """Metric name -> the line that says why it did not run."""
    files: dict[str, Path]
    messages: list[str]


@dataclass
class Produced:
    """One SR image and what it cost to make (None when unknown: another tool's output)."""

    path: Path
    pixels: np.ndarray
    seconds: float | None = None
    peak_rss_sampled_mib: float | None = None
    peak_cuda_alloc_mib: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Measuring one model call


def _rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Peak RSS during a block, sampled every 5 ms by a thread (ru_maxrss only ever grows over the process)."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._sample()

    def _sample(self) -> None:
        now = _rss_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def __enter__(self) -> None:
        if self.peak is not None:
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._sample()

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20


@contextmanager
def measure(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Wall time (CUDA synchronised), peak RSS, and peak CUDA allocation on CUDA devices."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict[str, float | None] = {"seconds": None, "peak_rss_sampled_mib": None, "peak_cuda_alloc_mib": None}
    rss = RssSampler()
    with rss:
        start = time.perf_counter()
        yield stats
        if cuda:
            torch.cuda.synchronize(device)
        stats["seconds"] = time.perf_counter() - start
    stats["peak_rss_sampled_mib"] = rss.peak_mib
    if cuda:
        stats["peak_cuda_alloc_mib"] = torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# Where SR images come from


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    """What a saved 8-bit PNG holds, as floats: outputs are scored exactly as they are stored."""
    return (np.rint(np.clip(pixels, 0, 1) * 255.0) / 255.0).astype(np.float32)


class ModelSource:
    """A model run over the sets; loaded once, lazily, so a `--reuse` run with a full cache never loads it."""

    def __init__(self, name: str, config: BenchmarkConfig) -> None:
        self.name = name
        self.config = config
        self.upscaler: Any = None

    def cache_dir(self, dataset: Dataset) -> Path:
        return self.config.out_dir / "sr" / dataset.name / self.name

    def _load(self, warmup: Path) -> None:
        _seed_everything(self.config.seed)
        options = {**self.config.options, "seed": self.config.seed}
        pixel_tiled = get_engine(self.name)[1].tiling == "pixel"  # --tile is for GAN models; the others tile latents
        self.upscaler = api.load_engine(
            self.name, device=distributed.rank_device(self.config.device, distributed.current()),
            dtype=self.config.dtype, tile=self.config.tile if pixel_tiled else "auto", log=self.config.log, **options,
        )
        self.upscaler.upscale(read_image(warmup).rgb())  # untimed: first-call setup is not per-image cost

    def produce(self, dataset: Dataset, sample: Sample, timings: dict[str, dict]) -> Produced:
        assert sample.lr is not None, "run_benchmark checks that every set has LR images before running models"
        path = self.cache_dir(dataset) / f"{sample.name}.png"
        if self.config.reuse and path.is_file():
            return Produced(path, read_image(path).rgb(), **timings.get(sample.name, {}))
        if self.upscaler is None:
            self._load(sample.lr)
        image = read_image(sample.lr).rgb()
        with measure(self.upscaler.device) as stats:
            output = self.upscaler.upscale(image)
        pixels = _to_8bit(output)
        write_image(path, ImageData(pixels))
        timings[sample.name] = stats
        return Produced(path, pixels, **stats)


BICUBIC = "bicubic"


class _Bicubic:
    """The baseline as an upscaler: Pillow's bicubic (a = −0.5, MATLAB imresize's kernel for enlarging) to the
    ground truth's size, else to the set's scale."""

    device = torch.device("cpu")

    def __init__(self, dataset_scale: int | None) -> None:
        self.scale = dataset_scale
        self.size: tuple[int, int] | None = None

    def upscale(self, image: np.ndarray) -> np.ndarray:
        width, height = self.size or (image.shape[1] * (self.scale or 4), image.shape[0] * (self.scale or 4))
        return api.resize_array(image, width, height, "bicubic")


class BicubicSource(ModelSource):
    """The bicubic row: produced, timed, cached and scored exactly like a model's outputs."""

    def __init__(self, config: BenchmarkConfig) -> None:
        super().__init__(BICUBIC, config)

    def produce(self, dataset: Dataset, sample: Sample, timings: dict[str, dict]) -> Produced:
        self.upscaler = _Bicubic(dataset.scale)
        if sample.hr is not None:
            hr = read_image(sample.hr)
            self.upscaler.size = (hr.width, hr.height)
        return super().produce(dataset, sample, timings)


class FolderSource:
    """Images another tool wrote (`--sr-dir`): matched by stem through `sr_pattern`, not timed."""

    def __init__(self, folder: Path, pattern: str = "{name}") -> None:
        if "{name}" not in pattern:
            raise BenchmarkError(f"--sr-pattern must contain {{name}} (the set's image name), got '{pattern}'")
        self.folder = folder
        self.name = folder.name
        self.pattern = pattern
        self.files = image_files(folder)

    def cache_dir(self, dataset: Dataset) -> Path | None:
        return None

    def produce(self, dataset: Dataset, sample: Sample, timings: dict[str, dict]) -> Produced:
        stem = self.pattern.replace("{name}", sample.name)
        if stem not in self.files:
            raise MissingOutput(f"{self.folder} has no image named {stem}.*{self._hint(sample.name)}")
        path = self.files[stem]
        return Produced(path, read_image(path).rgb())

    def _hint(self, name: str) -> str:
        """Another tool's naming, guessed from a file that starts or ends with the set's name."""
        for stem in sorted(self.files):
            if stem != name and stem.startswith(name):
                return f" (found {stem}.*: try --sr-suffix {stem[len(name):]})"
            if stem != name and stem.endswith(name):
                return f" (found {stem}.*: try --sr-pattern '{stem[: -len(name)]}{{name}}')"
        return ""


# ---------------------------------------------------------------------------------------------------------------
# Steps


def _datasets(config: BenchmarkConfig) -> list[Dataset]:
    datasets = [open_set(name, config.root, config.limit) for name in config.sets]
    if config.lr_dir is not None or config.hr_dir is not None:
        name = (config.lr_dir or config.hr_dir).name  # type: ignore[union-attr]
        datasets.append(pair_folders(name, config.lr_dir, config.hr_dir, config.limit))
    if not datasets and config.sr_dir is not None and not config.models:
        datasets.append(pair_folders(config.sr_dir.name, config.sr_dir, None, config.limit))
    if not datasets:
        raise BenchmarkError("nothing to benchmark: give --set NAME (see --list-sets), or --lr DIR [--hr DIR]")
    if config.sr_dir is not None and len(datasets) > 1:
        raise BenchmarkError("--sr-dir scores one set: give a single --set, or --hr DIR, with it")
    if config.models and any(d.lr_dir is None for d in datasets):
        raise BenchmarkError("--model needs low-resolution inputs: give --set NAME or --lr DIR (not only --hr)")
    return datasets


def _check_models(names: tuple[str, ...]) -> None:
    """Unknown model names fail before any work (a `--reuse` run would otherwise never load them)."""
    for name in names:
        try:
            get_engine(name)
        except KeyError as exc:
            raise BenchmarkError(str(exc).strip("'\"")) from None


def _warn_scale_mismatch(models: tuple[str, ...], datasets: list[Dataset], say: Callable[[str], None]) -> None:
    """Said before a long run, not after: a x2 model on a x4 set gets no full-reference scores."""
    for model in models:
        scale = get_engine(model)[1].scale
        for dataset in datasets:
            if dataset.scale is not None and dataset.scale != scale:
                say(f"{model} is x{scale} but set '{dataset.name}' is x{dataset.scale}: full-reference metrics "
                    "will be skipped for it (its outputs do not match the ground truth's size)")


def _sources(config: BenchmarkConfig, datasets: list[Dataset]) -> list[ModelSource | FolderSource]:
    _check_models(config.models)
    sources: list[ModelSource | FolderSource] = [ModelSource(m, config) for m in dict.fromkeys(config.models)]
    if config.sr_dir is not None:
        sources.append(FolderSource(config.sr_dir, config.sr_pattern))
    if not sources:
        raise BenchmarkError("nothing to score: give --model NAME (repeatable) and/or --sr-dir DIR")
    if config.baseline and all(d.lr_dir is not None and (d.has_gt or d.scale) for d in datasets):
        sources.insert(0, BicubicSource(config))
    return sources


def _build_metrics(specs: list[MetricSpec], device: torch.device, say: Callable[[str], None]):
    built, skipped = {}, {}
    for spec in specs:
        try:
            built[spec.name] = create_metric(spec.name, device)
        except MetricUnavailable as exc:
            skipped[spec.name] = str(exc)
            say(str(exc))
    return built, skipped


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not enabled, transient=True,
    )


def _score(
    metrics: dict[str, Any], sr: np.ndarray, hr: np.ndarray | None, row: dict[str, Any], say: Callable[[str], None]
) -> str | None:
    """Per-image metrics into `row`; full-reference ones need an HR of the same size (else a note).

    A metric that fails on one image (e.g. an image smaller than its window) is reported and left empty there.
    """
    note = None
    for name, metric in metrics.items():
        if not metric.spec.per_image:
            continue
        if metric.spec.needs_gt and hr is not None and hr.shape != sr.shape:
            note = f"SR {sr.shape[1]}x{sr.shape[0]} vs HR {hr.shape[1]}x{hr.shape[0]}"
            continue
        if metric.spec.needs_gt and hr is None:
            continue
        try:
            value = metric(sr, hr)
        except (ValueError, RuntimeError) as exc:
            say(f"{name} failed on {row['model']}/{row['image']}: {one_line(exc)}")
            continue
        row[name] = value if math.isfinite(value) else None  # reports show "–" rather than invalid JSON
    return note


@contextmanager
def _linked_folder(paths: list[Path]) -> Iterator[Path]:
    """A temporary folder of links to exactly these files (FID reads whole folders; `--limit` takes a subset)."""
    with tempfile.TemporaryDirectory(prefix="srkit-fid-") as tmp:
        for index, path in enumerate(paths):
            link = Path(tmp) / f"{index:06d}{path.suffix}"
            try:
                link.symlink_to(path.resolve())
            except OSError:
                link.write_bytes(path.read_bytes())
        yield Path(tmp)


def _score_sample(
    source: ModelSource | FolderSource,
    dataset: Dataset,
    sample: Sample,
    metrics: dict[str, Any],
    timings: dict,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], Path, str | None]:
    """One row (cost and every per-image metric), the SR file it scored, and a size-mismatch note."""
    produced = source.produce(dataset, sample, timings)
    needs_hr = any(m.spec.needs_gt and m.spec.per_image for m in metrics.values())
    hr = read_image(sample.hr).rgb() if needs_hr and sample.hr is not None else None
    row: dict[str, Any] = {
        "set": dataset.name,
        "model": source.name,
        "image": sample.name,
        "seconds": produced.seconds,
        "peak_rss_sampled_mib": produced.peak_rss_sampled_mib,
        "peak_cuda_alloc_mib": produced.peak_cuda_alloc_mib,
    }
    return row, produced.path, _score(metrics, produced.pixels, hr, row, say)


def _folder_scores(
    metrics: dict[str, Any], dataset: Dataset, rows: list[dict[str, Any]], sr_paths: list[Path]
) -> dict[str, float]:
    """Set-level metrics (FID) over exactly the images that were scored."""
    folder_metrics = [m for m in metrics.values() if not m.spec.per_image]
    if not (folder_metrics and dataset.has_gt and rows):
        return {}
    scored = {row["image"] for row in rows}
    hr_paths = [s.hr for s in dataset.samples if s.hr is not None and s.name in scored]
    with _linked_folder(sr_paths) as sr_dir, _linked_folder(hr_paths) as hr_dir:
        return {metric.spec.name: metric(sr_dir, hr_dir) for metric in folder_metrics}


def _run_one(
    source: ModelSource | FolderSource,
    dataset: Dataset,
    metrics: dict[str, Any],
    progress: Progress,
    say: Callable[[str], None],
    ranks: distributed.Ranks,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Rows for one source on one set, plus its folder-level scores; unreadable images are reported, skipped.

    Each rank scores its share of the images; rows, timings and notes are gathered back in image order."""
    cache = source.cache_dir(dataset)
    timings_path = cache / TIMINGS_FILE if cache is not None else None
    timings = json.loads(timings_path.read_text()) if timings_path and timings_path.is_file() else {}
    mine = ranks.share(list(enumerate(dataset.samples)))
    task = progress.add_task(f"{dataset.name} · {source.name}", total=len(mine))
    scored: list[tuple[int, dict[str, Any], str, str | None]] = []
    said: list[tuple[int, str]] = []
    for index, sample in mine:
        try:
            row, sr_path, note = _score_sample(source, dataset, sample, metrics, timings, say)
        except (ImageReadError, MissingOutput) as exc:
            said.append((index, f"{source.name} on {dataset.name}: {exc}; image skipped"))
        else:
            scored.append((index, row, str(sr_path), f"{sample.name} ({note})" if note is not None else None))
        progress.advance(task)
    progress.remove_task(task)
    parts = distributed.all_gather((scored, said, timings), ranks)
    scored = sorted((entry for part in parts for entry in part[0]), key=lambda entry: entry[0])
    for _, message in sorted(entry for part in parts for entry in part[1]):
        say(message)
    if timings_path is not None and ranks.is_main:
        merged = {name: stats for part in parts for name, stats in part[2].items()}
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(dict(sorted(merged.items())), indent=1))
    rows = [row for _, row, _, _ in scored]
    mismatched = [note for _, _, _, note in scored if note is not None]
    if mismatched:
        say(
            f"{source.name} on {dataset.name}: full-reference metrics skipped for {len(mismatched)} image(s) whose "
            f"size differs from the ground truth, e.g. {mismatched[0]}; the model's scale must match the set's"
        )
        return rows, {}
    if not ranks.is_main:
        return rows, {}  # set-level metrics (FID) read whole folders: the first process computes them
    return rows, _folder_scores(metrics, dataset, rows, [Path(path) for _, _, path, _ in scored])


def _check_scored(rows: list[dict[str, Any]], specs: list[MetricSpec]) -> None:
    """A report of nothing is a failed run: say why instead of writing empty tables."""
    measured = [r for r in rows if r["seconds"] is not None or any(r.get(s.name) is not None for s in specs)]
    if not measured:
        raise BenchmarkError(
            "nothing was scored: no SR image matched the set's images (see the skipped lines above; "
            "--sr-suffix/--sr-pattern match another tool's file names)"
        )


def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Run every source over every set, score, and write the reports into `config.out_dir`."""
    messages: list[str] = []

    ranks = distributed.current()

    def say(message: str) -> None:
        messages.append(message)
        if ranks.is_main:
            config.log(message)

    if config.limit is not None and config.limit < 1:
        raise BenchmarkError(f"--limit must be at least 1, got {config.limit}")
    try:
        datasets = _datasets(config)
        sources = _sources(config, datasets)
    except DatasetError as exc:
        raise BenchmarkError(str(exc)) from None
    _warn_scale_mismatch(tuple(config.models), datasets, say)
    _seed_everything(config.seed)
    specs = resolve_specs(config.metrics)
    for dataset in datasets:
        if not dataset.has_gt:
            say(f"{dataset.name} has no ground truth: scoring no-reference metrics only")
    if not any(d.has_gt for d in datasets):
        specs = [s for s in specs if not s.needs_gt]
    device = api.resolve_device(distributed.rank_device(config.device, ranks))
    metrics, skipped = _build_metrics(specs, device, say)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    folder_scores: dict[tuple[str, str], dict[str, float]] = {}
    with _progress(config.progress and ranks.is_main) as progress:
        for source in sources:
            for dataset in datasets:
                set_rows, scores = _run_one(source, dataset, metrics, progress, say, ranks)
                rows += set_rows
                folder_scores[(dataset.name, source.name)] = scores
    ran = [m.spec for m in metrics.values()]
    _check_scored(rows, ran)
    summary = report.summarise(rows, folder_scores, ran)
    files: dict[str, Path] = {}
    if ranks.is_main:
        run = report.describe_run(config, device) | {"processes": ranks.world}
        files = report.write_reports(config.out_dir, rows, summary, ran, skipped, run, say)
    return BenchmarkResult(rows, summary, ran, skipped, files, messages)
