"""Calibration: srkit's PSNR/SSIM-Y reproduce OSEDiff's published per-image RealSR log (pyiqa, Y of YCbCr).

The data (OSEDiff's 100 outputs, the StableSR RealSR crops and `metrics.log`) live in the workspace's shared
folder, never in the repo; the test skips with the reason when it is absent.
"""

from __future__ import annotations

import re

import pytest
from conftest import shared_data

from srkit.bench import BenchmarkConfig, run_benchmark

LOG_LINE = re.compile(r"results_osediff/(?P<name>\S+)\.png \| PSNR: (?P<psnr>[\d.]+); SSIM: (?P<ssim>[\d.]+)")


def test_osediff_realsr_log_is_reproduced(tmp_path):
    outputs = shared_data("realsr", "osediff_outputs")
    logged = {
        m["name"]: (float(m["psnr"]), float(m["ssim"]))
        for m in map(LOG_LINE.search, (outputs / "metrics.log").read_text().splitlines())
        if m
    }
    assert len(logged) == 100
    result = run_benchmark(
        BenchmarkConfig(
            hr_dir=shared_data("realsr", "test_HR"), sr_dir=outputs, metrics=("psnr", "ssim"),
            out_dir=tmp_path, progress=False,
        )
    )
    scored = {row["image"]: (row["psnr_y"], row["ssim_y"]) for row in result.rows}
    assert scored.keys() == logged.keys()
    worst_psnr = max(abs(scored[n][0] - logged[n][0]) for n in logged)
    worst_ssim = max(abs(scored[n][1] - logged[n][1]) for n in logged)
    assert worst_psnr < 1e-4 and worst_ssim < 1e-4, (worst_psnr, worst_ssim)
    (summary,) = result.summary
    assert round(summary["psnr_y"], 4) == 25.1511 and round(summary["ssim_y"], 4) == 0.7341
    assert "| osediff_outputs | 25.1511 | 0.7341 |" in result.files["markdown"].read_text()


REALESRGAN_X4PLUS_REALSR = (25.7093, 0.7616)
"""Means of `srkit benchmark --set realsr --model realesrgan-x4plus --dtype fp32` (embedded weights, CPU, 8-bit
PNGs)."""
BF16_GATE = (0.02, 0.0005)
"""How far bf16 on the CPU may move the embedded default's RealSR row from fp32 (PSNR-Y dB, SSIM-Y)."""


def realsr_row(tmp_path, dtype: str) -> dict:
    result = run_benchmark(
        BenchmarkConfig(
            sets=("realsr",), root=shared_data(), models=("realesrgan-x4plus",), metrics=("psnr", "ssim"),
            out_dir=tmp_path, progress=False, device="cpu", dtype=dtype,
        )
    )
    (summary,) = [row for row in result.summary if row["model"] == "realesrgan-x4plus"]  # not the set's own rows
    assert summary["images"] == 100
    return {"result": result, **summary}


@pytest.mark.slow
def test_realesrgan_x4plus_in_bf16_on_the_cpu_keeps_the_realsr_row(tmp_path):
    """`--dtype auto` on a CPU with native bf16 (AMX/AVX512-BF16: the GAN net in bf16, channels-last) against the
    fp32 row: within 0.02 dB PSNR-Y and 0.0005 SSIM-Y.  About 3 minutes on 2 AMX cores.
    Run:  make test-slow  (or pytest -m slow tests/test_bench_calibration.py)."""
    from srkit.cpu_features import detect

    if not detect().native_bf16:
        pytest.skip(f"this CPU ({detect().kind}) has no native bf16: srkit runs fp32 here")
    row = realsr_row(tmp_path, "bf16")
    assert row["result"].files["json"].read_text().count('"bf16, ') >= 1  # the report records the precision
    assert abs(row["psnr_y"] - REALESRGAN_X4PLUS_REALSR[0]) <= BF16_GATE[0], row["psnr_y"]
    assert abs(row["ssim_y"] - REALESRGAN_X4PLUS_REALSR[1]) <= BF16_GATE[1], row["ssim_y"]


@pytest.mark.slow
def test_realesrgan_x4plus_on_realsr_writes_reports_and_matches_the_measurement(tmp_path):
    """About 10 minutes on 2 CPU cores: RRDBNet on the 100 RealSR crops, fp32."""
    summary = realsr_row(tmp_path, "fp32")
    assert {"csv", "json", "markdown"} <= set(summary["result"].files)  # and "plot" where matplotlib is installed
    assert summary["psnr_y"] == pytest.approx(REALESRGAN_X4PLUS_REALSR[0], abs=0.01)
    assert summary["ssim_y"] == pytest.approx(REALESRGAN_X4PLUS_REALSR[1], abs=0.001)
