"""Experiment loggers of a run: built from the ``logger`` config group, fed from the RunSummary.

W&B goes online only with credentials (never an interactive login prompt); the whole summary goes into
the run config under ``skeleton_summary``, which ``skeleton-tables --wandb`` reads back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.utils import get_class
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from skeleton.summary import WANDB_KEY, RunSummary


class LoggerConfigError(ValueError):
    """A logger setting that cannot work here (online W&B without credentials)."""


def build_loggers(cfg: DictConfig, run_dir: Path, report=print) -> list:
    """The run's loggers, W&B already started: a W&B that cannot start fails over to offline before
    training, never after it."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        if name == "wandb":
            mode = wandb_mode(node.pop("mode", "auto"))
            if mode == "disabled":
                continue
            timeout = float(node.pop("init_timeout", 30))
            node.update(mode=mode, save_dir=str(run_dir), name=run_dir.name, dir=str(run_dir))
            node["group"] = node.get("group") or cfg.get("sweep_name")
            node["tags"] = sorted({*node.get("tags", []), *run_tags(cfg)})
            node["config"] = OmegaConf.to_container(cfg, resolve=True)  # the resolved config, searchable
            loggers.append(start_wandb(node, timeout, run_dir, report))
            continue
        node["save_dir"] = str(run_dir)
        # built directly, not through instantiate: the resolved config it carries holds _target_ keys
        loggers.append(get_class(node.pop("_target_"))(**node))
    return loggers


def without_anonymous(logger):
    """Lightning always hands W&B an ``anonymous`` setting, which W&B then warns has no effect."""
    if isinstance(logger, WandbLogger):
        logger._wandb_init.pop("anonymous", None)
    return logger


def start_wandb(node: dict, timeout: float, run_dir: Path, report=print):
    """Start the W&B run now, bounded by ``timeout`` seconds; offline (synced later) if it cannot."""
    import wandb  # only where W&B is used: importing it costs seconds

    kind = get_class(node.pop("_target_"))
    logger = without_anonymous(kind(**node, settings=wandb.Settings(init_timeout=timeout)))
    if node["mode"] != "online":
        return logger
    try:
        logger.experiment  # noqa: B018  (wandb.init happens here)
        return logger
    except Exception as err:
        wandb.finish(exit_code=1)
        report(
            f"WARNING: W&B could not start online within {timeout:.0f}s ({type(err).__name__}: {err}); "
            f"logging offline into {run_dir / 'wandb'}. Upload it later with: wandb sync {run_dir}/wandb/offline-run-*"
        )
        return without_anonymous(kind(**{**node, "mode": "offline"}))


def safely(action, what: str, report=print) -> None:
    """Run a logging call; a failure is reported, never allowed to lose the run's results."""
    try:
        action()
    except Exception as err:
        report(f"WARNING: {what} failed ({type(err).__name__}: {err}); the run's results are on disk")


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
        safely(lambda logger=logger: _log_all(logger, flat, run, step), f"logging to {type(logger).__name__}")


def _log_all(logger, flat: dict, run: RunSummary, step: int) -> None:
    try:
        logger.log_metrics(flat, step=step)
        if isinstance(logger, WandbLogger):
            log_to_wandb(logger.experiment, run)
        logger.finalize("success")
    finally:
        if isinstance(logger, WandbLogger):
            # Lightning leaves the W&B run open (also when an upload failed); the next run of a sweep
            # in this process would log into it
            finish_wandb(exit_code=0)


def finish_wandb(exit_code: int) -> None:
    """Close a W&B run left open by a run that failed, so the next run of a sweep gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(requested: str = "auto") -> str:
    """``auto`` follows WANDB_MODE when it is set, else goes online only with credentials: never an
    interactive login prompt, never a hang. Online without credentials fails now, naming the fix."""
    if requested not in MODES:
        raise LoggerConfigError(
            f"logger.wandb.mode={requested!r} is unknown; choose one of: {', '.join(MODES)}"
        )
    mode = requested if requested != "auto" else os.environ.get("WANDB_MODE") or "auto"
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    if mode == "online" and not has_wandb_credentials():
        where = "WANDB_MODE=online" if requested == "auto" else "logger.wandb.mode=online"
        raise LoggerConfigError(
            f"{where} but no W&B credentials are set: export WANDB_API_KEY=... or run `wandb login`, "
            "or log offline (logger.wandb.mode=offline, WANDB_MODE=offline) or not at all (logger=csv)"
        )
    return mode


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


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
