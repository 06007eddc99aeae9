"""`srkit benchmark`: datasets (table), metrics (table + factory), the runner, and the reports."""

from srkit.bench.datasets import list_sets
from srkit.bench.runner import BenchmarkConfig, BenchmarkError, BenchmarkResult, run_benchmark

__all__ = ["BenchmarkConfig", "BenchmarkError", "BenchmarkResult", "list_sets", "run_benchmark"]
