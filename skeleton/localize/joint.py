"""Heads and FFN neurons ranked together, each by its score per unit of modelled cost.

A unit is one FFN neuron or one attention key/value group (one head without grouped-query attention). Its
ranking key is its attribution score (a Taylor estimate of what removing it costs the task: comparable
between heads and neurons) divided by what it costs (``cost.CostModel``), so the cheapest task-irrelevant
latency goes first. A *rate* here is the fraction of the units' total cost removed: the search over it is a
search over modelled latency, and the modelled speedup of every rate is known before anything is timed.

``JointRanking`` re-scores under the mask of the rounds before (as ``iterative.score_iteratively`` does
for neurons alone) and stops early once a round's re-scoring no longer changes what the next round drops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .arch import group_heads, layer_parts
from .attribution import Scores
from .cost import CostModel
from .iterative import composite
from .masks import masked
from .skip import attention_skippable

JOINT = "joint"  # Scores.meta["ranking"] when ffn/heads hold ranking keys rather than raw scores
# Scores.meta["ranking_version"]: 2 = rounds mask at least their rate. Saved rankings of another version
# are not resumed (the prompt cache scores again rather than mix two definitions).
RANKING_VERSION = 2


@dataclass
class UnitTable:
    """Every prunable unit of a backbone, flattened: neurons of layer 0, 1, ..., then head groups."""

    layer: torch.Tensor  # (N,) long
    is_head: torch.Tensor  # (N,) bool
    index: torch.Tensor  # (N,) neuron index, or key/value group index
    cost: torch.Tensor  # (N,) float64, per unit
    widths: list[int]
    heads: list[int]
    groups: list[int]  # query heads per key/value group, per layer
    min_groups: list[int]  # groups a layer must keep (1 where an empty attention cannot be skipped)

    def __len__(self) -> int:
        return len(self.cost)

    @property
    def total(self) -> float:
        return float(self.cost.sum())


def unit_table(backbone: nn.Module, cost: CostModel) -> UnitTable:
    parts = layer_parts(backbone)
    layer, is_head, index, unit_cost = [], [], [], []
    for i, p in enumerate(parts):
        layer.append(torch.full((p.ffn_width,), i))
        is_head.append(torch.zeros(p.ffn_width, dtype=torch.bool))
        index.append(torch.arange(p.ffn_width))
        unit_cost.append(torch.full((p.ffn_width,), cost.per_neuron[i], dtype=torch.float64))
    groups = [max(p.attn.group_size, 1) for p in parts]
    for i, (p, g) in enumerate(zip(parts, groups)):
        n = p.attn.num_heads // g
        layer.append(torch.full((n,), i))
        is_head.append(torch.ones(n, dtype=torch.bool))
        index.append(torch.arange(n))
        unit_cost.append(torch.full((n,), cost.per_head[i] * g, dtype=torch.float64))
    min_groups = [0 if attention_skippable(p) else 1 for p in parts]
    return UnitTable(
        torch.cat(layer).long(),
        torch.cat(is_head),
        torch.cat(index).long(),
        torch.cat(unit_cost).clamp(min=1e-12),
        [p.ffn_width for p in parts],
        [p.attn.num_heads for p in parts],
        groups,
        min_groups,
    )


def unit_scores(scores: Scores, table: UnitTable) -> torch.Tensor:
    """(N,) raw scores: neurons as scored, a key/value group as the sum of its query heads' scores."""
    if scores.heads is None:
        raise ValueError(
            "joint ranking needs head scores: score with heads=True (skeleton.attribution.heads)"
        )
    ffn = [torch.as_tensor(s).double().view(-1) for s in scores.ffn]
    heads = [torch.as_tensor(s).double().view(-1, g).sum(1) for s, g in zip(scores.heads, table.groups)]
    flat = torch.cat(ffn + heads)
    if len(flat) != len(table):
        raise ValueError(f"scores cover {len(flat)} units, the backbone has {len(table)}")
    return torch.nan_to_num(flat, nan=-math.inf)


def ranking_keys(scores: Scores, table: UnitTable) -> torch.Tensor:
    """Lowest first goes first: stored keys for joint re-scored Scores, else score per cost."""
    if (scores.meta or {}).get("ranking") == JOINT:
        return unit_scores(scores, table)
    return unit_scores(scores, table) / table.cost


def _drop_order(keys: torch.Tensor, table: UnitTable, rate: float) -> torch.Tensor:
    """Bool (N,) kept mask: drop the lowest keys until ``rate`` of the units' total cost is gone."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    order = torch.argsort(keys, stable=True)
    spent = torch.cumsum(table.cost[order], 0)
    n_drop = int(torch.searchsorted(spent, rate * table.total * (1 + 1e-9) + 1e-12, right=True))
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[order[:n_drop]] = False
    return keep


def _mask_of_round(keys: torch.Tensor, table: UnitTable, rate: float) -> torch.Tensor:
    """Bool (N,) kept mask of a re-scoring round: the lowest keys until *at least* ``rate`` of the cost is
    gone, so the ranking it leaves is exact up to the round's nominal rate (``JointRanking.exact_up_to``)."""
    order = torch.argsort(keys, stable=True)
    spent = torch.cumsum(table.cost[order], 0)
    target = rate * table.total * (1 - 1e-9)
    n_drop = 0 if rate <= 0 else min(int(torch.searchsorted(spent, target)) + 1, len(table))
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[order[:n_drop]] = False
    return keep


def _add_back(keep: torch.Tensor, keys: torch.Tensor, members: torch.Tensor, target: int) -> None:
    """Keep the best-keyed dropped units among ``members`` until ``target`` of them are kept."""
    short = target - int(keep[members].sum())
    if short <= 0:
        return
    dropped = members[~keep[members]]
    best = dropped[torch.argsort(keys[dropped], descending=True, stable=True)[:short]]
    keep[best] = True


def select_units(
    keys: torch.Tensor, table: UnitTable, rate: float, *, min_per_layer: int = 0, round_to: int = 1
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Kept FFN neuron indices and kept query-head indices per layer at cost-rate ``rate``. The FFN floor
    and rounding (as in ``select_neurons``) and the one group a non-skippable attention must keep add
    back the best-keyed dropped units of that layer, so the realised rate can be a little lower."""
    keep = _drop_order(keys, table, rate)
    for i, w in enumerate(table.widths):
        neurons = ((table.layer == i) & ~table.is_head).nonzero().view(-1)
        target = max(int(keep[neurons].sum()), min(min_per_layer, w))
        _add_back(keep, keys, neurons, min(w, math.ceil(target / round_to) * round_to))
        groups = ((table.layer == i) & table.is_head).nonzero().view(-1)
        _add_back(keep, keys, groups, table.min_groups[i])
    return _keep_lists(keep, table)


def _as_scores(keys: torch.Tensor, table: UnitTable, like: Scores, meta: dict) -> Scores:
    """Per-unit keys back in ``Scores`` form (a group's key on each of its query heads)."""
    n_ffn = sum(table.widths)
    ffn = list(keys[:n_ffn].float().split(table.widths))
    per_group = keys[n_ffn:].float().split([h // g for h, g in zip(table.heads, table.groups)])
    heads = [k.repeat_interleave(g) / g for k, g in zip(per_group, table.groups)]
    return Scores(ffn=ffn, heads=heads, num_instances=like.num_instances, meta=meta)


def _newly_dropped(keys: torch.Tensor, dropped_round, round_keys, table, rate) -> set[int]:
    ranking = composite(dropped_round, round_keys, keys)
    kept = _mask_of_round(ranking, table, rate)
    return set((~kept & (dropped_round < 0)).nonzero().view(-1).tolist())


class JointRanking:
    """The re-scored joint ranking, built one round at a time and only as far as the rates asked need.

    After the rounds at ``rounds[:K]`` the ranking is exactly the fully re-scored one for every rate up to
    about ``rounds[K]`` (``exact_up_to``): the units past it are ordered by the last round's scores, which
    only the later rounds would change. So ``keys_for(rate)`` runs the rounds below ``rate`` that are missing and nothing more:
    a search that never looks past 40% of the cost pays for the passes at 10-30% and skips 40-80%. A
    ranking ``start``-ed from saved ``Scores`` (a cached partial ranking) resumes where it stopped."""

    def __init__(
        self,
        score_once: Callable[[], Scores],
        backbone: nn.Module,
        table: UnitTable,
        *,
        score_round: Callable[[], Scores] | None = None,
        rounds: list[float],
        stop_overlap: float = 1.0,
        progress: Callable[[float, str], None] | None = None,
        start: Scores | None = None,
    ):
        self._score_once, self._backbone, self.table = score_once, backbone, table
        self._score_round = score_round or score_once  # the re-scoring rounds' pass (fewer instances)
        self.rounds, self._stop_overlap, self._progress = list(rounds), stop_overlap, progress
        self.seconds, self.passes_run = 0.0, 0  # attribution passes run here (not resumed from ``start``)
        self._exact: float | None = None
        self.first_instances: int | None = None  # the first pass's sample, when scored here
        if start is not None and self.resumes(start, table, self.rounds):
            self._resume(start)
        else:
            self._latest = self._score()
            self.first_instances = self._latest.num_instances
            self.keys = unit_scores(self._latest, table) / table.cost
            self.dropped_round = torch.full((len(table),), -1, dtype=torch.long)
            self.round_keys: list[torch.Tensor] = []
            self.stopped_at: float | None = None

    @staticmethod
    def resumes(scores: Scores, table: UnitTable, rounds: list[float]) -> bool:
        """Whether ``scores`` are a (partial) joint ranking under these rounds, or one plain pass."""
        meta = scores.meta or {}
        if meta.get("ranking") != JOINT:
            return not rounds
        return (
            meta.get("ranking_version") == RANKING_VERSION
            and meta.get("planned_rounds") == len(rounds) + 1
            and 1 <= int(meta.get("rounds", 0)) <= len(rounds) + 1
        )

    def _resume(self, scores: Scores) -> None:
        self._latest = scores
        joint = (scores.meta or {}).get("ranking") == JOINT
        keys = unit_scores(scores, self.table)
        self.keys = keys if joint else keys / self.table.cost
        done = int(scores.meta.get("rounds", 1)) - 1 if joint else 0
        # a round's drops sit in [k, k + 0.5) of the saved ranking, the survivors at [done, done + 1)
        level = torch.floor(self.keys).long()
        self.dropped_round = torch.where(self.keys < done, level, torch.full_like(level, -1))
        self.round_keys = [self.keys] * done
        self.stopped_at = scores.meta.get("stopped_at") if joint else None

    @property
    def done(self) -> int:
        return len(self.round_keys)

    @property
    def exact_up_to(self) -> float:
        """The largest rate at which the ranking equals the fully re-scored one: the share of the cost the
        next round would mask (at least its nominal rate; above it the full ranking orders the units by
        the next round's scores)."""
        if self.stopped_at is not None or self.done >= len(self.rounds):
            return 1.0
        if self._exact is None:
            kept = _mask_of_round(self.ranking, self.table, self.rounds[self.done])
            self._exact = float(self.table.cost[~kept].sum()) / self.table.total
        return self._exact

    def keys_for(self, rate: float) -> torch.Tensor:
        """Ranking keys (lowest goes first) exact at ``rate``: the missing rounds below it run first."""
        while rate > self.exact_up_to + 1e-12:
            self._next_round()
        return self.ranking

    @property
    def ranking(self) -> torch.Tensor:
        """The ranking keys as far as the rounds run so far have built them."""
        return composite(self.dropped_round, self.round_keys, self.keys)

    def complete(self) -> Scores:
        """Every round (or up to where the ranking settled), as ``Scores``."""
        self.keys_for(1.0)
        return self.scores()

    def _score(self, scorer: Callable[[], Scores] | None = None) -> Scores:
        started = time.perf_counter()
        out = (scorer or self._score_once)()
        self.seconds += time.perf_counter() - started
        self.passes_run += 1
        return out

    def _next_round(self) -> None:
        k, rate, table = self.done, self.rounds[self.done], self.table
        kept = _mask_of_round(self.ranking, table, rate)
        self.dropped_round[~kept & (self.dropped_round < 0)] = k
        self.round_keys.append(self.keys)
        self._exact = None
        keep_ffn, keep_heads = _keep_lists(kept, table)
        with masked(self._backbone, keep_ffn, keep_heads):
            self._latest = self._score(self._score_round)
        previous, self.keys = self.keys, unit_scores(self._latest, table) / table.cost
        note = ""
        if k + 1 < len(self.rounds):
            before = _newly_dropped(previous, self.dropped_round, self.round_keys, table, self.rounds[k + 1])
            after = _newly_dropped(self.keys, self.dropped_round, self.round_keys, table, self.rounds[k + 1])
            overlap = len(before & after) / max(len(before | after), 1)
            note = f", next round's drops overlap {overlap:.0%}"
            if self._stop_overlap < 1.0 and overlap >= self._stop_overlap:
                self.stopped_at = rate
                note += ": ranking settled, re-scoring stops"
        if self._progress is not None:
            self._progress(rate, note)

    def scores(self) -> Scores:
        """The ranking so far as ``Scores`` (saved and resumed by the prompt cache)."""
        meta = {
            **self._latest.meta,
            "ranking": JOINT,
            "ranking_version": RANKING_VERSION,
            "rounds": self.done + 1,
            "stopped_at": self.stopped_at,
            "planned_rounds": len(self.rounds) + 1,
            "exact_up_to": self.exact_up_to,
        }
        return _as_scores(self.ranking, self.table, self._latest, meta)


def _keep_lists(kept: torch.Tensor, table: UnitTable) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A kept mask over units as sorted kept neuron and query-head indices per layer."""
    keep_ffn, keep_heads = [], []
    for i in range(len(table.widths)):
        neurons = (table.layer == i) & ~table.is_head
        keep_ffn.append(table.index[neurons & kept].sort().values)
        groups = table.index[(table.layer == i) & table.is_head & kept].sort().values
        keep_heads.append(group_heads(groups, table.groups[i]))
    return keep_ffn, keep_heads
