"""Benchmark datasets: a table of published test sets (`srkit/data/datasets.toml`) and local folder pairs.

srkit never ships benchmark images (they are academic datasets with their own terms), so a set is found
under a local data root: `--root DIR`, else `$SRKIT_DATA`, else `$SRKIT_HOME/datasets`.  Each set's table
entry says which folder names it may be unpacked under and where its LR and HR images sit inside, so the
same code reads the StableSR zip, the OSEDiff copy or a hand-made folder.  Pairs are matched by file stem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tomllib

from srkit.imageio import is_image_path
from srkit.registry import srkit_home

DATASETS_FILE = Path(__file__).resolve().parents[1] / "data" / "datasets.toml"


class DatasetError(ValueError):
    """A set or folder cannot be used; the message is one line that says what to do."""


@dataclass(frozen=True)
class DatasetEntry:
    """One published test set as the table describes it (what `--list-sets` prints)."""

    name: str
    title: str
    paper: str
    scale: int
    images: int
    lr: str
    hr: str | None
    folders: tuple[str, ...]
    sources: tuple[str, ...]
    layout: str
    licence: str

    @property
    def has_gt(self) -> bool:
        return self.hr is not None


@dataclass(frozen=True)
class Sample:
    """One benchmark item: its name (the file stem) and whichever of its LR/HR files the dataset has."""

    name: str
    lr: Path | None
    hr: Path | None


@dataclass(frozen=True)
class Dataset:
    """Samples ready to run, sorted by name (so `--limit N` always takes the same N)."""

    name: str
    samples: tuple[Sample, ...]
    lr_dir: Path | None
    hr_dir: Path | None
    scale: int | None = None

    @property
    def has_gt(self) -> bool:
        return self.hr_dir is not None


@lru_cache(maxsize=2)
def load_table(path: Path = DATASETS_FILE) -> dict[str, DatasetEntry]:
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return {
        name: DatasetEntry(
            name=name,
            title=table["title"],
            paper=table.get("paper", ""),
            scale=int(table.get("scale", 4)),
            images=int(table.get("images", 0)),
            lr=table.get("lr", "."),
            hr=table.get("hr"),
            folders=tuple(table.get("folders", [name])),
            sources=tuple(table.get("sources", [])),
            layout=table.get("layout", ""),
            licence=table.get("licence", "unknown"),
        )
        for name, table in data.items()
    }


def list_sets() -> list[DatasetEntry]:
    """Every known set, in table order (for `srkit benchmark --list-sets`)."""
    return list(load_table().values())


def get_entry(name: str) -> DatasetEntry:
    table = load_table()
    if name not in table:
        raise DatasetError(f"unknown set '{name}'; known sets: {', '.join(table)} (or use --lr DIR --hr DIR)")
    return table[name]


def data_root(root: str | Path | None = None) -> Path:
    """Where sets are looked for: `--root`, else $SRKIT_DATA, else $SRKIT_HOME/datasets."""
    chosen = root or os.environ.get("SRKIT_DATA") or srkit_home() / "datasets"
    return Path(chosen).expanduser()


def find_set(entry: DatasetEntry, root: str | Path | None = None) -> Path | None:
    """The folder that holds `entry` under the data root, or None when it is not there."""
    base = data_root(root)
    for folder in entry.folders:
        candidate = base / folder
        if (candidate / entry.lr).is_dir() and (entry.hr is None or (candidate / entry.hr).is_dir()):
            return candidate
    return None


def image_files(folder: Path) -> dict[str, Path]:
    """Image files of one folder by stem; two files with one stem would make pairing ambiguous."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not (path.is_file() and is_image_path(path)):
            continue
        if path.stem in files:
            raise DatasetError(f"{folder} has two images named {path.stem}.*: rename one so pairs are unambiguous")
        files[path.stem] = path
    if not files:
        raise DatasetError(f"{folder} contains no images")
    return files


def pair_folders(
    name: str, lr_dir: Path | None, hr_dir: Path | None, limit: int | None = None, scale: int | None = None
) -> Dataset:
    """Samples from an LR folder and/or an HR folder; with both, every LR image needs an HR of the same stem."""
    if lr_dir is None and hr_dir is None:
        raise DatasetError("no images to benchmark: give --set NAME, or --lr DIR (and --hr DIR for ground truth)")
    lr = image_files(lr_dir) if lr_dir is not None else {}
    hr = image_files(hr_dir) if hr_dir is not None else {}
    if lr and hr:
        unmatched = sorted(set(lr) - set(hr))
        if unmatched:
            raise DatasetError(
                f"{len(unmatched)} of {len(lr)} images in {lr_dir} have no image of the same name in {hr_dir} "
                f"(e.g. {lr[unmatched[0]].name}); LR and HR files must share their names"
            )
    names = sorted(lr or hr)[: limit if limit else None]
    samples = tuple(Sample(stem, lr.get(stem), hr.get(stem)) for stem in names)
    return Dataset(name, samples, lr_dir, hr_dir, scale)


def open_set(name: str, root: str | Path | None = None, limit: int | None = None) -> Dataset:
    """A published set from the local data root, or a one-line error that says where to get it."""
    entry = get_entry(name)
    folder = find_set(entry, root)
    if folder is None:
        base = data_root(root)
        looked = ", ".join(f"{f}/{entry.lr}" for f in entry.folders)
        raise DatasetError(
            f"set '{name}' is not under {base} (looked for {looked}); download it from {entry.sources[0]} "
            f"and pass --root DIR (or set SRKIT_DATA) to the folder that contains it"
        )
    hr_dir = folder / entry.hr if entry.hr is not None else None
    return pair_folders(name, folder / entry.lr, hr_dir, limit, entry.scale)
