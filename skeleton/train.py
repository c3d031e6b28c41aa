"""One run, start to finish: validate, prompt-tune (or reuse a converged prompt), localize + prune, test,
write the RunSummary and the skeleton artifact. The command line is ``skeleton.cli.train``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from skeleton import runs
from skeleton.callback import SkeletonCallback
from skeleton.configs import register_resolvers
from skeleton.export import save_skeleton
from skeleton.fingerprints import differences, run_fingerprints
from skeleton.localize import check_adapter
from skeleton.localize.config import SkeletonConfig
from skeleton.loggers import build_loggers, log_summary
from skeleton.pipeline import SkeletonResult
from skeleton.progress import quiet_lightning
from skeleton.reuse import PromptCache
from skeleton.summary import Measured, RunSummary
from skeleton.tasks import get_task
from skeleton.verbalizer import check_head

register_resolvers()  # train() may be called from Python on a config composed elsewhere
CHECKPOINTS = "checkpoints"  # Lightning checkpoints of a run, apart from the skeleton artifact


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra output folder, or ``cfg.run_dir`` when called outside Hydra (notebooks, tests)."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def skeleton_config(cfg: DictConfig) -> SkeletonConfig | None:
    """The validated ``skeleton`` settings (None: prompt tuning only). Called first in every run."""
    node = cfg.get("skeleton")
    if not node or not node.get("enabled", False):
        return None
    return SkeletonConfig.from_dict(OmegaConf.to_container(node, resolve=True))


def check_module(cfg: DictConfig) -> None:
    """``module.head`` and ``module.verbalizer`` (a known head, label words that fit the task, a template
    with one ``{mask}``), checked with the other settings before any data or model is loaded."""
    module = cfg.get("module") or {}
    verbalizer = module.get("verbalizer")
    verbalizer = OmegaConf.to_container(verbalizer, resolve=True) if verbalizer is not None else None
    check_head(
        module.get("head", "linear"), verbalizer, get_task(cfg.task.name), module.get("head_hidden", 0)
    )


def build_callbacks(cfg: DictConfig, run_dir: Path | None = None, has_logger: bool = True) -> list:
    """The ``callbacks`` group, fitted to the run: a callback set to null (``early_stopping: null``) is off,
    the LR monitor is dropped without a logger (it raises), checkpoints go to ``run_dir/checkpoints``
    (else Lightning puts them under the logger's folder, which for W&B is ``run_dir/skeleton``)."""
    built = []
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        callback = instantiate(node)
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            continue
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None and run_dir is not None:
            callback.dirpath = str(Path(run_dir).resolve() / CHECKPOINTS)
        built.append(callback)
    return built


def train(cfg: DictConfig) -> RunSummary | None:
    """One run. Returns the summary it wrote (or the one a finished run had written), or None when
    another process holds the run folder."""
    settings = skeleton_config(cfg)  # bad settings fail here, before any data, model or Trainer
    check_module(cfg)
    run_dir = run_dir_of(cfg)
    try:
        with runs.run_lock(run_dir):
            return _train_in(run_dir, cfg, settings)
    except runs.RunBusyError as busy:
        print(f"skipping: {busy}")
        return None


def _train_in(run_dir: Path, cfg: DictConfig, settings: SkeletonConfig | None) -> RunSummary:
    run_started = time.perf_counter()
    expected = run_fingerprints(cfg)
    finished = finished_run(run_dir, cfg, expected)
    if finished is not None:
        return finished
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    quiet_lightning()
    datamodule = instantiate(cfg.data)
    datamodule.validate()  # every split the run needs is there and non-empty, before any training
    model = instantiate(cfg.module)
    if settings is not None:  # the adapter finds, masks and slices this family correctly: seconds, not hours
        check_adapter(model.backbone, require_heads=settings.pruning.head_rate > 0)
    loggers = build_loggers(cfg, run_dir)  # W&B starts (or fails over to offline) before training
    cache = None
    if settings is not None and cfg.get("reuse", True):
        identity = {"data": expected["data"], "backbone_sha256": model.backbone_identity()["sha256"]}
        cache = PromptCache(cfg, cfg.paths.cache_dir, **identity, skeleton=settings.to_dict())
    skeleton = SkeletonCallback(settings, cache, cfg.paths.cache_dir) if settings is not None else None
    callbacks = build_callbacks(cfg, run_dir, has_logger=bool(loggers))
    callbacks += [skeleton] if skeleton is not None else []
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    # The lock makes parallel runs of one prompt wait for its first training; under DDP rank 0 would
    # hold it while rank 1 starts and waits for it, so multi-process runs skip it.
    locking = cache is not None and trainer.world_size == 1
    with cache.lock() if locking else nullcontext():
        if cache is not None and cache.has_prompt():
            train_info = reuse_prompt(cache, model, datamodule, trainer, skeleton)
            search_scores = skeleton.result.dense.search
        else:
            started = time.perf_counter()
            trainer.fit(model, datamodule=datamodule)
            ended = skeleton.fit_ended_at if skeleton is not None and skeleton.fit_ended_at else None
            train_info = train_stats(trainer, (ended or time.perf_counter()) - started)
            search_scores = stage_metrics(trainer.callback_metrics, "search")
            if cache is not None and cache.has_prompt():
                cache.update_meta({"train": train_info})

    result = skeleton.result if skeleton is not None else None
    best = "best" if result is None and getattr(trainer.checkpoint_callback, "best_model_path", "") else None
    dev_scores = stage_metrics(
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0], "dev"
    )

    summary = base_summary(cfg, model, run_dir, train_info, Measured(search_scores, dev_scores))
    summary.fingerprints = expected
    if result is not None:
        summary.skeleton = result.outcome
        summary.dense = result.dense  # measured on the restored best prompt, before pruning
        if cfg.get("save_artifact", True) and trainer.is_global_zero:
            result.outcome.artifact = str(save_artifact(model, result, run_dir / "skeleton"))
    summary.wall_seconds = round(time.perf_counter() - run_started, 1)
    if trainer.is_global_zero:
        runs.write_summary(run_dir, summary)  # before any remote logging: a logging failure loses nothing
        log_summary(trainer.loggers, summary, trainer.global_step)
    return summary


def finished_run(run_dir: Path, cfg: DictConfig, expected: dict) -> RunSummary | None:
    """The run's summary when it is complete and was made from the same config, data and backbone;
    a complete summary made from anything else is set aside (kept) and the run redone."""
    if not cfg.get("skip_completed", True):
        return None
    done = runs.read_summary(run_dir)
    if done is None or not done.complete:
        return None
    changed = differences(done.fingerprints, expected)
    if not changed:
        print(f"skipping: {run_dir} already holds a complete summary.json")
        return done
    kept = runs.set_aside(run_dir)
    print(
        f"rerunning {run_dir}: its summary was made with another {' and '.join(changed)} (kept as {kept.name})"
    )
    return None


def reuse_prompt(cache: PromptCache, model, datamodule, trainer, skeleton: SkeletonCallback) -> dict:
    """Skip training: load the converged prompt (and scores, if cached) and run the Skeleton step."""
    meta = cache.load_prompt(model)
    print(f"reusing the converged prompt {cache.prompt_key} from {cache.folder} (no training)")
    skeleton.run(trainer, model, datamodule)
    return {**meta.get("train", {}), "reused_prompt": cache.prompt_key}


def save_artifact(model, result: SkeletonResult, path: Path) -> Path:
    out = result.outcome
    return save_skeleton(
        model,
        path,
        keep_ffn=result.keep_ffn,
        keep_heads=result.keep_heads,
        dense_identity=result.dense_identity,
        compensation=result.compensation,
        extra={
            "rate": out.rate,
            "psi": out.psi,
            "headline": result.headline,
            "dev": out.pruned.dev,
            "criterion": out.criterion,
        },
    )


def stage_metrics(metrics: dict, stage: str) -> dict[str, float]:
    """``{"search/accuracy": t}`` -> ``{"accuracy": 0.9}`` for one stage, without the loss."""
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


def base_summary(cfg, model, run_dir: Path, train_info: dict, dense: Measured) -> RunSummary:
    task = model.task
    return RunSummary(
        task=task.name,
        benchmark=task.benchmark,
        model=cfg.model.name,
        backbone=cfg.model.backbone,
        seed=int(cfg.seed),
        sweep=cfg.get("sweep_name"),
        headline_metric=task.headline,
        search_from=cfg.data.get("search_from", "train"),
        run_dir=str(run_dir),
        params=model.parameter_counts(),
        train=train_info,
        dense=dense,
    )
