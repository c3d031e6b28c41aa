"""Hydra entry point: compose, instantiate, prompt-tune, (localize + prune), test, write the summary.

skeleton-train experiment=quickstart
skeleton-train task=rte model=minilm skeleton.psi=0.02 seed=1
skeleton-train -m task=sst2,rte skeleton.psi=0.01,0.02      # a sweep; reruns skip finished runs
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from skeleton import runs
from skeleton.callback import SkeletonCallback
from skeleton.reuse import PromptCache

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(ROOT / "conf")
OmegaConf.register_new_resolver("skeleton_root", lambda: str(ROOT), replace=True)
OmegaConf.register_new_resolver("short_dirname", runs.short_dirname, replace=True)


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra output folder, or ``cfg.run_dir`` when called outside Hydra (notebooks, tests)."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        node = OmegaConf.to_container(node, resolve=True)
        if name == "wandb":
            mode = runs.wandb_mode(node.pop("mode", "auto"))
            if mode == "disabled":
                continue
            node.update(mode=mode, save_dir=str(run_dir), name=run_dir.name, dir=str(run_dir))
            node["group"] = node.get("group") or cfg.get("sweep_name")
            node["tags"] = sorted({*node.get("tags", []), *run_tags(cfg)})
            node["config"] = OmegaConf.to_container(cfg, resolve=True)  # the resolved config, searchable
        else:
            node["save_dir"] = str(run_dir)
        # built directly, not through instantiate: the resolved config it carries holds _target_ keys
        loggers.append(get_class(node.pop("_target_"))(**node))
    return loggers


def run_tags(cfg: DictConfig) -> list[str]:
    """Tags that let a W&B dashboard group runs without manual work."""
    tags = [f"task:{cfg.task.name}", f"model:{cfg.model.name}", f"seed:{cfg.seed}"]
    if cfg.get("skeleton") and cfg.skeleton.get("enabled", False):
        tags += [f"psi:{cfg.skeleton.psi}", f"criterion:{cfg.skeleton.attribution.criterion}"]
    return [*tags, *cfg.get("tags", [])]


def build_callbacks(cfg: DictConfig) -> list:
    # A callback set to null in an experiment (e.g. early_stopping: null) is switched off.
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if cfg.get("skeleton") and cfg.skeleton.get("enabled", False):
        callbacks.append(SkeletonCallback.from_config(cfg.skeleton))
    return callbacks


def train(cfg: DictConfig) -> dict:
    """One run, start to finish. Returns the summary it wrote."""
    run_started = time.perf_counter()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("skip_completed", True) and runs.is_complete(run_dir):
        print(f"skipping: {run_dir} already holds a complete summary.json")
        return runs.read_summary(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.module)
    callbacks = build_callbacks(cfg)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg, run_dir), default_root_dir=str(run_dir)
    )
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    skeleton = next((c for c in callbacks if isinstance(c, SkeletonCallback)), None)
    cache = PromptCache(cfg, cfg.paths.cache_dir) if skeleton is not None and cfg.get("reuse", True) else None
    if skeleton is not None:
        skeleton.cache = cache

    # The lock makes parallel runs of one prompt wait for its first training; under DDP rank 0 would
    # hold it while rank 1 starts and waits for it, so multi-process runs skip it.
    locking = cache is not None and trainer.world_size == 1
    with cache.lock() if locking else nullcontext():
        if cache is not None and cache.has_prompt():
            train_info = reuse_prompt(cache, model, datamodule, trainer, skeleton)
            search_scores = skeleton.result.dense["search"]
        else:
            started = time.perf_counter()
            trainer.fit(model, datamodule=datamodule)
            ended = skeleton.fit_ended_at if skeleton is not None and skeleton.fit_ended_at else None
            train_info = train_stats(trainer, (ended or time.perf_counter()) - started)
            search_scores = stage_metrics(trainer.callback_metrics, "val")
            if cache is not None and cache.has_prompt():
                cache.update_meta({"train": train_info})

    pruned = skeleton is not None and skeleton.result is not None
    best = "best" if not pruned and getattr(trainer.checkpoint_callback, "best_model_path", "") else None
    dev_scores = stage_metrics(
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0], "test"
    )

    summary = base_summary(cfg, model, run_dir, train_info)
    summary["dense"] = {"search": search_scores, "dev": dev_scores}
    if pruned:
        summary.update(skeleton.summary())
        summary["dense"] = skeleton.result.dense  # measured on the restored best prompt, before pruning
        if cfg.get("save_artifact", True) and trainer.is_global_zero:
            summary["artifact"] = str(skeleton.save_artifact(model, run_dir / "skeleton"))
    summary["wall_seconds"] = round(time.perf_counter() - run_started, 1)
    if trainer.is_global_zero:
        runs.write_summary(run_dir, summary)
        log_summary(trainer, summary)
    return summary


def stage_metrics(metrics: dict, stage: str) -> dict[str, float]:
    """``{"val/accuracy": t}`` -> ``{"accuracy": 0.9}`` for one stage, without the loss."""
    prefix = f"{stage}/"
    return {
        k[len(prefix) :]: float(v)
        for k, v in metrics.items()
        if k.startswith(prefix) and k != f"{prefix}loss"
    }


def train_stats(trainer, seconds: float) -> dict:
    steps = trainer.global_step
    return {
        "seconds": round(seconds, 2),
        "steps": steps,
        "epochs": trainer.current_epoch,
        "seconds_per_step": round(seconds / max(steps, 1), 4),
    }


def reuse_prompt(cache: PromptCache, model, datamodule, trainer, skeleton: SkeletonCallback) -> dict:
    """Skip training: load the converged prompt (and scores, if cached) and run the Skeleton step."""
    meta = cache.load_prompt(model)
    print(f"reusing the converged prompt {cache.prompt_key} from {cache.folder} (no training)")
    datamodule.setup("fit")
    skeleton.result = skeleton.localize(model, datamodule, trainer)
    skeleton.log_result(trainer)
    return {**meta.get("train", {}), "reused_prompt": cache.prompt_key}


def base_summary(cfg, model, run_dir: Path, train_info: dict) -> dict:
    task = model.task
    return {
        "task": task.name,
        "benchmark": task.benchmark,
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "seed": int(cfg.seed),
        "sweep": cfg.get("sweep_name"),
        "headline_metric": task.headline,
        "search_from": cfg.data.get("search_from", "train"),
        "run_dir": str(run_dir),
        "params": model.parameter_counts(),
        "train": train_info,
    }


def log_summary(trainer, summary: dict) -> None:
    flat = {}
    for split in ("search", "dev"):
        for stage in ("dense", "pruned"):
            value = summary.get(stage, {}).get(split, {}).get(summary["headline_metric"])
            if value is not None:
                flat[f"summary/{stage}_{split}"] = value
    for key in ("rate", "speedup"):
        if key in summary:
            flat[f"summary/{key}"] = summary[key]
    for logger in trainer.loggers:
        logger.log_metrics(flat, step=trainer.global_step)
        if isinstance(logger, WandbLogger):
            runs.log_to_wandb(logger.experiment, summary, summary.get("artifact"))
        logger.finalize("success")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = run_dir_of(cfg)
    try:
        summary = train(cfg)
    except Exception as error:
        path = runs.record_failure(run_dir, error)
        print(f"run failed; the error is recorded in {path}")
        if not _in_multirun():
            raise
        return None
    print(f"run folder: {run_dir}")
    print(f"summary:    {run_dir / runs.SUMMARY}")
    headline = summary["headline_metric"]
    stage = "pruned" if "pruned" in summary else "dense"
    return summary[stage]["dev"].get(headline)


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


if __name__ == "__main__":
    main()
