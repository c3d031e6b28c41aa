"""search_pruning_rate on synthetic curves: where the boundary is known exactly."""

import math

import pytest
import torch
from tiny_models import make_batch, one_thread, tiny_backbone

from skeleton.localize import (
    Scores,
    layer_parts,
    masked,
    masked_evaluator,
    random_scores,
    search_pruning_rate,
)

assert one_thread  # autouse fixture


class Curve:
    """score(rate) = 1 where admissible, 0 elsewhere; records every call."""

    def __init__(self, boundary: float, dips: tuple[float, ...] = ()):
        self.boundary, self.dips, self.calls = boundary, {round(d, 6) for d in dips}, []

    def __call__(self, rate: float) -> float:
        self.calls.append(rate)
        ok = rate <= self.boundary + 1e-9 and round(rate, 6) not in self.dips
        return 0.9 if ok else 0.5


def _grid_ok(rates, g):
    return all(abs(r / g - round(r / g)) < 1e-9 for r in rates)


@pytest.mark.parametrize("boundary", [0.0, 0.01, 0.13, 0.37, 0.5, 0.64, 0.99, 1.0])
def test_monotone_step_curves(boundary):
    f = Curve(boundary)
    res = search_pruning_rate(f, base_score=0.9, psi=0.01)
    assert res.rate == pytest.approx(boundary)
    assert len(f.calls) == len(set(f.calls)) == res.evaluations
    assert res.evaluations <= math.ceil(math.log2(101)) + 2
    assert _grid_ok(f.calls, 0.01) and 0.0 not in f.calls
    assert res.curve == sorted(res.curve) and res.curve[0] == (0.0, 0.9)
    assert res.score == 0.9


def test_smooth_monotone_curve_psi_in_metric_units():
    res = search_pruning_rate(lambda r: 0.9 - 0.2 * r**2, base_score=0.9, psi=0.01)
    assert res.rate == pytest.approx(0.22)  # 0.2 r^2 <= 0.01  <=>  r <= 0.2236
    res = search_pruning_rate(lambda r: 0.9 - 0.2 * r**2, base_score=0.9, psi=0.0)
    assert res.rate == 0.0


def test_threshold_is_inclusive_despite_float_error():
    # 0.8 - 0.1 evaluates to 0.7000000000000001 > 0.7: a score of exactly 0.7 must still pass
    assert 0.8 - 0.1 > 0.7
    res = search_pruning_rate(lambda r: 0.7 if r <= 0.4 else 0.0, base_score=0.8, psi=0.1)
    assert res.rate == pytest.approx(0.4)


def test_narrow_dip_skipped_by_lookahead():
    # the binary search from 0..100 evaluates 50, 75, 62, 56, ... : the dip at 0.56 would stop it at 0.55
    f = Curve(0.60, dips=(0.56,))
    assert search_pruning_rate(f, 0.9, 0.01, lookahead=2).rate == pytest.approx(0.60)
    assert len(f.calls) == len(set(f.calls))
    assert 0.56 in f.calls
    assert search_pruning_rate(Curve(0.60, dips=(0.56,)), 0.9, 0.01, lookahead=0).rate == pytest.approx(0.55)


def test_dip_of_lookahead_width_skipped_wider_one_stops():
    assert search_pruning_rate(Curve(0.60, dips=(0.56, 0.57)), 0.9, 0.01, lookahead=2).rate == pytest.approx(
        0.6
    )
    wide = Curve(0.60, dips=(0.56, 0.57, 0.58))
    assert search_pruning_rate(wide, 0.9, 0.01, lookahead=2).rate == pytest.approx(0.55)
    assert search_pruning_rate(Curve(0.60, dips=(0.56, 0.57, 0.58)), 0.9, 0.01, lookahead=3).rate == 0.6


@pytest.mark.parametrize(
    "granularity,boundary,want", [(0.05, 0.37, 0.35), (0.1, 0.99, 0.9), (0.25, 0.3, 0.25)]
)
def test_granularity_respected(granularity, boundary, want):
    f = Curve(boundary)
    res = search_pruning_rate(f, 0.9, 0.01, granularity=granularity)
    assert res.rate == pytest.approx(want) and _grid_ok(f.calls, granularity)
    assert all(r == round(r, 12) for r, _ in res.curve)


def test_max_rate_caps_search():
    f = Curve(0.8)
    res = search_pruning_rate(f, 0.9, 0.01, max_rate=0.5)
    assert res.rate == pytest.approx(0.5) and max(f.calls) <= 0.5
    assert search_pruning_rate(Curve(0.8), 0.9, 0.01, max_rate=0.0).evaluations == 0


def test_nothing_admissible_returns_dense():
    res = search_pruning_rate(lambda r: float("nan"), 0.9, 0.01)
    assert res.rate == 0.0 and res.score == 0.9 and res.evaluations >= 1


def test_progress_callback():
    seen = []
    search_pruning_rate(Curve(0.3), 0.9, 0.01, granularity=0.1, progress=lambda *a: seen.append(a))
    assert (0.3, 0.9, True) in seen and (0.4, 0.5, False) in seen


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"psi": -0.1}, "psi must be >= 0 \\(it is the allowed drop"),
        ({"granularity": 0.0}, "granularity"),
        ({"granularity": 1.5}, "granularity"),
        ({"max_rate": 1.2}, "max_rate"),
        ({"max_rate": -0.1}, "max_rate"),
        ({"lookahead": -1}, "lookahead"),
    ],
)
def test_invalid_arguments(kw, msg):
    args = {"psi": 0.01, **kw}
    with pytest.raises(ValueError, match=msg):
        search_pruning_rate(Curve(0.5), 0.9, **args)


def _forward(backbone, batch):
    """backbone's last hidden state on batch, as a function (masks applied at call time)."""

    def run():
        with torch.no_grad():
            return backbone(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state

    return run


def test_masked_evaluator_masks_then_restores():
    backbone, batch = tiny_backbone("bert"), make_batch()
    scores = Scores(*random_scores(layer_parts(backbone), False, seed=0))

    run = _forward(backbone, batch)
    dense = run()

    def similarity():
        return torch.nn.functional.cosine_similarity(run().flatten(), dense.flatten(), dim=0).item()

    evaluate = masked_evaluator(backbone, scores, similarity)
    assert evaluate(0.0) == pytest.approx(1.0) and evaluate(0.8) < 0.999
    assert torch.equal(run(), dense)  # hooks removed
    res = search_pruning_rate(evaluate, 1.0, 0.02, granularity=0.05)
    assert 0.0 <= res.rate < 1.0 and res.score >= 0.98 - 1e-9


def test_masked_evaluator_keeps_the_head_mask_at_every_rate():
    """A fixed head pruning sits inside the searched margin: rate 0 already has the heads masked."""
    backbone, batch = tiny_backbone("bert"), make_batch()
    parts = layer_parts(backbone)
    scores = Scores(*random_scores(parts, False, seed=0))
    head_keep = [torch.arange(1, p.attn.num_heads) for p in parts]  # drop head 0 everywhere

    run = _forward(backbone, batch)
    dense = run()
    with masked(backbone, None, head_keep):
        heads_only = run()
    assert not torch.allclose(heads_only, dense)
    evaluate = masked_evaluator(
        backbone, scores, lambda: float((run() - heads_only).abs().max()), head_keep=head_keep
    )
    assert evaluate(0.0) == 0.0  # exactly the head-masked model
    assert evaluate(0.5) > 0.0
    assert torch.equal(run(), dense)  # every hook removed


def test_a_floor_is_taken_as_reached_and_only_rates_above_it_are_evaluated():
    f = Curve(0.62)
    res = search_pruning_rate(f, 0.9, 0.01, floor=0.31)
    assert res.rate == pytest.approx(0.62) and f.calls[0] == pytest.approx(0.32)
    assert min(f.calls) > 0.31 and 0.31 not in [round(c, 2) for c in f.calls]


def test_a_search_that_cannot_beat_its_floor_costs_one_step_and_the_lookahead():
    f = Curve(0.2)  # nothing above the floor passes
    res = search_pruning_rate(f, 0.9, 0.01, floor=0.31, lookahead=2)
    assert res.rate == pytest.approx(0.31) and math.isnan(res.score)
    assert [round(c, 2) for c in f.calls] == [0.32, 0.33, 0.34] and res.evaluations == 3
