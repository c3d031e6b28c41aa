"""Run folders: layout, atomic summaries, failure records, W&B setup.

A run folder is self-describing: ``config.yaml`` (resolved), ``csv/`` (metrics per epoch),
``summary.json`` (written atomically, ``status: complete`` last), ``skeleton/`` (the artifact)
and ``error.json`` when it failed. Tables read only summaries, so sweeps can be re-tabled offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import traceback
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
ERROR = "error.json"
COMPLETE = "complete"


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


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == COMPLETE


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY
    write_json_atomic(path, {**summary, "status": COMPLETE})
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


def config_hash(config: dict, exclude: tuple[str, ...] = ()) -> str:
    """Stable hash of a (nested) config, minus dotted keys in ``exclude``: names caches and reuse."""

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {
                k: strip(v, f"{prefix}{k}.") for k, v in sorted(node.items()) if f"{prefix}{k}" not in exclude
            }
        if isinstance(node, list):
            return [strip(v, prefix) for v in node]
        return node

    blob = json.dumps(strip(config, ""), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def wandb_mode(requested: str = "auto") -> str:
    """``auto`` goes online only with credentials: never an interactive login prompt, never a hang."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def log_to_wandb(experiment, summary: dict, artifact_dir: str | Path | None = None) -> None:
    """Make a run comparable in a dashboard without manual work.

    The whole summary goes into the run config (``skeleton_summary``, which ``skeleton-tables
    --wandb`` reads back); the pruning curve becomes a table with a line plot; the neurons kept per
    layer an image; the skeleton an artifact (offline runs upload it with ``wandb sync``).
    """
    import wandb

    experiment.config.update({"skeleton_summary": summary}, allow_val_change=True)
    if "curve" not in summary:
        return
    title = f"{summary['task']} pruning curve (search split, {summary['headline_metric']})"
    table = wandb.Table(data=[list(point) for point in summary["curve"]], columns=["rate", "score"])
    logged = {"skeleton/curve": wandb.plot.line(table, "rate", "score", title=title)}
    image = kept_per_layer_image(summary)
    if image is not None:
        logged["skeleton/kept_per_layer"] = wandb.Image(image)
    experiment.log(logged)
    if artifact_dir and Path(artifact_dir).exists():
        name = f"skeleton-{summary['task']}-{summary['model']}-s{summary['seed']}-psi{summary['psi']}"
        artifact = wandb.Artifact(name.replace("/", "-"), type="skeleton", metadata={"rate": summary["rate"]})
        artifact.add_dir(str(artifact_dir))
        experiment.log_artifact(artifact)


def kept_per_layer_image(summary: dict):
    """A bar chart of the FFN neurons kept in each layer, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    kept, total = summary["ffn"]["kept_per_layer"], summary["ffn"]["total_per_layer"]
    fig = Figure(figsize=(max(3.0, 0.5 * len(kept)), 2.5))
    ax = fig.add_subplot()
    ax.bar(range(len(total)), total, color="#dddddd", label="dense")
    ax.bar(range(len(kept)), kept, color="#3b75af", label="kept")
    ax.set(xlabel="layer", ylabel="FFN neurons", title=f"{summary['task']}: rate {summary['rate']:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
