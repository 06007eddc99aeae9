"""Benchmark datasets: the table, locating sets under a data root, pairing LR/HR folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from srkit.bench import datasets
from srkit.bench.datasets import DatasetError, list_sets, open_set, pair_folders


def write_images(folder: Path, names: list[str], size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (size, size), (10, 20, 30)).save(folder / name)


def test_table_lists_the_published_sets_with_sources_and_layouts():
    entries = {e.name: e for e in list_sets()}
    assert list(entries) == ["realsr", "drealsr", "div2k-val", "realset65", "realset80", "reallr200"]
    for entry in entries.values():
        assert entry.sources and entry.layout and entry.folders and entry.licence and entry.scale == 4
    assert [n for n, e in entries.items() if not e.has_gt] == ["realset65", "realset80", "reallr200"]
    assert (entries["realsr"].lr, entries["realsr"].hr, entries["realsr"].images) == ("test_LR", "test_HR", 100)
    assert (entries["div2k-val"].lr, entries["div2k-val"].hr) == ("lq", "gt")


def test_set_found_under_any_of_its_folder_names(tmp_path, monkeypatch):
    base = tmp_path / "StableSR_testsets" / "RealSRVal_crop128"
    write_images(base / "test_LR", ["b.png", "a.png"], 8)
    write_images(base / "test_HR", ["a.png", "b.png"], 32)
    found = open_set("realsr", tmp_path)
    assert [s.name for s in found.samples] == ["a", "b"] and found.has_gt and found.scale == 4
    assert found.samples[0].hr == base / "test_HR" / "a.png"
    monkeypatch.setenv("SRKIT_DATA", str(tmp_path))
    assert open_set("realsr", limit=1).samples == found.samples[:1]


def test_set_without_ground_truth_is_a_flat_folder(tmp_path):
    write_images(tmp_path / "RealSet65", ["x.jpg", "y.png"])
    found = open_set("realset65", tmp_path)
    assert not found.has_gt and [s.hr for s in found.samples] == [None, None]


def test_missing_set_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as info:
        open_set("drealsr", tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "--root" in message
    assert "huggingface.co/datasets/Iceclear/StableSR-TestSets" in message
    with pytest.raises(DatasetError, match="unknown set 'set5'.*realsr"):
        open_set("set5", tmp_path)


def test_default_root_is_in_the_srkit_home(srkit_home, monkeypatch):
    monkeypatch.delenv("SRKIT_DATA", raising=False)
    assert datasets.data_root() == srkit_home / "datasets"


def test_folder_pairs_match_by_stem_and_report_orphans(tmp_path):
    write_images(tmp_path / "lr", ["a.png", "b.jpg"])
    (tmp_path / "lr" / "notes.txt").write_text("not an image")
    write_images(tmp_path / "hr", ["a.png", "b.png"])
    paired = pair_folders("mine", tmp_path / "lr", tmp_path / "hr")
    assert [(s.lr.name, s.hr.name) for s in paired.samples] == [("a.png", "a.png"), ("b.jpg", "b.png")]
    write_images(tmp_path / "lr", ["c.png"])
    with pytest.raises(DatasetError, match="1 of 3 images .* no image of the same name .*c.png"):
        pair_folders("mine", tmp_path / "lr", tmp_path / "hr")
    write_images(tmp_path / "dup", ["a.png", "a.jpg"])
    with pytest.raises(DatasetError, match="two images named a"):
        pair_folders("dup", tmp_path / "dup", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        pair_folders("empty", tmp_path / "empty", None)
