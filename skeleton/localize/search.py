"""Find the largest pruning rate whose dev score stays within `psi` of the dense score.

The search is on the grid k * granularity, k = 0..floor(max_rate / granularity). Rate 0 is the dense model
and admissible by definition, so a result always exists. A binary search assumes the score falls
monotonically with the rate; real curves have small non-monotone dips, so once it converges the search
probes `lookahead` grid points beyond the first failing one and, if one of them is admissible, searches
again from there. Every rate is evaluated at most once.

Scores must be "higher is better" (accuracy, F1, correlation); negate a loss before passing it in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .masks import masked
from .prune import select_neurons

_EPS = 1e-12  # 0.8 - 0.1 is 0.7000000000000001 in floats: a score of 0.7 must still pass


@dataclass
class SearchResult:
    rate: float  # largest admissible rate found
    score: float  # its score (base_score for rate 0)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (rate, score), sorted, incl. (0, base)
    evaluations: int = 0  # calls to evaluate (rate 0 is never evaluated)


def _validate(psi: float, granularity: float, max_rate: float, lookahead: int) -> None:
    if not psi >= 0:
        raise ValueError(f"psi must be >= 0 (it is the allowed drop from the dense score), got {psi}")
    if not 0 < granularity <= 1:
        raise ValueError(f"granularity must be in (0, 1] (the rate grid step), got {granularity}")
    if not 0 <= max_rate <= 1:
        raise ValueError(f"max_rate must be in [0, 1] (a fraction of the neurons), got {max_rate}")
    if lookahead < 0:
        raise ValueError(f"lookahead must be >= 0 (grid points probed past the boundary), got {lookahead}")


def search_pruning_rate(
    evaluate: Callable[[float], float],
    base_score: float,
    psi: float,
    *,
    granularity: float = 0.01,
    max_rate: float = 1.0,
    lookahead: int = 2,
    progress: Callable[[float, float, bool], None] | None = None,
    accept: Callable[[float, float], bool] | None = None,
    floor: float = 0.0,
) -> SearchResult:
    """Largest rate r on the grid with evaluate(r) >= base_score - psi.

    evaluate: rate -> dev score of the model pruned (masked) at that rate.
    psi: allowed drop, in the metric's units (0.01 = 1 point for scores in [0, 1]).
    granularity: grid step; 0.01 costs about log2(100) + lookahead evaluations on a monotone curve.
    lookahead: grid points probed past the boundary (default 2: a one-point dip, the usual noise on a dev
        set of a few hundred examples, does not end the search; 0 = plain binary search).
    progress: called as progress(rate, score, admissible) after each evaluation.
    accept: accept(rate, score) -> admissible, called once per evaluated rate, for acceptance rules
        beyond "score >= base_score - psi" (e.g. the drop plus its standard error within psi).
    floor: a rate taken as admissible without evaluating it (one another search already reached): only
        rates above it are evaluated, the grid point just above it first, so a search that cannot beat it
        costs 1 + lookahead evaluations. The result is ``floor`` (score NaN) when nothing above it passes.
    A NaN score counts as not admissible.
    """
    _validate(psi, granularity, max_rate, lookahead)
    top = math.floor(max_rate / granularity + 1e-9)
    threshold = base_score - psi - _EPS
    cache: dict[int, float] = {}
    verdict: dict[int, bool] = {}

    def rate(k: int) -> float:
        return round(k * granularity, 12)

    def ok(k: int) -> bool:
        if k == 0:
            return True
        if k not in cache:
            cache[k] = float(evaluate(rate(k)))
            passed = cache[k] >= threshold  # False for NaN
            if accept is not None:
                passed = bool(accept(rate(k), cache[k])) and not math.isnan(cache[k])
            verdict[k] = passed
            if progress is not None:
                progress(rate(k), cache[k], passed)
        return verdict[k]

    lo = min(math.floor(floor / granularity + 1e-9), top) if floor > 0 else 0
    if 0 < lo < top:
        ok(lo + 1)  # the first step past the floor, before any bisection
    while True:
        hi = min((k for k in cache if k > lo and not ok(k)), default=top + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        nxt = next((k for k in range(hi + 1, min(hi + lookahead, top) + 1) if ok(k)), None)
        if nxt is None:
            break
        lo = nxt
    curve = [(0.0, float(base_score))] + [(rate(k), s) for k, s in sorted(cache.items())]
    value = float(base_score) if lo == 0 else cache.get(lo, math.nan)
    return SearchResult(rate(lo), value, curve, len(cache))


def masked_evaluator(
    backbone: nn.Module,
    scores,
    run_eval: Callable[[], float],
    *,
    scope: str = "global",
    min_per_layer: int = 0,
    round_to: int = 1,
    head_keep=None,
) -> Callable[[float], float]:
    """An `evaluate(rate)` for `search_pruning_rate`: run `run_eval()` with the FFN neurons that
    `select_neurons(scores, rate, ...)` drops masked out (hooks removed afterwards).

    head_keep: kept heads per layer, masked at every rate, so that a fixed head pruning is inside the
        margin the search guarantees rather than applied on top of it."""

    def evaluate(rate: float) -> float:
        keep = select_neurons(scores, rate, scope=scope, min_per_layer=min_per_layer, round_to=round_to)
        with masked(backbone, keep, head_keep):
            return float(run_eval())

    return evaluate
