"""Experiment loggers of a run: built from the ``logger`` config group, fed from the RunSummary.

W&B goes online only with credentials (never an interactive login prompt); the whole summary goes into
the run config under ``skeleton_summary``, which ``skeleton-tables --wandb`` reads back.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.utils import get_class
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from skeleton.summary import WANDB_KEY, RunSummary


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        if name == "wandb":
            mode = wandb_mode(node.pop("mode", "auto"))
            if mode == "disabled":
                continue
            node.update(mode=mode, save_dir=str(run_dir), name=run_dir.name, dir=str(run_dir))
            node["group"] = node.get("group") or cfg.get("sweep_name")
            node["tags"] = sorted({*node.get("tags", []), *run_tags(cfg)})
            node["config"] = OmegaConf.to_container(cfg, resolve=True)  # the resolved config, searchable
        else:
            node["save_dir"] = str(run_dir)
        # built directly, not through instantiate: the resolved config it carries holds _target_ keys
        loggers.append(without_anonymous(get_class(node.pop("_target_"))(**node)))
    return loggers


def without_anonymous(logger):
    """Lightning always hands W&B an ``anonymous`` setting, which W&B then warns has no effect."""
    if isinstance(logger, WandbLogger):
        logger._wandb_init.pop("anonymous", None)
    return logger


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags that let a W&B dashboard group runs without manual work."""
    tags = [f"task:{cfg.task.name}", f"model:{cfg.model.name}", f"seed:{cfg.seed}"]
    if cfg.get("skeleton") and cfg.skeleton.get("enabled", False):
        tags += [f"psi:{cfg.skeleton.psi}", f"criterion:{cfg.skeleton.attribution.criterion}"]
    return [*tags, *cfg.get("tags", [])]


def log_summary(loggers: list, run: RunSummary, step: int) -> None:
    """The headline numbers as metrics, the whole summary (and the artifact) to W&B; then finalize."""
    flat = {}
    for split in ("search", "dev"):
        for stage in ("dense", "pruned"):
            value = run.score(stage, split)
            if value is not None:
                flat[f"summary/{stage}_{split}"] = value
    if run.skeleton is not None:
        flat["summary/rate"] = run.skeleton.rate
        flat["summary/speedup"] = run.skeleton.latency.speedup
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger.experiment, run)
        logger.finalize("success")


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


def log_to_wandb(experiment, run: RunSummary) -> None:
    """Make a run comparable in a dashboard without manual work.

    The whole summary goes into the run config (``skeleton_summary``, which ``skeleton-tables
    --wandb`` reads back); the pruning curve becomes a table with a line plot; the neurons kept per
    layer an image; the skeleton an artifact (offline runs upload it with ``wandb sync``).
    """
    import wandb  # only where W&B is used: importing it costs seconds

    experiment.config.update({WANDB_KEY: run.to_dict()}, allow_val_change=True)
    outcome = run.skeleton
    if outcome is None:
        return
    title = f"{run.task} pruning curve (search split, {run.headline_metric})"
    table = wandb.Table(data=[list(point) for point in outcome.curve], columns=["rate", "score"])
    logged = {"skeleton/curve": wandb.plot.line(table, "rate", "score", title=title)}
    image = kept_per_layer_image(run)
    if image is not None:
        logged["skeleton/kept_per_layer"] = wandb.Image(image)
    experiment.log(logged)
    if outcome.artifact and Path(outcome.artifact).exists():
        name = f"skeleton-{run.task}-{run.model}-s{run.seed}-psi{outcome.psi}"
        artifact = wandb.Artifact(name.replace("/", "-"), type="skeleton", metadata={"rate": outcome.rate})
        artifact.add_dir(outcome.artifact)
        experiment.log_artifact(artifact)


def kept_per_layer_image(run: RunSummary):
    """A bar chart of the FFN neurons kept in each layer, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    kept, total = run.skeleton.ffn.kept_per_layer, run.skeleton.ffn.total_per_layer
    fig = Figure(figsize=(max(3.0, 0.5 * len(kept)), 2.5))
    ax = fig.add_subplot()
    ax.bar(range(len(total)), total, color="#dddddd", label="dense")
    ax.bar(range(len(kept)), kept, color="#3b75af", label="kept")
    ax.set(xlabel="layer", ylabel="FFN neurons", title=f"{run.task}: rate {run.skeleton.rate:.2f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
