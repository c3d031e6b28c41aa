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
import functools
import itertools
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import SequentialSampler

from skeleton.bench import first_examples, measure_speedup
from skeleton.evaluate import evaluate, is_degenerate
from skeleton.localize import (
    Scores,
    backbone_flops,
    count_parameters,
    ffn_widths,
    heads_per_layer,
    masked,
    prune_units,
    score_iteratively,
    score_neurons,
    search_pruning_rate,
    select_heads,
    select_neurons,
)
from skeleton.localize.config import Acceptance, SkeletonConfig, Units, rounds_of
from skeleton.localize.cost import CostModel, cached_cost_model
from skeleton.localize.joint import JointRanking, UnitTable, ranking_keys, select_units, unit_table
from skeleton.localize.reconstruct import (
    Compensation,
    collect_statistics,
    compensated_masks,
    fit_compensation,
)
from skeleton.summary import FFNWidths, Flops, Latency, Measured, ParamCounts, SkeletonOutcome
from skeleton.timing import describe_load
from skeleton.uncertainty import (
    Drop,
    Predictions,
    collect,
    constant_baseline,
    paired_drop,
    score,
    split_indices,
    subset_loader,
)

Report = Callable[[str], None]
Reduce = Callable[[torch.Tensor], torch.Tensor]

DEGENERATE = (
    "the dense prompt-tuned model gives every search example the same answer: it has not learned the "
    "task, so any pruning rate keeps its score and the chosen rate means nothing. Train longer "
    "(trainer.max_steps) or raise prompt.lr / module.head_lr."
)
NEAR_CONSTANT = "the dense prompt-tuned model is within psi of a constant answer"
FLOPS_SEQ_LEN = 128  # tokens per sequence at which FLOPs are reported
MIN_CONFIRM = 20  # examples each part of the search split needs before acceptance=pooled/confirm splits it
HELD_BACK = (Acceptance.CONFIRM, Acceptance.POOLED)  # the rules that hold back a part of the search split


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
    compensation: Compensation | None = None  # the least-squares scales and shifts folded into the weights

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
    cost_cache: str | None = None,
) -> SkeletonResult:
    """Localize, prune ``model.backbone`` in place, and measure what that bought. ``shard`` is
    (rank, world size); ``recover(model)`` tunes prompt + head again when ``cfg.recovery.steps > 0``;
    ``cost_cache`` is the folder measured latency models are kept in (None: measured every run)."""
    if cfg.recovery.steps > 0 and recover is None:
        raise ValueError(
            "skeleton.recovery.steps > 0 needs recover=... (see skeleton.recovery.trainer_recovery)"
        )
    headline = model.task.headline
    warnings: list[str] = []
    dense, dense_preds, constant = measure_dense(model, data, warnings, report, cfg.margin)
    identity, before = model.backbone_identity(), shape_report(model.backbone)

    started = time.perf_counter()
    cost = cost_model(model, data, cfg, cost_cache, report)
    joint = cfg.pruning.units.ranks_heads
    table = unit_table(model.backbone, cost) if joint else None
    if scores is not None and not scores_fit(scores, cfg, cost if joint else None):
        scores = None  # ranked under other settings or another latency model: score again
    scored, ranking = scores is None, None
    if joint:
        ranking = joint_ranking(
            model, data, cfg, table, start=scores, shard=shard, reduce=reduce, report=report
        )
        scores = ranking.scores()
    elif scored:
        scores = score_model(model, data, cfg, shard=shard, reduce=reduce, report=report)
    attribution_s = time.perf_counter() - started
    rounds = scores.meta.get("rounds", 1)
    per_round = f", re-scoring rounds {cfg.attribution.instances_per_round}" if rounds > 1 else ""
    report(
        f"attribution ({cfg.attribution.criterion}) over {first_pass_instances(scores, ranking, cfg)} instances"
        f"{per_round} ({rounds} passes{_lazy_note(ranking)}): {attribution_s:.1f}s"
    )

    started = time.perf_counter()
    fit = reconstruction(model, data, cfg, shard=shard, reduce=reduce, report=report)
    reconstruct_s = time.perf_counter() - started

    started = time.perf_counter()
    rounds_before = ranking.seconds if ranking is not None else 0.0
    select = selector(ranking if ranking is not None else scores, cfg, table)
    splits = search_splits(model, data, dense, dense_preds, cfg)
    rate, curve, points = search_rate(
        model, data, select, cost, dense, dense_preds, cfg, warnings, report, splits=splits, fit=fit
    )
    units = Units.FFN if cfg.pruning.units == Units.FFN else Units.JOINT
    if cfg.pruning.units == Units.BEST:
        search = functools.partial(
            search_rate, model, data, cost=cost, dense=dense, dense_preds=dense_preds, cfg=cfg,
            warnings=warnings, report=report, splits=splits, fit=fit,
        )  # fmt: skip
        alone = ffn_only(select.keys_of, table, cfg)
        select, rate, curve, points, units = search_past_joint(
            search, select, alone, (rate, curve, points), table, cost, cfg, report
        )
    search_s = time.perf_counter() - started
    if ranking is not None:  # the rounds the search asked for are attribution time, not search time
        in_search = ranking.seconds - rounds_before
        attribution_s, search_s = attribution_s + in_search, search_s - in_search
        scores, scored = ranking.scores(), scored or ranking.passes_run > 0
        scores.meta["cost"] = cost.to_dict()
        report(
            f"attribution: {scores.meta['rounds']} passes in all, {in_search:.1f}s of them asked by the search"
        )

    keep_ffn, keep_heads = select(rate)
    compensation = fit(keep_ffn, keep_heads) if fit is not None else None
    dense_backbone = copy.deepcopy(model.backbone)
    prune_units(model.backbone, keep_ffn, keep_heads, compensation)
    pruned, pruned_preds = measure(model, data)
    latency = measure_speedup(model, dense_backbone, data.dev_dataloader(), cfg.benchmark)
    del dense_backbone
    if not latency["reliable"]:
        warnings.append(
            f"the speedup x{latency['speedup']:.2f} was timed on a busy machine "
            f"({describe_load(latency.get('others'), latency['load'])}, p90/median {latency['spread']}): "
            "rerun skeleton-bench on the artifact on an idle machine"
        )
        report(f"WARNING: {warnings[-1]}")
    after = shape_report(model.backbone)
    drops = {
        split: drop_of(model.task, headline, dense_preds[split], pruned_preds[split], cfg).to_dict()
        for split in ("search", "dev")
    }
    modelled = cost.speedup(after["widths"], after["heads"])
    report(
        f"pruned {headline}: search {pruned.search[headline]:.4f}, dev {pruned.dev[headline]:.4f} (dev drop "
        f"{drops['dev']['drop']:.2f} +- {drops['dev']['se'] or 0:.2f} points); FFN kept "
        f"{sum(after['widths'])}/{sum(before['widths'])}, heads kept {sum(after['heads'])}/{sum(before['heads'])}; "
        f"speedup x{latency['speedup']:.2f} (modelled x{modelled:.2f})"
    )

    seconds = {"attribution": round(attribution_s, 2), "search": round(search_s, 2)}
    if fit is not None:
        seconds["reconstruct"] = round(reconstruct_s, 2)
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
        units=str(units),
        heads={"kept": after["heads"], "dense": before["heads"]},
        search_points=points,
        drops=drops,
        cost_model=cost.to_dict(),
        modelled_speedup=round(modelled, 4),
        constant_answer=constant,
    )
    return SkeletonResult(
        outcome, dense, headline, keep_ffn, keep_heads, identity, scores, scored, compensation
    )


# ---- the steps -----------------------------------------------------------------------------------
def measure(model: nn.Module, data) -> tuple[Measured, dict]:
    """Every metric of the task on the search split and on dev, and the predictions behind them (for the
    paired standard errors of a drop)."""
    metrics, preds = {}, {}
    for split, loader in (("search", data.search_dataloader()), ("dev", data.dev_dataloader())):
        preds[split] = collect(model, loader)
        if isinstance(preds[split], Predictions):
            metrics[split] = score(model.task, preds[split])
        else:  # batches that cannot be stacked (ReCoRD): whole-split metrics only
            metrics[split] = evaluate(model, loader)
    return Measured(search=metrics["search"], dev=metrics["dev"]), preds


def measure_dense(
    model: nn.Module, data, warnings: list[str], report: Report, margin: float = 0.0
) -> tuple[Measured, dict, dict | None]:
    """The dense scores that psi is measured from, their predictions, and the best constant answer's
    search score; flags a model that has learned nothing, or too little to stand ``margin`` (psi as a
    fraction) above answering every example alike."""
    dense, preds = measure(model, data)
    search = preds["search"]
    logits = [search.logits] if isinstance(search, Predictions) else search
    headline = model.task.headline
    baseline = constant_baseline(model.task, search, headline) if isinstance(search, Predictions) else None
    constant = None
    if baseline is not None:
        label, value = baseline
        constant = {"label": model.task.labels[label] if model.task.labels else str(label), "search": value}
    above = None if constant is None else dense.search[headline] - constant["search"]
    if is_degenerate(logits, model.task.formulation):
        warnings.append(DEGENERATE)
        report(f"WARNING: {DEGENERATE}")
    elif above is not None and above <= margin + 1e-12:
        warnings.append(
            f"{NEAR_CONSTANT}: {headline} {dense.search[headline]:.4f} on the search split against "
            f"{constant['search']:.4f} for answering '{constant['label']}' to every example. Pruning can cut "
            "the network down to that answer and keep the margin, so the rate and the speedup say little "
            "about the task. Train longer (trainer.max_steps) or raise prompt.lr / module.head_lr."
        )
        report(f"WARNING: {warnings[-1]}")
    gap = "" if above is None else f" ({100 * above:+.1f} points on a constant answer)"
    report(f"dense {headline}: search {dense.search[headline]:.4f}{gap}, dev {dense.dev[headline]:.4f}")
    return dense, preds, constant


def drop_of(task, headline: str, dense, pruned, cfg: SkeletonConfig) -> Drop:
    if not isinstance(dense, Predictions) or not isinstance(pruned, Predictions):
        return Drop(float("nan"), None, 0)
    return paired_drop(task, headline, dense, pruned, resamples=cfg.search.resamples)


def scores_fit(scores: Scores, cfg: SkeletonConfig, cost: CostModel | None) -> bool:
    """Whether handed-in (cached) scores were made the way this run would make them."""
    meta = scores.meta or {}
    if cost is not None and meta.get("cost") != cost.to_dict():
        return False
    if cfg.attribution.heads and scores.heads is not None:
        return meta.get("head_score", "signed") == str(cfg.attribution.head_score)
    return True


def shape_report(backbone: nn.Module) -> dict:
    """FFN widths, head counts, parameter counts and FLOPs per sequence: the before/after of pruning."""
    return {
        "widths": ffn_widths(backbone),
        "heads": heads_per_layer(backbone),
        "params": count_parameters(backbone),
        "flops": float(backbone_flops(backbone, FLOPS_SEQ_LEN)["total"]),
    }


def deployment_shape(model: nn.Module, data, cfg: SkeletonConfig) -> tuple[int, int]:
    """(batch size, tokens incl. the prompt) the speed is for: what ``measure_speedup`` times unless set."""
    batch_size = cfg.cost.batch_size or cfg.benchmark.batch_size
    if cfg.cost.seq_len:
        return batch_size, cfg.cost.seq_len
    batches = list(data.dev_dataloader())
    middle = first_examples(batches[len(batches) // 2], batch_size) if batches else None
    tokens = middle["input_ids"].shape[1] if middle is not None else 128
    prompt = getattr(getattr(model, "prompt", None), "num_tokens", 0)
    return batch_size, int(tokens + prompt)


def cost_model(model: nn.Module, data, cfg: SkeletonConfig, cache_dir, report: Report) -> CostModel:
    batch_size, seq_len = deployment_shape(model, data, cfg)
    cost = cached_cost_model(
        model.backbone, batch_size, seq_len, kind=str(cfg.cost.model), cache_dir=cache_dir, report=report
    )
    report(cost.summary())
    return cost


def rank_share(loader, shard: tuple[int, int], instances: int) -> tuple:
    """This rank's batches of a sample (every ``world``-th from ``rank``) and its share of ``instances``."""
    rank, world = shard
    return itertools.islice(loader, rank, None, world), -(-instances // world)


def scorer(
    model: nn.Module,
    data,
    cfg: SkeletonConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    instances: int | None = None,
) -> Callable[[], Scores]:
    """One attribution pass over this rank's share of the sample (sums reduced over ranks), scoring the
    backbone as it is currently masked; ``instances`` (default ``max_instances``) caps the sample."""
    opts = cfg.attribution

    def score_once() -> Scores:
        batches, per_rank = rank_share(data.attribution_dataloader(), shard, instances or opts.max_instances)
        return score_neurons(
            model,
            batches,
            criterion=opts.criterion,
            target=opts.target,
            token_agg=opts.token_agg,
            magnitude=opts.magnitude,
            max_instances=per_rank,
            unsupervised=opts.unsupervised,
            include_prompt=opts.include_prompt,
            heads=opts.heads,
            head_score=opts.head_score,
            seed=getattr(getattr(model, "hparams", None), "seed", 0),
            reduce_fn=reduce,
        )

    return score_once


def score_model(
    model: nn.Module,
    data,
    cfg: SkeletonConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    report: Report = print,
) -> Scores:
    """units=ffn: attribution over this rank's share of the sample; iterative attribution scores once per
    round under the mask of the rounds before (units=joint ranks with ``joint_ranking``)."""
    opts = cfg.attribution
    score_once = scorer(model, data, cfg, shard=shard, reduce=reduce)
    rounds = rounds_of(opts.iterative_step, opts.iterative_until) if opts.iterative else []
    if not rounds:
        return score_once()
    eta = Eta(len(rounds) + 1, done=1)  # a pass per round
    return score_iteratively(
        score_once,
        model.backbone,
        score_round=scorer(model, data, cfg, shard=shard, reduce=reduce, instances=opts.instances_per_round),
        step=opts.iterative_step,
        until=opts.iterative_until,
        scope=cfg.pruning.scope,
        progress=lambda rate, _: report(f"  attribution re-scored with {rate:.0%} masked ({eta.step()})"),
    )


def joint_ranking(
    model: nn.Module,
    data,
    cfg: SkeletonConfig,
    table: UnitTable,
    *,
    start: Scores | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    report: Report = print,
) -> JointRanking:
    """The joint ranking (heads and neurons by score per cost), resumed from ``start`` (cached scores)
    where they fit. Its re-scoring rounds run as the search asks for rates (``lazy_rounds``), or all now:
    in a distributed run every rank must run the same passes, and each rank's search might not agree."""
    opts = cfg.attribution
    rounds = rounds_of(opts.iterative_step, opts.iterative_until) if opts.iterative else []
    ranking = JointRanking(
        scorer(model, data, cfg, shard=shard, reduce=reduce),
        model.backbone,
        table,
        score_round=scorer(model, data, cfg, shard=shard, reduce=reduce, instances=opts.instances_per_round),
        rounds=rounds,
        stop_overlap=opts.iterative_stop,
        progress=lambda rate, note: report(
            f"  attribution re-scored with {rate:.0%} of the cost masked{note} ({eta.step()})"
        ),
        start=start,  # used only where it resumes (JointRanking.resumes), else scored afresh
    )
    eta = Eta(len(rounds) + 1, done=ranking.done + 1)  # progress lines count the passes already run
    if not opts.lazy_rounds or shard[1] > 1:
        ranking.complete()
    return ranking


def first_pass_instances(scores: Scores, ranking: JointRanking | None, cfg: SkeletonConfig) -> int:
    """The first pass's sample size (the latest scores may come from a smaller re-scoring round)."""
    if ranking is not None and ranking.first_instances is not None:
        return ranking.first_instances
    rounds = int(scores.meta.get("rounds", 1))
    return scores.num_instances if rounds == 1 else cfg.attribution.max_instances


def _lazy_note(ranking: JointRanking | None) -> str:
    if ranking is None or ranking.exact_up_to >= 1.0:
        return ""
    return f"; later rounds run when the search asks for rates past {ranking.exact_up_to:.0%}"


Fit = Callable[[list, list | None], Compensation]


def reconstruction(
    model: nn.Module,
    data,
    cfg: SkeletonConfig,
    *,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    report: Report = print,
) -> Fit | None:
    """(kept neurons, kept heads) -> their least-squares compensation, from one pass of the dense model
    over training examples (None when ``reconstruct.enabled`` is off). Every searched rate is judged
    with its own fit, so the search accepts the network that ships."""
    opts = cfg.reconstruct
    if not opts.enabled:
        return None
    started = time.perf_counter()
    batches, per_rank = rank_share(data.attribution_dataloader(opts.instances), shard, opts.instances)
    stats = collect_statistics(
        model,
        batches,
        max_instances=per_rank,
        include_prompt=cfg.attribution.include_prompt,
        reduce=reduce,
    )
    report(
        f"reconstruction: statistics of {stats.tokens} tokens ({opts.instances} instances) in "
        f"{time.perf_counter() - started:.1f}s"
    )
    return functools.partial(fit_compensation, stats, ridge=opts.ridge, shift=opts.shift)


def heads_to_keep(scores: Scores, cfg: SkeletonConfig) -> list | None:
    """units=ffn: heads kept at the fixed ``pruning.head_rate`` (None: no head pruning). Chosen before
    the search, which masks them at every rate: the margin covers heads and neurons together."""
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


Select = Callable[[float], tuple[list[torch.Tensor], list | None]]


def selector(scores: Scores | JointRanking, cfg: SkeletonConfig, table) -> Select:
    """rate -> (kept neurons, kept heads): for units=joint the rate is the fraction of the units' modelled
    cost removed (the ranking re-scored as far as that rate needs); for units=ffn the fraction of FFN
    neurons, with heads fixed at ``head_rate``. Each rate is selected once (the search, its points and
    the final pruning ask again)."""
    p = cfg.pruning
    if table is not None:
        ranking = scores if isinstance(scores, JointRanking) else None
        fixed = ranking_keys(scores, table) if ranking is None else None

        def keys_of(rate: float) -> torch.Tensor:
            return fixed if ranking is None else ranking.keys_for(rate)

        def select(rate: float):
            return select_units(
                keys_of(rate), table, rate, min_per_layer=p.min_per_layer, round_to=p.round_to
            )

        cached = functools.cache(select)
        cached.keys_of = keys_of  # the ranking keys behind it (``ffn_only`` masks the heads out of them)
        return cached
    keep_heads = heads_to_keep(scores, cfg)
    return functools.cache(lambda rate: (neurons_to_keep(scores, rate, cfg), keep_heads))


def ffn_only(keys_of: Callable[[float], torch.Tensor], table: UnitTable, cfg: SkeletonConfig) -> Select:
    """The joint ranking with every head kept: FFN neurons alone, in the order the joint ranking gives
    them and at the same rate unit (the share of the units' modelled cost), so both rankings' rates and
    modelled latencies compare directly. No attribution pass of its own."""
    p = cfg.pruning

    def select(rate: float):
        keys = keys_of(rate).clone()
        keys[table.is_head] = math.inf  # heads never go first, and the rate stops short of them
        return select_units(keys, table, rate, min_per_layer=p.min_per_layer, round_to=p.round_to)

    return functools.cache(select)


def ffn_share(table: UnitTable) -> float:
    """The share of the units' modelled cost that FFN neurons hold: the most an FFN-only rate removes."""
    return float(table.cost[~table.is_head].sum()) / table.total


def search_past_joint(
    search, joint: Select, alone: Select, found: tuple, table: UnitTable, cost: CostModel, cfg, report: Report
) -> tuple[Select, float, list, list[dict], Units]:
    """units=best: after the joint ranking's search, search FFN neurons alone above its rate (heads can
    matter more than their attribution says: sentence pairs lean on attention) and keep whichever network
    has the lower modelled latency. The second search starts just past the joint rate, so where it
    cannot beat it it costs 1 + lookahead evaluations (and its confirmation)."""
    rate, curve, points = found
    top = min(cfg.search.max_rate, ffn_share(table))
    if top <= rate + cfg.search.granularity / 2:
        return joint, rate, curve, points, Units.JOINT
    report(f"search: FFN neurons alone, past the joint ranking's {rate:.2f} (up to {top:.2f} of the cost)")
    other, other_curve, other_points = search(select=alone, floor=rate, max_rate=top, ranking=Units.FFN)
    modelled = {
        name: cost.latency(*_shape(sel(r)))
        for name, sel, r in (("joint", joint, rate), ("ffn", alone, other))
    }
    wins = other > rate and modelled["ffn"] < modelled["joint"]
    for p in points if wins else other_points:
        p.pop("chosen", None)
    merged = points + other_points
    if not wins:
        report(f"search: the joint ranking's {rate:.2f} stays (FFN neurons alone reached {other:.2f})")
        return joint, rate, curve, merged, Units.JOINT
    report(
        f"search: FFN neurons alone win, {other:.2f} of the cost (modelled x{cost.dense / modelled['ffn']:.2f} "
        f"against the joint ranking's x{cost.dense / modelled['joint']:.2f} at {rate:.2f})"
    )
    return alone, other, other_curve, merged, Units.FFN


def _shape(keep: tuple[list, list | None]) -> tuple[list[int], list[int] | None]:
    keep_ffn, keep_heads = keep
    return [len(k) for k in keep_ffn], [len(k) for k in keep_heads] if keep_heads is not None else None


@dataclass
class _Split:
    """A part of the search split: its loader, the dense predictions and the dense headline score."""

    loader: object
    dense: object
    base: float
    pooled: torch.Tensor | None = None  # (search part + this part) -> the whole split's order, if pooled
    name: str = "the held-back part"


def search_splits(
    model, data, dense: Measured, dense_preds, cfg: SkeletonConfig
) -> tuple[_Split, _Split | None]:
    """The split the search evaluates on and the one that confirms its rate: the held-back part
    (acceptance=confirm), or both parts pooled, which is the whole split (acceptance=pooled)."""
    loader = data.search_dataloader()
    headline = model.task.headline
    whole = _Split(loader, dense_preds["search"], dense.search[headline])
    small = len(loader.dataset) < 2 * MIN_CONFIRM  # too small to split: search on all of it, unconfirmed
    if cfg.search.acceptance not in HELD_BACK or small:
        return whole, None
    seed = getattr(getattr(model, "hparams", None), "seed", 0)
    fraction = cfg.search.confirm_fraction
    whole_preds = dense_preds["search"]
    sliceable = (
        isinstance(whole_preds, Predictions)
        and len(whole_preds) == len(loader.dataset)
        and isinstance(loader.sampler, SequentialSampler)
    )
    parts, indices = [], split_indices(len(loader.dataset), fraction, seed)
    for index in indices:
        part = subset_loader(loader, index)
        # the dense predictions of a part are those of its examples on the whole split (no second pass)
        preds = whole_preds.take(index) if sliceable else collect(model, part)
        base = (
            score(model.task, preds)[headline]
            if isinstance(preds, Predictions)
            else evaluate(model, part)[headline]
        )
        parts.append(_Split(part, preds, base))
    if any(math.isnan(p.base) for p in parts):
        return whole, None  # a part too small for the metric: search on all of it, no confirmation
    first, rest = parts
    if cfg.search.acceptance == Acceptance.CONFIRM:
        return first, rest
    if not sliceable:
        # predictions that cannot be joined: confirm on a pass over the whole split
        return first, _Split(loader, whole_preds, whole.base, name="the whole split")
    # the parts' predictions joined in the whole split's order (rank metrics break ties by position)
    order = torch.argsort(torch.cat(indices))
    return first, _Split(rest.loader, whole_preds, whole.base, pooled=order, name="both parts pooled")


def search_rate(
    model: nn.Module,
    data,
    select: Select,
    cost: CostModel,
    dense: Measured,
    dense_preds: dict,
    cfg: SkeletonConfig,
    warnings: list[str],
    report: Report,
    *,
    floor: float = 0.0,
    max_rate: float | None = None,
    ranking: Units | None = None,
    splits: tuple[_Split, _Split | None] | None = None,
    fit: Fit | None = None,
) -> tuple[float, list[list[float]], list[dict]]:
    """The largest rate whose search score stays within psi under the acceptance rule, evaluated on
    pruned copies (``candidate``). For units=joint the largest rate is the lowest modelled latency. Returns the rate, the
    (rate, score) curve and every evaluated point with its shape, modelled latency, drop and verdict.
    ``floor``: only rates above it are searched (``floor`` comes back when none passes); ``ranking``
    tags the points (units=best runs two searches); ``splits``: ``search_splits``' parts, made once by
    a caller that searches twice; ``fit``: each candidate's least-squares compensation (``reconstruction``)."""
    headline, s, margin = model.task.headline, cfg.search, cfg.margin
    search, confirm = splits or search_splits(model, data, dense, dense_preds, cfg)
    points: dict[float, dict] = {}
    fixed_heads = cfg.pruning.units == Units.FFN and cfg.pruning.head_rate > 0

    seen: dict[float, Predictions] = {}  # the search part's predictions per rate, for a pooled confirmation

    def evaluate_on(split: _Split, rate: float) -> tuple[float, Drop | None]:
        keep_ffn, keep_heads = select(rate)
        with candidate(model, keep_ffn, keep_heads, fit) as pruned:
            preds = collect(pruned, split.loader)
            if not isinstance(preds, Predictions):
                return evaluate(pruned, split.loader)[headline], None
        if split is search:
            seen[rate] = preds
        elif split.pooled is not None:
            if rate not in seen:  # a rate the search part never scored: score it there too
                evaluate_on(search, rate)
            preds = seen[rate].cat(preds).take(split.pooled)
        value = score(model.task, preds)[headline]
        drop = None
        if s.acceptance == Acceptance.PAIRED_SE:
            drop = paired_drop(model.task, headline, split.dense, preds, resamples=s.resamples)
        return value, drop

    def point(rate: float) -> dict:
        widths, heads = _shape(select(rate))
        return {
            "rate": rate,
            **({"ranking": str(ranking)} if ranking is not None else {}),
            "ffn_kept": sum(widths),
            "heads_kept": sum(heads) if heads is not None else sum(cost.dense_heads),
            "modelled": round(cost.latency(widths, heads), 4),
            "modelled_speedup": round(cost.speedup(widths, heads), 4),
        }

    def evaluate_rate(rate: float) -> float:
        value, drop = evaluate_on(search, rate)
        points[rate] = {**point(rate), "score": value, "drop": round((search.base - value) * 100, 3)}
        if drop is not None:
            points[rate]["se"] = round((drop.se or 0.0) * 100, 3)
        return value

    def accept(rate: float, value: float) -> bool:
        drop = search.base - value
        if s.acceptance == Acceptance.PAIRED_SE:
            drop += s.z * (points[rate].get("se", 0.0) / 100)
        ok = drop <= margin + 1e-12
        points[rate]["accepted"] = ok
        return ok

    if fixed_heads:
        heads_only, _ = evaluate_on(search, 0.0)
        if heads_only < search.base - margin:
            warnings.append(
                f"pruning.head_rate={cfg.pruning.head_rate} alone drops the search {headline} to {heads_only:.4f} "
                f"(dense {search.base:.4f}), beyond psi={cfg.psi}: lower skeleton.pruning.head_rate"
            )
            report(f"WARNING: {warnings[-1]}")
    # a binary search over the grid plus the lookahead: the usual number of evaluations, not a bound
    eta = Eta(math.ceil(math.log2(math.floor(s.max_rate / s.granularity + 1e-9) + 1)) + s.lookahead)
    found = search_pruning_rate(
        evaluate_rate,
        search.base,
        margin,
        granularity=s.granularity,
        max_rate=s.max_rate if max_rate is None else max_rate,
        lookahead=s.lookahead,
        accept=accept,
        floor=floor,
        progress=lambda r, value, ok: report(
            f"  rate {r:.2f}: {headline} {value:.4f} {'ok' if ok else 'over margin'}, modelled "
            f"x{points[r]['modelled_speedup']:.2f} (~{eta.step()})"
        ),
    )
    rate = found.rate
    if confirm is not None:

        def passes(r: float) -> bool:
            value = evaluate_rate(r)
            ok = accept(r, value)
            report(f"  rate {r:.2f}: {headline} {value:.4f} {'ok' if ok else 'over margin'} (refining)")
            return ok

        rate = confirm_rate(
            confirm,
            points,
            rate,
            evaluate_on,
            margin,
            headline,
            report,
            passes=passes,
            granularity=s.granularity,
            floor=floor,
        )
    elif s.acceptance in HELD_BACK:
        report("  the search split is too small to hold back a confirmation part: the rate is not confirmed")
    if floor > 0 and rate <= floor:  # nothing above the floor passed (or held): nothing of this search chosen
        return _nothing_past(floor, found, points, cfg, report)
    unit = "of the units' modelled cost" if cfg.pruning.units.ranks_heads else "of FFN neurons"
    chosen = point(rate)
    report(
        f"search: {rate:.2f} {unit} within psi={cfg.psi} points ({found.evaluations} evaluations, "
        f"acceptance={s.acceptance}): modelled {cost.dense:.3g} -> {chosen['modelled']:.3g} {cost.unit} "
        f"(x{chosen['modelled_speedup']:.2f}), {chosen['ffn_kept']} neurons and {chosen['heads_kept']} heads kept"
    )
    if rate in points:
        points[rate]["chosen"] = True
    return rate, [list(p) for p in found.curve], [points[r] for r in sorted(points)]


def _nothing_past(floor: float, found, points: dict, cfg: SkeletonConfig, report: Report):
    """A search with a floor that found no rate above it keeping psi: ``floor`` back, nothing chosen."""
    report(f"search: nothing past {floor:.2f} keeps psi={cfg.psi} ({len(points)} evaluations)")
    return floor, [list(p) for p in found.curve], [points[r] for r in sorted(points)]


@contextmanager
def candidate(model: nn.Module, keep_ffn: list, keep_heads: list | None, fit: Fit | None = None):
    """The model at one searched rate: the pruned network itself (a copy of the backbone, sliced and, with
    ``fit``, compensated), which equals the masked one up to float rounding and runs faster the more is
    pruned; masks (and compensation hooks) on the dense backbone where a family cannot slice what was
    chosen."""
    comp = fit(keep_ffn, keep_heads) if fit is not None else None
    try:
        twin = copy.deepcopy(model.backbone)
        prune_units(twin, keep_ffn, keep_heads, comp)
    except (NotImplementedError, ValueError):
        hooks = masked if comp is None else functools.partial(compensated_masks, comp=comp)
        with hooks(model.backbone, keep_ffn, keep_heads):
            yield model
        return
    yield model.on_backbone(twin)


def confirm_rate(
    confirm: _Split,
    points: dict,
    rate: float,
    evaluate_on,
    margin: float,
    headline: str,
    report: Report,
    *,
    passes: Callable[[float], bool] | None = None,
    granularity: float = 0.01,
    floor: float = 0.0,
) -> float:
    """The largest rate the search accepted that the confirmation also keeps within psi: the search
    part chose among many rates, so its best one is optimistic; the other part has not been looked at
    (``confirm``: that part alone, or pooled with the search part's predictions at the same rate).
    Steps down the accepted rates; between the first that holds and the one above it that did not, the
    largest rate both parts keep is found on the grid (``passes(rate)``: the search part accepts it) by
    galloping down from the refused rate, then bisecting: the search part accepted that rate, so the
    boundary is usually a few grid points below it, where a bisection from the bottom would spend its
    first probes on large (slow) networks far from it. Nothing at or below ``floor`` is looked at:
    ``floor`` comes back when nothing above holds."""

    def confirmed(candidate: float) -> bool:
        value, _ = evaluate_on(confirm, candidate)
        ok = confirm.base - value <= margin + 1e-12
        points[candidate].update(confirm_score=value, confirm_drop=round((confirm.base - value) * 100, 3))
        points[candidate]["confirmed"] = ok
        report(
            f"  confirm {candidate:.2f} on {confirm.name}: {headline} {value:.4f} "
            f"(dense {confirm.base:.4f}) {'ok' if ok else 'over margin'}"
        )
        return ok

    best, failed = floor, None
    accepted = (r for r, p in points.items() if p.get("accepted") and floor < r <= rate)
    for candidate in sorted(accepted, reverse=True):
        if confirmed(candidate):
            best = candidate
            break
        failed = candidate
    if failed is None or passes is None:
        return best

    def holds(k: int) -> bool:
        candidate = round(k * granularity, 12)
        judged = points.get(candidate, {}).get("accepted")  # the search part already judged it: no new pass
        return (passes(candidate) if judged is None else judged) and confirmed(candidate)

    lo, hi = round(best / granularity), round(failed / granularity)
    step = 1
    while hi - step > lo:  # gallop down from the refused rate: 1, 3, 7, ... grid points below it
        if holds(hi - step):
            lo = hi - step
            break
        hi, step = hi - step, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if holds(mid) else (lo, mid)
    return round(lo * granularity, 12)


def recover_step(model, data, cfg: SkeletonConfig, recover, report: Report) -> tuple[Measured, float]:
    started = time.perf_counter()
    recover(model)
    recovered, _ = measure(model, data)
    seconds = round(time.perf_counter() - started, 2)
    headline = model.task.headline
    report(
        f"after {cfg.recovery.steps} recovery steps ({seconds:.0f}s): search {recovered.search[headline]:.4f}, "
        f"dev {recovered.dev[headline]:.4f}"
    )
    return recovered, seconds
