"""RunSummary: the one schema of a run's results, written as ``summary.json`` and read by everything else.

Training writes it, the tables, plots, notebook, W&B logging and benchmarks read it, all through this
module, so a field is renamed in one place. Torch-free: tables and dashboards load thousands of these.

Scores are fractions as the metrics return them (0.814, not 81.4); ``psi`` is in points. The JSON stays
flat (the Skeleton step's fields sit beside the run's), as version-less summaries were, so
``upgrade`` only has to fill in what older runs did not record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
COMPLETE = "complete"
FILENAME = "summary.json"
WANDB_KEY = "skeleton_summary"  # the W&B run-config key holding the whole summary (``to_dict()``)


class SummaryError(ValueError):
    """A summary.json this code cannot read: the message names the file and the fix."""


@dataclass
class Measured:
    """All of the task's metrics on the search split (decides the rate) and on dev (reports it)."""

    search: dict[str, float] = field(default_factory=dict)
    dev: dict[str, float] = field(default_factory=dict)


@dataclass
class FFNWidths:
    kept_per_layer: list[int]
    total_per_layer: list[int]
    kept_fraction: float


@dataclass
class ParamCounts:
    dense: dict[str, int]
    pruned: dict[str, int]


@dataclass
class Flops:
    dense: float
    pruned: float
    ideal_speedup: float


@dataclass
class Latency:
    batch_size: int
    seq_len: int
    dense_ms: float
    pruned_ms: float
    speedup: float
    device: str
    spread: float = 0.0  # p90 / median of the repeats (the noisier model)
    load: float | None = None  # 1-minute load average per core while timing
    others: float | None = None  # share of the cores other processes used while timing (Linux)
    reliable: bool = True  # False: the machine was busy; rerun skeleton-bench on an idle one


@dataclass
class SkeletonOutcome:
    """What the Skeleton step adds to a run: the rate it chose and what that bought."""

    psi: float
    rate: float
    curve: list[list[float]]  # (rate, search score) per evaluated point, sorted, rate 0 first
    pruned: Measured
    ffn: FFNWidths
    backbone_params: ParamCounts
    flops: Flops
    latency: Latency
    seconds: dict[str, float]  # attribution, search, recovery (when it ran)
    criterion: str
    skeleton_config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    degenerate: bool = False  # the dense model gave every search example one answer: the rate means nothing
    recovered: Measured | None = None
    artifact: str | None = None
    # what was pruned and why (runs made before joint ranking have the defaults)
    units: str = "ffn"  # "joint": heads and neurons ranked by score per modelled cost
    heads: dict[str, list[int]] | None = None  # {"kept": per layer, "dense": per layer}
    # every evaluated point: rate, ffn_kept, heads_kept, modelled, modelled_speedup, score, drop (points),
    # se, accepted, confirmed, chosen
    search_points: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, dict[str, Any]] = field(default_factory=dict)  # search/dev: drop, se (points), n
    cost_model: dict[str, Any] | None = None  # the latency model the ranking and the search used
    modelled_speedup: float | None = None
    # the best answer given to every search example alike: {"label", "search"} (classification only);
    # a dense model within psi of it has learned too little for the margin to mean much
    constant_answer: dict[str, Any] | None = None


@dataclass
class RunSummary:
    task: str
    benchmark: str
    model: str
    backbone: str
    seed: int
    headline_metric: str
    dense: Measured
    params: dict[str, int] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    sweep: str | None = None
    search_from: str = "train"
    run_dir: str | None = None
    wall_seconds: float | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)  # config, data, backbone: see fingerprints.py
    skeleton: SkeletonOutcome | None = None
    status: str = COMPLETE
    schema_version: int = SCHEMA_VERSION

    # ---- what readers ask most often -------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def final(self) -> Measured:
        """The model the run hands over: pruned (after recovery, if it ran) or the dense one."""
        if self.skeleton is None:
            return self.dense
        return self.skeleton.recovered or self.skeleton.pruned

    def score(self, stage: str, split: str = "dev") -> float | None:
        """The headline score of ``stage`` (dense | pruned | recovered) on ``split``; None if absent."""
        measured = self.dense if stage == "dense" else getattr(self.skeleton, stage, None)
        return None if measured is None else getattr(measured, split).get(self.headline_metric)

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "skeleton"}
        if self.skeleton is not None:
            outcome = asdict(self.skeleton)
            out.update(outcome)
            out["speedup"] = self.skeleton.latency.speedup  # a top-level column for dashboards
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "summary") -> RunSummary:
        if not isinstance(data, dict):
            raise SummaryError(f"{source}: a run summary is a JSON object, not {type(data).__name__}")
        data = upgrade(data, source)
        own = {f.name for f in fields(cls)} - {"skeleton"}
        outcome_keys = {f.name for f in fields(SkeletonOutcome)}
        unknown = set(data) - own - outcome_keys - {"speedup"}
        if unknown:
            raise SummaryError(f"{source}: unknown field(s) {sorted(unknown)} for schema {SCHEMA_VERSION}")
        try:
            run = {k: v for k, v in data.items() if k in own}
            run["dense"] = Measured(**run.get("dense", {}))
            skeleton = None
            if "rate" in data:
                skeleton = _outcome({k: v for k, v in data.items() if k in outcome_keys})
            return cls(**run, skeleton=skeleton)
        except (TypeError, KeyError) as err:
            raise SummaryError(f"{source}: not a readable run summary ({err}); rerun the run") from None


def _outcome(data: dict[str, Any]) -> SkeletonOutcome:
    data = dict(data)
    data["pruned"] = Measured(**data["pruned"])
    if data.get("recovered") is not None:
        data["recovered"] = Measured(**data["recovered"])
    data["ffn"] = FFNWidths(**data["ffn"])
    data["backbone_params"] = ParamCounts(**data["backbone_params"])
    data["flops"] = Flops(**data["flops"])
    data["latency"] = Latency(**data["latency"])
    return SkeletonOutcome(**data)


def upgrade(data: dict[str, Any], source: str = "summary") -> dict[str, Any]:
    """Bring an older summary to this schema. Version-less summaries (schema 1) recorded the same
    fields but no ``degenerate`` flag (then any warning meant "learned nothing") and no version."""
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise SummaryError(f"{source}: schema_version {version!r} is not a whole number; rerun the run")
    if version > SCHEMA_VERSION:
        raise SummaryError(
            f"{source} has schema version {version}; this skeleton reads up to {SCHEMA_VERSION}: "
            "upgrade the package (pip install -U skeleton)"
        )
    data = dict(data)
    if version == 1:
        if "rate" in data:
            data.setdefault("degenerate", bool(data.get("warnings")))
            data.setdefault("seconds", {})
            data.setdefault(
                "criterion",
                data.get("skeleton_config", {}).get("attribution", {}).get("criterion", "attribution"),
            )
            data.setdefault("skeleton_config", {})
        data["schema_version"] = SCHEMA_VERSION
    return data


# ---- files ---------------------------------------------------------------------------------------
def read(path: str | Path) -> RunSummary:
    """``path`` is a summary.json or a run folder holding one."""
    path = _file(path)
    return RunSummary.from_dict(read_json(path), str(path))


def read_json(path: str | Path) -> dict[str, Any]:
    """The raw JSON object of a summary.json (or of a run folder's), before any schema check: lets a
    reader look at ``status`` first, since only complete summaries have to match the schema. A missing
    file raises ``OSError`` as ``open`` does; a damaged one ``SummaryError``."""
    path = _file(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SummaryError(
            f"{path} is not valid JSON (line {err.lineno}): the run was cut off while writing it; "
            "rerun that run (sweeps rerun it by themselves)"
        ) from None
    except UnicodeDecodeError as err:
        raise SummaryError(f"{path} is not text ({err.reason}): rerun that run") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{path}: a run summary is a JSON object, not {type(data).__name__}")
    return data


def _file(path: str | Path) -> Path:
    path = Path(path)
    return path / FILENAME if path.is_dir() else path
