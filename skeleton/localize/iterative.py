"""Iterative attribution: score, mask the lowest `step` more, score the masked model again, ...

One-shot act x grad is a first-order estimate around the *dense* model: it says which neurons matter
while all the others are present. Once 40% are gone, the remaining neurons' roles shift, and a neuron
that looked redundant next to a twin becomes the twin's only stand-in. Re-scoring under the mask of the
previous rounds follows those shifts (the neurons already dropped score exactly 0 there, since the mask
zeroes their activation). The cost is one attribution pass per round; what it buys is measured in the
README ("Choices").

The result is an ordinary `Scores` whose ranking encodes the drop order: neurons dropped in round k score
in [k, k + 0.5), ordered by that round's scores; the survivors score in [K, K + 1), ordered by the last
round. `select_neurons(scores, rate)` then reproduces each round's mask exactly at the round's rate and
interpolates with that round's scores in between.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attribution import Scores
from .config import rounds_of
from .masks import as_keep_mask, masked
from .prune import select_neurons


def _flat(scores: Scores) -> torch.Tensor:
    return torch.cat([s.double().view(-1) for s in scores.ffn])


def _rank_in_unit(values: torch.Tensor, width: float) -> torch.Tensor:
    """Values mapped to [0, width) preserving their order (ties broken stably)."""
    out = torch.empty(len(values), dtype=torch.float64)
    out[torch.argsort(values, stable=True)] = torch.arange(len(values), dtype=torch.float64)
    return out * (width / max(len(values), 1))


def composite(
    dropped_round: torch.Tensor, round_scores: list[torch.Tensor], latest: torch.Tensor
) -> torch.Tensor:
    """Flat ranking scores: round k's drops in [k, k + 0.5), survivors in [K, K + 1)."""
    comp = torch.empty(len(latest), dtype=torch.float64)
    survivors = dropped_round < 0
    comp[survivors] = len(round_scores) + _rank_in_unit(latest[survivors], 1.0)
    for k, scores in enumerate(round_scores):
        here = dropped_round == k
        comp[here] = k + _rank_in_unit(scores[here], 0.5)
    return comp


def score_iteratively(
    score_once: Callable[[], Scores],
    backbone: torch.nn.Module,
    *,
    step: float,
    until: float,
    scope: str = "global",
    progress: Callable[[float, Scores], None] | None = None,
    score_round: Callable[[], Scores] | None = None,
) -> Scores:
    """Scores from `len(rounds_of(step, until)) + 1` attribution passes, each under the mask of the rounds
    before it. `score_once()` scores `backbone`'s model as it is currently masked; call it with fresh batches
    each time. Head scores (if any) come from the first, unmasked pass. `scope` must match the selection
    the scores are used with ("global" or "layer"), so that each round masks what that scope would drop.
    `score_round` scores the re-scoring rounds (default `score_once`; e.g. on fewer instances)."""
    score_round = score_round or score_once
    first = latest = score_once()
    widths = first.widths
    dropped_round = torch.full((sum(widths),), -1, dtype=torch.long)
    round_scores: list[torch.Tensor] = []
    for k, rate in enumerate(rounds_of(step, until)):
        flat = _flat(latest)
        ranking = composite(dropped_round, round_scores, flat)
        keep = select_neurons(list(ranking.split(widths)), rate, scope=scope)
        kept = torch.cat([as_keep_mask(k, w) for k, w in zip(keep, widths)])
        dropped_round[~kept & (dropped_round < 0)] = k
        round_scores.append(flat)
        with masked(backbone, keep):
            latest = score_round()
        if progress is not None:
            progress(rate, latest)
    flat = _flat(latest)
    ranking = composite(dropped_round, round_scores, flat)
    meta = {**latest.meta, "iterative_step": step, "iterative_until": until, "rounds": len(round_scores) + 1}
    return Scores(
        ffn=[s.float() for s in ranking.split(widths)],
        heads=first.heads,
        num_instances=latest.num_instances,
        meta=meta,
    )
