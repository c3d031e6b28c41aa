"""Iterative attribution: each round scores the model masked by the earlier rounds, and the final ranking
reproduces every round's mask."""

import itertools

import pytest
import torch
from tiny_models import StandIn, make_batch, one_thread, tiny_backbone

import skeleton.localize.iterative as iterative
from skeleton.localize import (
    masked,
    rounds_of,
    score_iteratively,
    score_neurons,
    select_neurons,
)

assert one_thread  # autouse fixture


def _model():
    return StandIn(tiny_backbone("bert", seed=0), formulation="classification", n_prompt=2)


def test_rounds_of():
    assert rounds_of(0, 0.9) == []
    assert rounds_of(0.1, 0.8) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert rounds_of(0.25, 0.6) == pytest.approx([0.25, 0.5])
    for step, until in [(0.5, 0.2), (-0.1, 0.5), (0.1, 1.0), (1.0, 1.0)]:
        with pytest.raises(ValueError, match=r"skeleton\.attribution\.iterative_(step|until)="):
            rounds_of(step, until)


def test_masked_neurons_score_exactly_zero():
    """The premise of re-scoring: a neuron masked out has no activation, so it scores 0."""
    model, batch = _model(), make_batch(rows=4)
    dense = score_neurons(model, [batch], target="logprob", magnitude="token")
    keep = select_neurons(dense, 0.5)
    with masked(model.backbone, keep):
        again = score_neurons(model, [batch], target="logprob", magnitude="token")
    for scores, kept, before in zip(again.ffn, keep, dense.ffn):
        dropped = torch.ones(len(scores), dtype=torch.bool)
        dropped[kept] = False
        assert torch.all(scores[dropped] == 0)
        assert not torch.allclose(scores[~dropped], before[~dropped])  # the survivors' scores moved


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_final_ranking_reproduces_every_round_mask(monkeypatch, scope):
    model, batch = _model(), make_batch(rows=4)
    seen_masks = []
    real_masked = iterative.masked

    def recording(backbone, keep):
        seen_masks.append([k.clone() for k in keep])
        return real_masked(backbone, keep)

    monkeypatch.setattr(iterative, "masked", recording)
    calls = []

    def score_once():
        calls.append(1)
        return score_neurons(model, [batch], target="logprob", magnitude="token")

    scores = score_iteratively(score_once, model.backbone, step=0.2, until=0.8, scope=scope)
    assert len(calls) == 5 and scores.meta["rounds"] == 5
    assert len(seen_masks) == 4
    for rate, mask in zip([0.2, 0.4, 0.6, 0.8], seen_masks):
        for got, want in zip(select_neurons(scores, rate, scope=scope), mask):
            assert torch.equal(got, want)
    # each round drops its lowest survivors: the masks are nested
    for earlier, later in itertools.pairwise(seen_masks):
        for kept_before, kept_after in zip(earlier, later):
            assert set(kept_after.tolist()) <= set(kept_before.tolist())


def test_iterative_differs_from_one_shot_beyond_the_first_round():
    model, batch = _model(), make_batch(rows=4)

    def score_once():
        return score_neurons(model, [batch], target="logprob", magnitude="token")

    def same(a, b, rate):
        return all(torch.equal(x, y) for x, y in zip(select_neurons(a, rate), select_neurons(b, rate)))

    one_shot, stepped = score_once(), score_iteratively(score_once, model.backbone, step=0.1, until=0.8)
    assert same(one_shot, stepped, 0.1)  # the first round is the one-shot ranking
    assert not all(same(one_shot, stepped, rate) for rate in (0.3, 0.5, 0.7, 0.9))


def test_no_rounds_keeps_the_one_shot_ranking():
    model, batch = _model(), make_batch(rows=4)
    one_shot = score_neurons(model, [batch])
    same = score_iteratively(lambda: one_shot, model.backbone, step=0, until=0)
    for rate in (0.1, 0.5, 0.9):
        for a, b in zip(select_neurons(one_shot, rate), select_neurons(same, rate)):
            assert torch.equal(a, b)
