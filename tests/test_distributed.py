"""Batch inference across processes: `torchrun`/`accelerate launch -m srkit.cli upscale|benchmark` shards the
planned files by rank; the outputs are byte-identical to one process's and the benchmark writes one merged
report.  Each launcher is exercised once (torchrun on upscale, accelerate on benchmark) to keep the suite short."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image
from typer.testing import CliRunner

from srkit.bench.report import COST_COLUMNS
from srkit.cli import app
from srkit.distributed import Ranks

FAST = "realesr-animevideov3"


def launch(launcher: str, *args: str) -> subprocess.CompletedProcess:
    """Two CPU processes of `srkit.cli`: torchrun's, or accelerate's (`--multi_gpu` only picks its torchrun-style
    launcher; the processes find no GPU and use gloo)."""
    program = shutil.which(launcher, path=str(Path(sys.executable).parent))
    if program is None:
        pytest.skip(f"{launcher} is not installed")
    if launcher == "torchrun":
        command = [program, "--standalone", "--nproc_per_node", "2"]
    else:
        with socket.socket() as probe:  # a free port: accelerate's default 29500 may be taken on a shared machine
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [program, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([*command, "-m", "srkit.cli", *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip


@contextmanager
def one_thread() -> Iterator[None]:
    """The one-process reference runs with the thread count torchrun gives each rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_process(*args: str):
    with one_thread():
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_each_process_gets_its_rank_and_one_gpu(monkeypatch):
    from srkit.distributed import launched_ranks, rank_device

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")  # what torchrun and `accelerate launch --multi_gpu` set
    ranks = launched_ranks()
    assert ranks == Ranks(3, 4, 1) and not ranks.is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device("auto", ranks) == "cuda:1" and rank_device("cpu", ranks) == "cpu"
    assert rank_device("auto", Ranks()) == "auto"  # one process: srkit's usual choice


def test_ranks_share_a_sorted_list_evenly():
    items = list(range(8))
    shares = [Ranks(rank, 3).share(items) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(item for share in shares for item in share) == items


def test_two_processes_write_byte_identical_outputs(tmp_path, tiny_compact_pth):
    (tmp_path / "in").mkdir()
    for index in range(8):  # eight sizes, so a file processed by the wrong rank or twice would show
        pixels = smooth_image(10 + index, 14 + 2 * index, seed=index)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / "in" / f"{index}.png")
    common = ["--model", FAST, "--weights", str(tiny_compact_pth), "--json"]
    one = json.loads(one_process("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "one"), *common).stdout)
    two = launch("torchrun", "upscale", str(tmp_path / "in"), "-o", str(tmp_path / "two"), *common)
    assert two.returncode == 0, two.stderr[-3000:]
    merged = json.loads(two.stdout)  # one JSON object: only the first process prints
    assert merged["processes"] == 2 and one["processes"] == 1
    assert merged["counts"] == one["counts"] == {"ok": 8, "skipped": 0, "failed": 0, "not run": 0}
    assert [f["input"] for f in merged["files"]] == [f["input"] for f in one["files"]]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 8
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _without_cost(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in COST_COLUMNS} for row in rows]


def _markdown_without_cost(text: str) -> list[list[str]]:
    """The tables' rows, cost cells dropped (the cost columns are the last ones of each table)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    header = rows[0]
    keep = [i for i, title in enumerate(header) if not any(label in title for label in ("s/image", "MiB"))]
    return [[row[i] for i in keep] for row in rows]


def test_two_processes_write_one_merged_benchmark_report(tmp_path):
    for index in range(5):
        hr = Image.fromarray((smooth_image(32, 32, seed=index) * 255).astype(np.uint8))
        for folder, image in (("hr", hr), ("lr", hr.resize((8, 8), Image.Resampling.BICUBIC))):
            (tmp_path / folder).mkdir(exist_ok=True)
            image.save(tmp_path / folder / f"img{index}.png")
    common = ["benchmark", "--lr", str(tmp_path / "lr"), "--hr", str(tmp_path / "hr"), "--model", FAST,
              "--metrics", "psnr,ssim", "--tile", "0", "-q"]  # fmt: skip
    one_process(*common, "-o", str(tmp_path / "one"))
    two = launch("accelerate", *common, "-o", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one_json = json.loads((tmp_path / "one" / "results.json").read_text())
    two_json = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two_json["run"]["processes"] == 2 and one_json["run"]["processes"] == 1
    assert len(two_json["images"]) == 10  # bicubic and the model, five images each: every rank's rows merged
    for key in ("images", "summary"):
        assert _without_cost(two_json[key]) == _without_cost(one_json[key])
    assert two_json["metrics"] == one_json["metrics"]

    def csv_rows(run: str) -> list[dict]:
        with open(tmp_path / run / "per_image.csv") as fh:
            return _without_cost(list(csv.DictReader(fh)))

    assert csv_rows("two") == csv_rows("one")
    assert _markdown_without_cost((tmp_path / "two" / "summary.md").read_text()) == _markdown_without_cost(
        (tmp_path / "one" / "summary.md").read_text()
    )
    timings = json.loads((tmp_path / "two" / "sr" / "lr" / FAST / "timings.json").read_text())
    assert sorted(timings) == [f"img{index}" for index in range(5)]
    for image in (tmp_path / "one" / "sr" / "lr" / FAST).glob("*.png"):
        assert image.read_bytes() == (tmp_path / "two" / "sr" / "lr" / FAST / image.name).read_bytes()


@pytest.mark.parametrize("args,code", [(("models",), 0), (("models", "nosuch"), 2)], ids=["success", "failure"])
def test_a_launched_process_ends_with_its_output_and_exit_code(args, code):
    """A process of a multi-process launch leaves through `exit_launched_process` (no interpreter teardown, where
    PyTorch's gloo teardown aborted a rank now and then): what it printed is flushed and its exit code kept."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, "-m", "srkit.cli", *args], capture_output=True, text=True, env=env,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == code, result.stderr
    if code == 0:
        assert "realesrgan-x4plus" in result.stdout and result.stdout.endswith("\n")
    else:
        assert result.stderr.startswith("error: unknown model 'nosuch'")
