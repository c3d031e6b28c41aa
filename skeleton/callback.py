"""SkeletonCallback: the one place that ties attribution, search and pruning to the Lightning Trainer.

After the prompt has converged (end of fit, also when early stopping fires) it restores the best
prompt, scores the FFN neurons on a training sample, searches the largest pruning rate whose
search-split score stays within psi points of the dense score, prunes the backbone in place,
and measures what that bought: scores on search and dev, parameters, FLOPs, latency.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from skeleton.evaluate import evaluate, is_degenerate
from skeleton.localize import (
    Scores,
    backbone_flops,
    count_parameters,
    ffn_widths,
    masked_evaluator,
    prune_ffn,
    prune_heads,
    rounds_of,
    score_iteratively,
    score_neurons,
    search_pruning_rate,
    select_heads,
    select_neurons,
)

log = logging.getLogger(__name__)

DEGENERATE = (
    "the dense prompt-tuned model gives every search example the same answer: it has not learned the "
    "task, so any pruning rate keeps its score and the chosen rate means nothing. Train longer "
    "(trainer.max_steps) or raise prompt.lr / module.head_lr."
)


@dataclass
class AttributionConfig:
    criterion: str = "attribution"  # attribution | activation | gradient | magnitude | random
    target: str = "logprob"  # logit | logprob | loss
    token_agg: str = "mean"  # mean | max | sum
    magnitude: str = "token"  # token: agg(|a*g|) ; instance: |agg(a*g)|
    max_instances: int = 512
    unsupervised: bool = False
    heads: bool = False
    # Aggregate over the soft prompt positions too: pruning removes a neuron there as well, and
    # first-layer neurons that only work on the prompt score ~0 otherwise (SST-2: dropping the
    # lowest 1% then cost 3 dev points; with the prompt counted, nothing).
    include_prompt: bool = True
    # Re-score under the mask of the lowest 10%, 20%, ... up to iterative_until (0 = score once, as in
    # the papers): neurons' roles shift as others go. See skeleton/localize/iterative.py.
    iterative_step: float = 0.1
    iterative_until: float = 0.8


@dataclass
class PruningConfig:
    scope: str = "global"  # global | layer
    min_per_layer: int = 0
    round_to: int = 1
    head_rate: float = 0.0  # fraction of attention heads to remove (needs attribution.heads=true)


@dataclass
class SearchConfig:
    granularity: float = 0.01
    max_rate: float = 0.99
    lookahead: int = 2


@dataclass
class RecoveryConfig:
    steps: int = 0  # >0: tune prompt + head again on the pruned (still frozen) backbone
    lr: float = 1e-2


@dataclass
class BenchmarkConfig:
    batch_size: int = 32
    repeats: int = 10


@dataclass
class SkeletonResult:
    """Everything the run summary reports about localization and pruning."""

    psi: float
    headline: str
    rate: float
    dense: dict
    pruned: dict
    curve: list
    keep_ffn: list = field(repr=False)
    keep_heads: list | None = field(default=None, repr=False)
    recovered: dict | None = None
    widths_before: list = field(default_factory=list)
    widths_after: list = field(default_factory=list)
    params_before: dict = field(default_factory=dict)
    params_after: dict = field(default_factory=dict)
    flops_before: float = 0.0
    flops_after: float = 0.0
    latency: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    dense_identity: dict = field(default_factory=dict)
    scores: Scores | None = field(default=None, repr=False)
    warnings: list = field(default_factory=list)


class SkeletonCallback(Callback):
    def __init__(
        self,
        psi: float = 1.0,
        attribution: AttributionConfig | None = None,
        pruning: PruningConfig | None = None,
        search: SearchConfig | None = None,
        recovery: RecoveryConfig | None = None,
        benchmark: BenchmarkConfig | None = None,
        restore_best: bool = True,
    ):
        if psi < 0:
            raise ValueError(
                f"skeleton.psi={psi} is impossible: it is the allowed drop in points, use psi >= 0"
            )
        self.psi = psi
        self.attribution = attribution or AttributionConfig()
        try:  # fail before training, not after it
            rounds_of(self.attribution.iterative_step, self.attribution.iterative_until)
        except ValueError as err:
            raise ValueError(f"skeleton.attribution: {err}") from None
        self.pruning = pruning or PruningConfig()
        self.search = search or SearchConfig()
        self.recovery = recovery or RecoveryConfig()
        self.benchmark = benchmark or BenchmarkConfig()
        self.restore_best = restore_best
        self.result: SkeletonResult | None = None
        self.cache = None  # a skeleton.reuse.PromptCache: share prompt + scores across margins
        self.fit_ended_at: float | None = None

    @classmethod
    def from_config(cls, cfg) -> SkeletonCallback:
        """Build from the ``skeleton`` config group (unknown keys fail loudly, naming the key)."""
        sections = {
            "attribution": AttributionConfig,
            "pruning": PruningConfig,
            "search": SearchConfig,
            "recovery": RecoveryConfig,
            "benchmark": BenchmarkConfig,
        }
        kwargs = {name: kind(**dict(cfg.get(name) or {})) for name, kind in sections.items()}
        return cls(psi=float(cfg.psi), restore_best=bool(cfg.get("restore_best", True)), **kwargs)

    # ---- Lightning hooks ------------------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_ended_at = time.perf_counter()  # training time excludes the Skeleton step
        if trainer.interrupted:
            return
        if self.restore_best:
            restore_best_prompt(trainer, pl_module)
        if self.cache is not None and trainer.is_global_zero:
            self.cache.save_prompt(pl_module, {"steps": trainer.global_step, "epochs": trainer.current_epoch})
        self.result = self.localize(pl_module, trainer.datamodule, trainer)
        self.log_result(trainer)

    # ---- the method, usable without a Trainer (notebooks, cached prompts) ------------------
    def localize(self, model: nn.Module, datamodule, trainer: L.Trainer | None = None) -> SkeletonResult:
        backbone, headline = model.backbone, model.task.headline
        search_loader, dev_loader = datamodule.search_dataloader(), datamodule.dev_dataloader()
        say = _printer(trainer)
        dense_logits: list = []
        dense = {"search": evaluate(model, search_loader, dense_logits), "dev": evaluate(model, dev_loader)}
        warnings = []
        if is_degenerate(dense_logits, model.task.formulation):
            warnings.append(DEGENERATE)
            say(f"WARNING: {DEGENERATE}")
        say(f"dense {headline}: search {dense['search'][headline]:.4f}, dev {dense['dev'][headline]:.4f}")
        before = _shape_report(backbone)
        dense_identity = model.backbone_identity()

        started = time.perf_counter()
        scores = self.cache.load_scores() if self.cache is not None else None
        if scores is None:
            scores = self.score(model, datamodule, trainer)
            if self.cache is not None and (trainer is None or trainer.is_global_zero):
                self.cache.save_scores(scores)
        attribution_s = time.perf_counter() - started
        say(
            f"attribution ({self.attribution.criterion}) over {scores.num_instances} instances: "
            f"{attribution_s:.1f}s"
        )

        keep_heads = self._select_heads(scores)
        started = time.perf_counter()
        evaluate_rate = masked_evaluator(
            backbone,
            scores,
            lambda: evaluate(model, search_loader)[headline],
            scope=self.pruning.scope,
            min_per_layer=self.pruning.min_per_layer,
            round_to=self.pruning.round_to,
            head_keep=keep_heads,
        )
        if keep_heads is not None:
            heads_only = evaluate_rate(0.0)
            if heads_only < dense["search"][headline] - self.psi / 100.0:
                warnings.append(
                    f"pruning.head_rate={self.pruning.head_rate} alone drops the search {headline} to "
                    f"{heads_only:.4f} (dense {dense['search'][headline]:.4f}), beyond psi={self.psi}: "
                    "lower skeleton.pruning.head_rate"
                )
                say(f"WARNING: {warnings[-1]}")
        found = search_pruning_rate(
            evaluate_rate,
            dense["search"][headline],
            self.psi / 100.0,
            granularity=self.search.granularity,
            max_rate=self.search.max_rate,
            lookahead=self.search.lookahead,
            progress=lambda r, s, ok: say(
                f"  rate {r:.2f}: {headline} {s:.4f} {'ok' if ok else 'over margin'}"
            ),
        )
        search_s = time.perf_counter() - started
        say(
            f"search: largest rate within psi={self.psi} points is {found.rate:.2f} "
            f"({found.evaluations} evaluations, {search_s:.1f}s)"
        )

        dense_backbone = copy.deepcopy(backbone)
        keep_ffn = select_neurons(
            scores,
            found.rate,
            scope=self.pruning.scope,
            min_per_layer=self.pruning.min_per_layer,
            round_to=self.pruning.round_to,
        )
        prune_ffn(backbone, keep_ffn)
        if keep_heads is not None:
            prune_heads(backbone, keep_heads)
        pruned = {"search": evaluate(model, search_loader), "dev": evaluate(model, dev_loader)}
        latency = measure_speedup(model, dense_backbone, datamodule, self.benchmark)
        del dense_backbone
        after = _shape_report(backbone)
        say(
            f"pruned {headline}: search {pruned['search'][headline]:.4f}, dev {pruned['dev'][headline]:.4f}; "
            f"FFN kept {sum(after['widths'])}/{sum(before['widths'])}; speedup x{latency['speedup']:.2f}"
        )

        recovered, seconds = None, {"attribution": round(attribution_s, 2), "search": round(search_s, 2)}
        if self.recovery.steps > 0:
            started = time.perf_counter()
            recover_prompt(model, datamodule.train_dataloader(), self.recovery)
            recovered = {"search": evaluate(model, search_loader), "dev": evaluate(model, dev_loader)}
            seconds["recovery"] = round(time.perf_counter() - started, 2)
            say(
                f"after {self.recovery.steps} recovery steps ({seconds['recovery']:.0f}s): "
                f"search {recovered['search'][headline]:.4f}, dev {recovered['dev'][headline]:.4f}"
            )

        return SkeletonResult(
            psi=self.psi,
            headline=headline,
            rate=found.rate,
            dense=dense,
            pruned=pruned,
            curve=[list(point) for point in found.curve],
            keep_ffn=keep_ffn,
            keep_heads=keep_heads,
            recovered=recovered,
            widths_before=before["widths"],
            widths_after=after["widths"],
            params_before=before["params"],
            params_after=after["params"],
            flops_before=before["flops"],
            flops_after=after["flops"],
            latency=latency,
            seconds=seconds,
            dense_identity=dense_identity,
            warnings=warnings,
            scores=scores,
        )

    def score(self, model: nn.Module, datamodule, trainer: L.Trainer | None = None) -> Scores:
        """Attribution over this rank's share of the sample; sums are reduced over ranks under DDP.
        With iterative_step > 0, one pass per round under the previous rounds' mask."""
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        reduce_fn = None
        if world > 1:

            def reduce_fn(tensor: torch.Tensor) -> torch.Tensor:
                return trainer.strategy.reduce(tensor, reduce_op="sum")

        opts = asdict(self.attribution)
        max_instances = opts.pop("max_instances")
        step, until = opts.pop("iterative_step"), opts.pop("iterative_until")

        def score_once() -> Scores:
            return score_neurons(
                model,
                itertools.islice(datamodule.attribution_dataloader(), rank, None, world),
                max_instances=-(-max_instances // world),
                reduce_fn=reduce_fn,
                seed=getattr(model.hparams, "seed", 0),
                **opts,
            )

        if step == 0 or self.attribution.criterion in ("magnitude", "random"):  # data-free: nothing shifts
            return score_once()
        say = _printer(trainer)
        return score_iteratively(
            score_once,
            model.backbone,
            step=step,
            until=until,
            scope=self.pruning.scope,
            progress=lambda rate, _: say(f"  attribution re-scored with {rate:.0%} masked"),
        )

    def _select_heads(self, scores: Scores) -> list | None:
        """Heads kept at the fixed `pruning.head_rate` (None: no head pruning). Chosen before the search,
        which then masks them at every rate: the margin covers heads and FFN neurons together."""
        if self.pruning.head_rate <= 0:
            return None
        if scores.heads is None:
            raise ValueError(
                "skeleton.pruning.head_rate > 0 needs head scores: set skeleton.attribution.heads=true"
            )
        return select_heads(scores, self.pruning.head_rate, scope=self.pruning.scope)

    # ---- reporting ---------------------------------------------------------------------------
    def summary(self) -> dict:
        r = self.result
        summary = {
            "psi": r.psi,
            "rate": r.rate,
            "curve": r.curve,
            "pruned": r.pruned,
            "ffn": {
                "kept_per_layer": r.widths_after,
                "total_per_layer": r.widths_before,
                "kept_fraction": sum(r.widths_after) / max(sum(r.widths_before), 1),
            },
            "backbone_params": {"dense": r.params_before, "pruned": r.params_after},
            "flops": {
                "dense": r.flops_before,
                "pruned": r.flops_after,
                "ideal_speedup": r.flops_before / max(r.flops_after, 1.0),
            },
            "latency": r.latency,
            "speedup": r.latency.get("speedup"),
            "seconds": r.seconds,
            "warnings": r.warnings,
            "degenerate": DEGENERATE in r.warnings,  # the one warning that voids the rate (tables mark it)
            "criterion": self.attribution.criterion,
            "skeleton_config": {
                "attribution": asdict(self.attribution),
                "pruning": asdict(self.pruning),
                "search": asdict(self.search),
                "recovery": asdict(self.recovery),
            },
        }
        if r.recovered is not None:
            summary["recovered"] = r.recovered
        return summary

    def log_result(self, trainer: L.Trainer) -> None:
        r = self.result
        metrics = {
            "skeleton/rate": r.rate,
            "skeleton/speedup": r.latency["speedup"],
            "skeleton/ffn_kept": float(sum(r.widths_after)),
            "skeleton/params_encoder": float(r.params_after.get("encoder", 0)),
            "skeleton/attribution_s": r.seconds["attribution"],
            "skeleton/search_s": r.seconds["search"],
        }
        for stage in ("dense", "pruned"):
            for split in ("search", "dev"):
                metrics[f"skeleton/{stage}_{split}"] = r.__dict__[stage][split][r.headline]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def save_artifact(self, model: nn.Module, path: Path) -> Path:
        from skeleton.export import save_skeleton

        r = self.result
        return save_skeleton(
            model,
            path,
            keep_ffn=r.keep_ffn,
            keep_heads=r.keep_heads,
            dense_identity=r.dense_identity,
            extra={
                "rate": r.rate,
                "psi": r.psi,
                "headline": r.headline,
                "dev": r.pruned["dev"],
                "criterion": self.attribution.criterion,
            },
        )


def _shape_report(backbone: nn.Module) -> dict:
    """FFN widths, parameter counts and FLOPs per 128-token sequence: the before/after of pruning."""
    return {
        "widths": ffn_widths(backbone),
        "params": count_parameters(backbone),
        "flops": float(backbone_flops(backbone, 128)["total"]),
    }


def _printer(trainer: L.Trainer | None):
    """Progress lines on rank 0: logged (Hydra's job log sends them to the console and train.log),
    and printed as well only where no logging handler reaches the console (notebooks, plain scripts)."""
    echo = not _logs_reach_console(log)

    def say(message: str) -> None:
        if trainer is None or trainer.is_global_zero:
            if echo:
                print(f"[skeleton] {message}", flush=True)
            log.info(message)

    return say


def _logs_reach_console(logger: logging.Logger) -> bool:
    if not logger.isEnabledFor(logging.INFO):
        return False
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                return True
        node = node.parent if node.propagate else None
    return False


def restore_best_prompt(trainer: L.Trainer, model: nn.Module) -> None:
    """Reload the best checkpoint's prompt and head (the backbone is never in a checkpoint)."""
    path = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if not path or not Path(path).exists():
        return
    state = torch.load(path, map_location=model.device, weights_only=True)["state_dict"]
    model.load_state_dict(state, strict=False)


class _WithBackbone(nn.Module):
    """``model`` run on another backbone: the dense twin for interleaved latency timing."""

    def __init__(self, model: nn.Module, backbone: nn.Module):
        super().__init__()
        self.model, self.other = model, backbone

    def forward(self, batch: dict) -> torch.Tensor:
        own = self.model.backbone
        self.model.backbone = self.other
        try:
            return self.model(batch)
        finally:
            self.model.backbone = own


def measure_speedup(model: nn.Module, dense_backbone: nn.Module, datamodule, bench: BenchmarkConfig) -> dict:
    """Dense vs pruned on the same real dev batch, interleaved, medians (noise-robust on shared CPUs)."""
    from skeleton.bench import measure_latency
    from skeleton.evaluate import to_device

    batches = list(datamodule.dev_dataloader())  # sorted by length: the middle one is typical
    batch = first_examples(batches[len(batches) // 2], bench.batch_size)
    batch = to_device(batch, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        timings = measure_latency(
            {"dense": _WithBackbone(model, dense_backbone), "pruned": model}, batch, repeats=bench.repeats
        )
    finally:
        model.train(was_training)
    dense_ms, pruned_ms = timings["dense"]["median_ms"], timings["pruned"]["median_ms"]
    return {
        "batch_size": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "dense_ms": dense_ms,
        "pruned_ms": pruned_ms,
        "speedup": dense_ms / max(pruned_ms, 1e-9),
        "device": str(next(model.parameters()).device),
    }


def first_examples(batch: dict, n: int) -> dict:
    """The first ``n`` examples of a batch: ``n * num_choices`` backbone rows, ``n`` labels."""
    rows = batch["input_ids"].shape[0]
    choices = batch.get("num_choices", 1)
    keep = {rows: n * choices, rows // choices: n}

    def cut(value):
        if torch.is_tensor(value) and value.dim() and value.shape[0] in keep:
            return value[: keep[value.shape[0]]]
        return value

    return {k: cut(v) for k, v in batch.items()}


def recover_prompt(model: nn.Module, loader, cfg: RecoveryConfig) -> None:
    """A few more prompt/head steps on the pruned backbone (still frozen) to win back accuracy."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    device = next(model.parameters()).device
    model.train()
    with torch.enable_grad():
        _recovery_steps(model, loader, cfg, optimizer, device)
    model.eval()


def _recovery_steps(model, loader, cfg: RecoveryConfig, optimizer, device) -> None:
    from skeleton.evaluate import to_device
    from skeleton.heads import task_loss

    for batch in itertools.islice(itertools.cycle(loader), cfg.steps):
        batch = to_device(batch, device)
        loss = task_loss(model.task.formulation, model(batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
