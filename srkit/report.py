"""What a batch did: one result per input file and the run's report, as `--json` prints it.

Here, with no PyTorch import, so that the command line can answer a fatal error with the same JSON object before
PyTorch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FileResult:
    input: str
    status: str
    """ok | skipped | failed | not run (the batch was interrupted first)"""
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BatchReport:
    model: str
    results: list[FileResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    """Earlier srkit outputs found among the inputs and not upscaled again (see srkit.batch)."""
    error: str | None = None
    """Why the batch stopped as a whole (an interruption); per-file errors live in `results`."""
    processes: int = 1
    """How many processes (torchrun ranks) shared the files."""

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.status in ("ok", "skipped") for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.results) for s in ("ok", "skipped", "failed", "not run")}

    def to_json(self) -> dict:
        document = {
            "model": self.model,
            "counts": self.counts(),
            "files": [r.__dict__ for r in self.results],
            "left_out": self.left_out,
            "warnings": self.warnings,
            "processes": self.processes,
        }
        return document | ({"error": self.error} if self.error is not None else {})


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch: `report` says which files were written and which were not."""

    def __init__(self, report: BatchReport) -> None:
        super().__init__("interrupted")
        self.report = report


__all__ = ["BatchInterrupted", "BatchReport", "FileResult"]
