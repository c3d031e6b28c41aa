"""The Skeleton method as named steps, without Lightning: usable from the callback, a notebook or a server.

    result = run_skeleton(model, datamodule, SkeletonConfig(psi=1.0))

measure the dense model -> score the neurons -> search the rate -> prune in place -> measure the pruned
model -> (recover). ``model`` is a ``PromptTunedModel`` (anything with ``backbone``, ``task``,
``forward(batch)``, ``backbone_identity()`` and ``on_backbone()``); ``data`` anything with
``search_dataloader()``, ``dev_dataloader()`` and ``attribution_dataloader()``. Distributed runs pass
their rank's ``shard`` and a ``reduce`` that sums over ranks; the Lightning glue in ``callback.py``
does that, and recovery, which trains, is handed in as ``recover`` so that it runs in a Trainer.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from skeleton.bench import measure_speedup
from skeleton.evaluate import evaluate, is_degenerate
from skeleton.localize import (
    Scores,
    backbone_flops,
    count_parameters,
    ffn_widths,
    masked_evaluator,
    prune_ffn,
    prune_heads,
    score_iteratively,
    score_neurons,
    search_pruning_rate,
    select_heads,
    select_neurons,
)
from skeleton.localize.config import SkeletonConfig, rounds_of
from skeleton.summary import FFNWidths, Flops, Latency, Measured, ParamCounts, SkeletonOutcome

Report = Callable[[str], None]
Reduce = Callable[[torch.Tensor], torch.Tensor]

DEGENERATE = (
    "the dense prompt-tuned model gives every search example the same answer: it has not learned the "
    "task, so any pruning rate keeps its score and the chosen rate means nothing. Train longer "
    "(trainer.max_steps) or raise prompt.lr / module.head_lr."
)
FLOPS_SEQ_LEN = 128  # tokens per sequence at which FLOPs are reported


class Eta:
    """``k/total, eta Ns`` for progress lines, from the mean time of the steps done so far."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.done, self.started = total, done, time.perf_counter()

    def step(self) -> str:
        self.done += 1
        left = max(self.total - self.done, 0) * (time.perf_counter() - self.started) / self.done
        return f"{self.done}/{self.total}, eta {left:.0f}s"


@dataclass
class SkeletonResult:
    """The outcome (what summary.json records) plus what only code needs: kept indices and scores."""

    outcome: SkeletonOutcome
    dense: Measured
    headline: str
    keep_ffn: list[torch.Tensor]
    keep_heads: list[torch.Tensor] | None
    dense_identity: dict
    scores: Scores
    scored: bool  # False when the caller passed the scores in (a cache hit)

    @property
    def rate(self) -> float:
        return self.outcome.rate


def run_skeleton(
    model: nn.Module,
    data,
    cfg: SkeletonConfig,
    *,
    scores: Scores | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    recover: Callable[[nn.Module], None] | None = None,
    report: Report = print,
) -> SkeletonResult:
    """Localize, prune ``model.backbone`` in place, and measure what that bought. ``shard`` is
    (rank, world size); ``recover(model)`` tunes prompt + head again when ``cfg.recovery.steps > 0``."""
    if cfg.recovery.steps > 0 and recover is None:
        raise ValueError(
            "skeleton.recovery.steps > 0 needs recover=... (see skeleton.recovery.trainer_recovery)"
        )
    headline = model.task.headline
    warnings: list[str] = []
    dense = measure_dense(model, data, warnings, report)
    identity, before = model.backbone_identity(), shape_report(model.backbone)

    started = time.perf_counter()
    scored = scores is None
    if scored:
        scores = score_model(model, data, cfg, shard=shard, reduce=reduce, report=report)
    attribution_s = time.perf_counter() - started
    report(
        f"attribution ({cfg.attribution.criterion}) over {scores.num_instances} instances: {attribution_s:.1f}s"
    )

    started = time.perf_counter()
    keep_heads = heads_to_keep(scores, cfg)
    rate, curve = search_rate(model, data, scores, keep_heads, dense, cfg, warnings, report)
    search_s = time.perf_counter() - started

    keep_ffn = neurons_to_keep(scores, rate, cfg)
    dense_backbone = copy.deepcopy(model.backbone)
    prune(model.backbone, keep_ffn, keep_heads)
    pruned = measure(model, data)
    latency = measure_speedup(model, dense_backbone, data.dev_dataloader(), cfg.benchmark)
    del dense_backbone
    if not latency["reliable"]:
        warnings.append(
            f"the speedup x{latency['speedup']:.2f} was timed on a busy machine (load {latency['load']} per core, "
            f"p90/median {latency['spread']}): rerun skeleton-bench on the artifact on an idle machine"
        )
        report(f"WARNING: {warnings[-1]}")
    after = shape_report(model.backbone)
    report(
        f"pruned {headline}: search {pruned.search[headline]:.4f}, dev {pruned.dev[headline]:.4f}; FFN kept "
        f"{sum(after['widths'])}/{sum(before['widths'])}; speedup x{latency['speedup']:.2f}"
    )

    seconds = {"attribution": round(attribution_s, 2), "search": round(search_s, 2)}
    recovered = None
    if cfg.recovery.steps > 0:
        recovered, seconds["recovery"] = recover_step(model, data, cfg, recover, report)

    outcome = SkeletonOutcome(
        psi=cfg.psi,
        rate=rate,
        curve=curve,
        pruned=pruned,
        recovered=recovered,
        ffn=FFNWidths(
            after["widths"], before["widths"], sum(after["widths"]) / max(sum(before["widths"]), 1)
        ),
        backbone_params=ParamCounts(before["params"], after["params"]),
        flops=Flops(before["flops"], after["flops"], before["flops"] / max(after["flops"], 1.0)),
        latency=Latency(**latency),
        seconds=seconds,
        warnings=warnings,
        degenerate=DEGENERATE in warnings,
        criterion=str(cfg.attribution.criterion),
        skeleton_config=cfg.to_dict(),
    )
    return SkeletonResult(outcome, dense, headline, keep_ffn, keep_heads, identity, scores, scored)


# ---- the steps -----------------------------------------------------------------------------------
def measure(model: nn.Module, data, logits: list | None = None) -> Measured:
    """Every metric of the task on the search split and on dev."""
    return Measured(
        search=evaluate(model, data.search_dataloader(), logits), dev=evaluate(model, data.dev_dataloader())
    )


def measure_dense(model: nn.Module, data, warnings: list[str], report: Report) -> Measured:
    """The dense scores that psi is measured from; flags a model that has learned nothing."""
    logits: list = []
    dense = measure(model, data, logits)
    if is_degenerate(logits, model.task.formulation):
        warnings.append(DEGENERATE)
        report(f"WARNING: {DEGENERATE}")
    headline = model.task.headline
    report(f"dense {headline}: search {dense.search[headline]:.4f}, dev {dense.dev[headline]:.4f}")
    return dense


def shape_report(backbone: nn.Module) -> dict:
    """FFN widths, parameter counts and FLOPs per sequence: the before/after of pruning."""
    return {
        "widths": ffn_widths(backbone),
        "params": count_parameters(backbone),
        "flops": float(backbone_flops(backbone, FLOPS_SEQ_LEN)["total"]),
    }


def score_model(
    model: nn.Module,
    data,
    cfg: SkeletonConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    report: Report = print,
) -> Scores:
    """Attribution over this rank's share of the sample (sums reduced over ranks). Iterative attribution
    scores once per round under the mask of the rounds before."""
    rank, world = shard
    opts = cfg.attribution

    def score_once() -> Scores:
        return score_neurons(
            model,
            itertools.islice(data.attribution_dataloader(), rank, None, world),
            criterion=opts.criterion,
            target=opts.target,
            token_agg=opts.token_agg,
            magnitude=opts.magnitude,
            max_instances=-(-opts.max_instances // world),
            unsupervised=opts.unsupervised,
            include_prompt=opts.include_prompt,
            heads=opts.heads,
            seed=getattr(getattr(model, "hparams", None), "seed", 0),
            reduce_fn=reduce,
        )

    if not opts.iterative:
        return score_once()
    eta = Eta(len(rounds_of(opts.iterative_step, opts.iterative_until)) + 1, done=1)  # a pass per round
    return score_iteratively(
        score_once,
        model.backbone,
        step=opts.iterative_step,
        until=opts.iterative_until,
        scope=cfg.pruning.scope,
        progress=lambda rate, _: report(f"  attribution re-scored with {rate:.0%} masked ({eta.step()})"),
    )


def heads_to_keep(scores: Scores, cfg: SkeletonConfig) -> list | None:
    """Heads kept at the fixed ``pruning.head_rate`` (None: no head pruning). Chosen before the search,
    which masks them at every rate: the margin covers heads and neurons together."""
    if cfg.pruning.head_rate <= 0:
        return None
    if scores.heads is None:
        raise ValueError(
            "skeleton.pruning.head_rate > 0 needs head scores: set skeleton.attribution.heads=true"
        )
    return select_heads(scores, cfg.pruning.head_rate, scope=cfg.pruning.scope)


def neurons_to_keep(scores: Scores, rate: float, cfg: SkeletonConfig) -> list[torch.Tensor]:
    p = cfg.pruning
    return select_neurons(scores, rate, scope=p.scope, min_per_layer=p.min_per_layer, round_to=p.round_to)


def search_rate(
    model: nn.Module,
    data,
    scores: Scores,
    keep_heads: list | None,
    dense: Measured,
    cfg: SkeletonConfig,
    warnings: list[str],
    report: Report,
) -> tuple[float, list[list[float]]]:
    """The largest rate whose search score stays within psi of the dense one, on reversible masks."""
    headline, loader = model.task.headline, data.search_dataloader()
    p, s = cfg.pruning, cfg.search
    evaluate_rate = masked_evaluator(
        model.backbone,
        scores,
        lambda: evaluate(model, loader)[headline],
        scope=p.scope,
        min_per_layer=p.min_per_layer,
        round_to=p.round_to,
        head_keep=keep_heads,
    )
    base = dense.search[headline]
    if keep_heads is not None:
        heads_only = evaluate_rate(0.0)
        if heads_only < base - cfg.margin:
            warnings.append(
                f"pruning.head_rate={p.head_rate} alone drops the search {headline} to {heads_only:.4f} "
                f"(dense {base:.4f}), beyond psi={cfg.psi}: lower skeleton.pruning.head_rate"
            )
            report(f"WARNING: {warnings[-1]}")
    # a binary search over the grid plus the lookahead: the usual number of evaluations, not a bound
    eta = Eta(math.ceil(math.log2(math.floor(s.max_rate / s.granularity + 1e-9) + 1)) + s.lookahead)
    found = search_pruning_rate(
        evaluate_rate,
        base,
        cfg.margin,
        granularity=s.granularity,
        max_rate=s.max_rate,
        lookahead=s.lookahead,
        progress=lambda r, score, ok: report(
            f"  rate {r:.2f}: {headline} {score:.4f} {'ok' if ok else 'over margin'} (~{eta.step()})"
        ),
    )
    report(
        f"search: largest rate within psi={cfg.psi} points is {found.rate:.2f} ({found.evaluations} evaluations)"
    )
    return found.rate, [list(point) for point in found.curve]


def prune(backbone: nn.Module, keep_ffn: list, keep_heads: list | None) -> None:
    prune_ffn(backbone, keep_ffn)
    if keep_heads is not None:
        prune_heads(backbone, keep_heads)


def recover_step(model, data, cfg: SkeletonConfig, recover, report: Report) -> tuple[Measured, float]:
    started = time.perf_counter()
    recover(model)
    recovered = measure(model, data)
    seconds = round(time.perf_counter() - started, 2)
    headline = model.task.headline
    report(
        f"after {cfg.recovery.steps} recovery steps ({seconds:.0f}s): search {recovered.search[headline]:.4f}, "
        f"dev {recovered.dev[headline]:.4f}"
    )
    return recovered, seconds
