"""SkeletonCallback: the Lightning glue around ``skeleton.pipeline``.

When fit ends (also by early stopping) it restores the best prompt, caches it, runs the pipeline on this
rank's share with sums reduced over ranks, and logs the outcome. The method itself is in the pipeline.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from skeleton.localize.config import SkeletonConfig
from skeleton.loggers import safely
from skeleton.pipeline import SkeletonResult, run_skeleton
from skeleton.progress import reporter
from skeleton.recovery import trainer_recovery


class SkeletonCallback(Callback):
    def __init__(self, config: SkeletonConfig | None = None, cache=None, cost_cache: str | None = None):
        self.config = config or SkeletonConfig()
        self.cache = cache  # a skeleton.reuse.PromptCache: prompt + scores shared across margins
        self.cost_cache = cost_cache  # folder for measured latency models (paths.cache_dir)
        self.result: SkeletonResult | None = None
        self.fit_ended_at: float | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_ended_at = time.perf_counter()  # training time excludes the Skeleton step
        if trainer.interrupted:
            return
        if self.config.restore_best:
            restore_best_prompt(trainer, pl_module)
        if self.cache is not None and trainer.is_global_zero:
            self.cache.save_prompt(pl_module, {"steps": trainer.global_step, "epochs": trainer.current_epoch})
        self.run(trainer, pl_module, trainer.datamodule)

    def run(self, trainer: L.Trainer, model: L.LightningModule, datamodule) -> SkeletonResult:
        """The pipeline on this trainer's ranks, with cached scores when there are any; then log."""
        scores = self.cache.load_scores() if self.cache is not None else None
        self.result = run_skeleton(
            model,
            datamodule,
            self.config,
            scores=scores,
            shard=(trainer.global_rank, trainer.world_size),
            reduce=_sum_over_ranks(trainer),
            recover=trainer_recovery(datamodule, self.config.recovery, trainer),
            report=reporter(trainer),
            cost_cache=self.cost_cache,
        )
        if self.result.scored and self.cache is not None and trainer.is_global_zero:
            self.cache.save_scores(self.result.scores)
        safely(lambda: log_result(trainer, self.result), "logging the Skeleton step", reporter(trainer))
        return self.result


def _sum_over_ranks(trainer: L.Trainer):
    if trainer.world_size == 1:
        return None
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def log_result(trainer: L.Trainer, result: SkeletonResult) -> None:
    out, headline = result.outcome, result.headline
    metrics = {
        "skeleton/rate": out.rate,
        "skeleton/speedup": out.latency.speedup,
        "skeleton/ffn_kept": float(sum(out.ffn.kept_per_layer)),
        "skeleton/params_encoder": float(out.backbone_params.pruned.get("encoder", 0)),
        "skeleton/attribution_s": out.seconds["attribution"],
        "skeleton/search_s": out.seconds["search"],
    }
    if "reconstruct" in out.seconds:
        metrics["skeleton/reconstruct_s"] = out.seconds["reconstruct"]
    if out.modelled_speedup is not None:
        metrics["skeleton/modelled_speedup"] = out.modelled_speedup
    for split, drop in out.drops.items():
        metrics[f"skeleton/{split}_drop"] = drop["drop"]
        if drop.get("se") is not None:
            metrics[f"skeleton/{split}_drop_se"] = drop["se"]
    for stage, measured in (("dense", result.dense), ("pruned", out.pruned)):
        metrics[f"skeleton/{stage}_search"] = measured.search[headline]
        metrics[f"skeleton/{stage}_dev"] = measured.dev[headline]
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def restore_best_prompt(trainer: L.Trainer, model: L.LightningModule) -> None:
    """Reload the best checkpoint's prompt and head (a checkpoint never holds the backbone)."""
    path = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if not path or not Path(path).exists():
        return
    state = torch.load(path, map_location=model.device, weights_only=True)["state_dict"]
    model.load_trained_state(state, source=path)
