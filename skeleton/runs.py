"""Run folders: layout, atomic writes, summaries, failure records, cache keys.

A run folder is self-describing: ``config.yaml`` (resolved), ``csv/`` (metrics per epoch),
``summary.json`` (written atomically, ``status: complete`` last), ``skeleton/`` (the artifact)
and ``error.json`` when it failed. Tables read only summaries, so sweeps can be re-tabled offline.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import tempfile
import time
import traceback
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from skeleton import summary
from skeleton.summary import COMPLETE, RunSummary

SUMMARY = summary.FILENAME
ERROR = "error.json"
LOCK = ".run.lock"


class RunBusyError(RuntimeError):
    """Another process is running in this run folder (a sweep started twice, a resubmitted job)."""


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold the run folder for this process: a second process that finds it held is refused at once
    (it skips the run) instead of writing into the same folder."""
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunBusyError(f"{run_dir} is in use by {holder}: skipping it here") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@lru_cache(maxsize=1)
def unique_suffix() -> str:
    """A short random suffix for single-run folder names, fixed for the process: two runs started in
    the same second never share a folder."""
    return secrets.token_hex(3)


def set_aside(run_dir: str | Path) -> Path | None:
    """Keep a superseded summary beside the run (never delete a result) before the run is redone."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    kept = path.with_name(f"summary.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{unique_suffix()}.json")
    os.replace(path, kept)
    return kept


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Temp file + rename: a reader never sees half a file, even if the run is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=_jsonable)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_summary(run_dir: str | Path) -> RunSummary | None:
    """The run's summary, or None when there is none yet or it cannot be read (the run reruns)."""
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    try:
        return summary.read(path)
    except summary.SummaryError:
        return None


def is_complete(run_dir: str | Path) -> bool:
    found = read_summary(run_dir)
    return found is not None and found.complete


def write_summary(run_dir: str | Path, run: RunSummary) -> Path:
    path = Path(run_dir) / SUMMARY
    write_json_atomic(path, {**run.to_dict(), "status": COMPLETE})
    (Path(run_dir) / ERROR).unlink(missing_ok=True)
    return path


def record_failure(run_dir: str | Path, error: BaseException) -> Path:
    """Keep the traceback beside the run so a sweep can carry on and the failure stays visible."""
    path = Path(run_dir) / ERROR
    write_json_atomic(
        path,
        {
            "type": type(error).__name__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        },
    )
    return path


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep run's folder name: the overrides when short, else a readable prefix + a stable hash.

    Deterministic, so a rerun of the same sweep finds the same folders (and skips finished runs).
    """
    name = name or "default"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: limit - 13]}~{digest}"


# Keys added after runs and caches were made, at the value that reproduces the older behaviour: left out
# of every hash at that value, so adding a key does not invalidate every cached prompt and finished run.
NEUTRAL = {
    "module.head": "linear",
    "module.verbalizer": {"words": None, "template": None, "multi_token": "mean"},
}


def config_hash(config: dict, exclude: tuple[str, ...] = ()) -> str:
    """Stable hash of a (nested) config, minus dotted keys in ``exclude`` and keys at their ``NEUTRAL``
    value: names caches and reuse."""

    def kept(key: str, value: Any) -> bool:
        return key not in exclude and not (key in NEUTRAL and value == NEUTRAL[key])

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: strip(v, f"{prefix}{k}.") for k, v in sorted(node.items()) if kept(f"{prefix}{k}", v)}
        if isinstance(node, list):
            return [strip(v, prefix) for v in node]
        return node

    blob = json.dumps(strip(config, ""), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
