"""`srkit tag`: image tags per file with RAM / DAPE, as prompts and training tag files use them.

SeeSR and RFSR training read one `.txt` of tags per image (upstream `make_tags.py`, tags of the ground truth);
`--write-txt` writes them beside each image (or under `-o DIR`, keeping sub-folders), atomically.  Batch semantics
are `srkit upscale`'s: files, folders and globs; one unreadable file is reported and the others go on; the exit
code says whether every file worked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from srkit import registry
from srkit.batch import InputFile, Log, collect_inputs
from srkit.common import atomic_path, check_choice, one_line, resolve_device
from srkit.imageio import ImageReadError, read_image
from srkit.option_values import TAG_MODELS
from srkit.report import BatchReport, FileResult
from srkit.taggers import TAGGER_WEIGHTS, Tagger, build_tagger


def load_tagger(kind: str = "dape", *, device: str = "auto", offline: bool | None = None, log: Log = print) -> Tagger:
    """The tagger `kind` from the registry (pulled unless offline; a one-line error says what to pull)."""
    check_choice(kind, TAG_MODELS, "--tagger")
    weights = {name: registry.resolve(name, offline=offline, log=log) for name in TAGGER_WEIGHTS[kind]}
    tagger = build_tagger(kind, weights, resolve_device(device))
    assert tagger is not None
    return tagger


def tag_paths(
    inputs: Iterable[str | Path],
    tagger: Tagger,
    *,
    output: str | Path | None = None,
    write_txt: bool = False,
    recursive: bool = False,
    warn: Log = print,
    on_file: Callable[[FileResult, int, int], None] | None = None,
) -> tuple[BatchReport, dict[str, str]]:
    """Tag every image; returns the batch report and {input path: tag string} of the images that worked."""
    report = BatchReport("tagger")
    found, missing = collect_inputs(inputs, recursive, lambda m: (report.warnings.append(m), warn(m)))
    for item in missing:
        report.results.append(FileResult(item, "failed", error="no such file or folder"))
    tags: dict[str, str] = {}
    for index, item in enumerate(found):
        started = time.perf_counter()
        result = _tag_one(item, tagger, output, write_txt, tags)
        result.seconds = round(time.perf_counter() - started, 4)
        report.results.append(result)
        if on_file:
            on_file(result, index + 1, len(found))
    return report, tags


def _tag_one(item: InputFile, tagger: Tagger, output, write_txt: bool, tags: dict[str, str]) -> FileResult:
    try:
        pixels = read_image(item.path).rgb()
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None].float()
        with torch.inference_mode():
            text = tagger.tags(image)[0]
        tags[str(item.path)] = text
        if not write_txt:
            return FileResult(str(item.path), "ok")
        folder = item.path.parent if output is None else Path(output) / item.path.parent.relative_to(item.root)
        target = folder / f"{item.path.stem}.txt"
        with atomic_path(target) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
        return FileResult(str(item.path), "ok", [str(target)])
    except (ImageReadError, OSError, ValueError) as exc:
        return FileResult(str(item.path), "failed", error=one_line(exc))


__all__ = ["load_tagger", "tag_paths"]
