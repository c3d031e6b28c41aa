"""The end of a sweep says what happened: runs completed, skipped (already complete) and failed, with
their folders, and the sweep's exit code is non-zero when any run failed (``fail_on_error``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from skeleton import runs

SHOWN = 10


class SweepReport(Callback):
    def __init__(self, fail_on_error: bool = True):
        self.fail_on_error = fail_on_error
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        counts = tally(Path(config.hydra.sweep.dir), self.started)
        print(report(Path(config.hydra.sweep.dir), counts), flush=True)
        if counts["failed"] and self.fail_on_error:
            sys.exit(1)


def tally(sweep_dir: Path, started: float) -> dict[str, list[Path]]:
    """Each run folder of the sweep by outcome; a summary written before ``started`` was skipped."""
    counts: dict[str, list[Path]] = {"completed": [], "skipped": [], "failed": [], "unfinished": []}
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        summary = folder / runs.SUMMARY
        if (folder / runs.ERROR).exists():
            counts["failed"].append(folder)
        elif runs.is_complete(folder):
            counts["completed" if summary.stat().st_mtime >= started else "skipped"].append(folder)
        elif (folder / "config.yaml").exists() or (folder / runs.LOCK).exists():
            counts["unfinished"].append(folder)
    return counts


def report(sweep_dir: Path, counts: dict[str, list[Path]]) -> str:
    line = ", ".join(f"{len(v)} {k}" for k, v in counts.items() if v or k != "unfinished")
    lines = [f"sweep {sweep_dir}: {line}"]
    for outcome in ("failed", "unfinished"):
        for folder in counts[outcome][:SHOWN]:
            detail = f" (see {folder / runs.ERROR})" if outcome == "failed" else ""
            lines.append(f"  {outcome}: {folder}{detail}")
        if len(counts[outcome]) > SHOWN:
            lines.append(f"  ... and {len(counts[outcome]) - SHOWN} more {outcome}")
    return "\n".join(lines)
