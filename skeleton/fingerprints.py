"""Fingerprints of what a result depends on: the config, the data's contents and the backbone's files.

A cached prompt, cached scores or a finished run is reused only when all three match, so editing a data
file in place or swapping a backbone folder's weights reruns instead of silently reusing. Paths are not
part of any fingerprint (a moved data folder or cache still hits); contents are.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from skeleton import runs
from skeleton.backbones import DEMO_MODEL, TINY_PREFIX, demo_model_path
from skeleton.data import locate
from skeleton.tasks import get_task

# Keys that never change a run's result: where things are written or read from (contents are
# fingerprinted instead), how the run is named, logged and shown, and whether caches are used.
NOT_RESULT = (
    "run_dir",
    "sweep_name",
    "tags",
    "skip_completed",
    "save_artifact",
    "reuse",
    "paths",
    "logger",
    "callbacks.progress",
    "callbacks.lr_monitor",
    "data.data_dir",
    "data.cache_dir",
    "data.num_workers",
)
SPLITS = ("train", "dev")


def config_fingerprint(cfg: DictConfig, exclude: tuple[str, ...] = NOT_RESULT) -> str:
    return runs.config_hash(OmegaConf.to_container(cfg, resolve=True), exclude)


@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a file; recomputed only when its size or mtime changes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def data_fingerprint(cfg: DictConfig) -> str:
    """The contents of the task's train and dev data wherever they are read from (file hash for local
    files, the datasets fingerprint for the hub)."""
    spec = get_task(cfg.data.task)
    parts = []
    for split in SPLITS:
        raw = locate(spec, split, cfg.data.get("data_dir"), cfg.data.get("source", "auto"))
        parts.append(
            f"{split}:{file_digest(raw.path)}" if raw.path is not None else f"{split}:{raw.fingerprint}"
        )
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def backbone_fingerprint(name_or_path: str) -> str:
    """What the backbone's weights come from: a local folder's files (names, sizes, mtimes, the config's
    contents), otherwise the name (hub name or ``tiny:`` spec). Cheap: no weights are loaded."""
    folder = Path(demo_model_path() if name_or_path == DEMO_MODEL else name_or_path).expanduser()
    if name_or_path.startswith(TINY_PREFIX) or not folder.is_dir():
        return f"name:{name_or_path}"
    entries: list[Any] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = path.stat()
        entries.append([str(path.relative_to(folder)), st.st_size, st.st_mtime_ns])
    config = folder / "config.json"
    if config.is_file():
        entries.append(file_digest(config))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def run_fingerprints(cfg: DictConfig) -> dict[str, str]:
    """What a finished run's summary records, and what a rerun compares before skipping it."""
    return {
        "config": config_fingerprint(cfg),
        "data": data_fingerprint(cfg),
        "backbone": backbone_fingerprint(str(cfg.model.backbone)),
    }


def differences(recorded: dict[str, str] | None, expected: dict[str, str]) -> list[str]:
    """Which fingerprints differ (all of them for a summary that recorded none)."""
    recorded = recorded or {}
    return [name for name, value in expected.items() if recorded.get(name) != value]
