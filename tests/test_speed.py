"""Pruning for speed: the latency model, heads and neurons ranked jointly by score per cost, the joint
re-scoring that stops once settled, and the noise-aware acceptance (paired bootstrap, confirmation)."""

import copy
import json
import math

import pytest
import torch
from tiny_models import FFN, HEADS, LAYERS, StandIn, make_batch, one_thread, tiny_backbone, tiny_config
from torch.utils.data import DataLoader
from transformers import AutoModel

from skeleton.localize import cost as cost_module
from skeleton.localize import masked, prune_ffn, prune_heads, score_neurons
from skeleton.localize.cost import CostModel, cached_cost_model, flop_cost_model, measure_cost_model
from skeleton.localize.joint import (
    JointRanking,
    ranking_keys,
    select_units,
    unit_scores,
    unit_table,
)
from skeleton.localize.search import search_pruning_rate
from skeleton.tasks import get_task
from skeleton.uncertainty import Predictions, paired_drop, split_indices, split_loader

assert one_thread  # autouse fixture


def _forward(model, batch):
    with torch.no_grad():
        return model(batch)


def _cost(widths=(FFN,) * LAYERS, heads=(HEADS,) * LAYERS) -> CostModel:
    n = len(widths)
    return CostModel(
        "measured",
        "ms",
        4,
        8,
        "cpu",
        1.0,
        [0.01] * n,
        [0.5] * n,
        [0.2] * n,
        [0.3] * n,
        list(widths),
        list(heads),
    )


# ---- the latency model ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_flop_and_measured_models_are_monotone_in_units_kept(family):
    backbone = tiny_backbone(family)
    for model in (flop_cost_model(backbone, 4, 16), measure_cost_model(backbone, 4, 16, repeats=3)):
        assert all(c > 0 for c in model.per_neuron + model.per_head)
        assert all(c >= 0 for c in model.ffn_fixed + model.attn_fixed + [model.base])
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            widths = torch.randint(0, FFN, (LAYERS,), generator=g).tolist()
            heads = torch.randint(0, HEADS, (LAYERS,), generator=g).tolist()
            layer = int(torch.randint(LAYERS, (1,), generator=g))
            more_w, more_h = list(widths), list(heads)
            more_w[layer] += 1
            more_h[layer] += 1
            here = model.latency(widths, heads)
            assert model.latency(more_w, heads) > here and model.latency(widths, more_h) > here
        assert model.speedup(model.dense_widths, model.dense_heads) == pytest.approx(1.0)


def test_flop_model_matches_the_analytic_flops_of_a_neuron_and_a_head():
    backbone = tiny_backbone("bert")
    model = flop_cost_model(backbone, batch_size=2, seq_len=8)
    d, tokens = backbone.config.hidden_size, 16
    assert model.per_neuron[0] == pytest.approx(2 * tokens * d * 2 / 1e6)
    head_dim = d // HEADS
    per_head = 2 * 2 * tokens * d * head_dim * 2 + 2 * 2 * 2 * 8 * 8 * head_dim
    assert model.per_head[0] == pytest.approx(per_head / 1e6)


def test_a_measured_model_is_cached_by_shape_and_refreshed_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(cost_module, "cpu_busy", lambda others: (False, "idle"))  # an idle machine
    backbone = tiny_backbone("bert")
    first = cached_cost_model(backbone, 4, 16, cache_dir=tmp_path, report=lambda _: None)
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1 and CostModel.from_dict(json.loads(files[0].read_text())) == first
    monkeypatch.setattr(cost_module, "measure_cost_model", lambda *a, **k: pytest.fail("measured again"))
    assert cached_cost_model(backbone, 4, 16, cache_dir=tmp_path, report=lambda _: None) == first
    monkeypatch.setattr(cost_module, "measure_cost_model", measure_cost_model)
    cached_cost_model(backbone, 8, 16, cache_dir=tmp_path, report=lambda _: None)  # another batch size
    assert len(list((tmp_path / "latency").glob("*.json"))) == 2
    uneven = copy.deepcopy(backbone)
    prune_ffn(uneven, [torch.arange(FFN // 2), None])
    with pytest.raises(ValueError, match="layers all have one shape"):
        cached_cost_model(uneven, 4, 16, cache_dir=tmp_path, report=lambda _: None)


def test_a_timing_on_a_busy_machine_ranks_its_run_but_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(cost_module, "cpu_busy", lambda others: (True, "load 3.0 per core"))
    said = []
    cached_cost_model(tiny_backbone("bert"), 4, 16, cache_dir=tmp_path, report=said.append)
    assert not (tmp_path / "latency").exists() and any("busy machine" in line for line in said)


def test_auto_reads_other_processes_while_it_waits_and_ranks_by_flops_when_they_use_the_cpu(monkeypatch):
    from skeleton import timing

    monkeypatch.setattr(cost_module, "IDLE_PROBE_S", 0.0)
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    samples = iter([(0.0, 0.0, 0.0), (1.0, 0.0, 1.0)])  # 1 busy CPU-second of 2, none of it ours
    monkeypatch.setattr(timing, "_cpu_sample", lambda: next(samples))
    monkeypatch.setattr(cost_module, "measure_cost_model", lambda *a, **k: pytest.fail("timed while shared"))
    said = []
    model = cached_cost_model(tiny_backbone("bert"), 4, 16, kind="auto", report=said.append)
    assert model.kind == "flops" and "other processes used 50% of the cores" in said[0]


# ---- joint selection -----------------------------------------------------------------------------
def test_joint_selection_removes_the_cost_fraction_cheapest_per_score_first():
    backbone = tiny_backbone("bert")
    cost = _cost()
    table = unit_table(backbone, cost)
    assert len(table) == LAYERS * (FFN + HEADS) and table.min_groups == [0, 0]
    g = torch.Generator().manual_seed(1)
    keys = torch.rand(len(table), generator=g, dtype=torch.float64)
    for rate in (0.0, 0.1, 0.37, 0.8, 1.0):
        keep_ffn, keep_heads = select_units(keys, table, rate)
        kept = torch.zeros(len(table), dtype=torch.bool)
        for i, (kf, kh) in enumerate(zip(keep_ffn, keep_heads)):
            kept[(table.layer == i) & ~table.is_head & torch.isin(table.index, kf)] = True
            kept[(table.layer == i) & table.is_head & torch.isin(table.index, kh)] = True
        removed = float(table.cost[~kept].sum())
        assert removed <= rate * table.total + 1e-9
        assert removed > rate * table.total - float(table.cost.max()) - 1e-9
        if (~kept).any() and kept.any():
            assert keys[~kept].max() <= keys[kept].min()  # lowest keys went first


def test_ranking_is_score_per_cost_so_a_costly_head_goes_before_a_cheap_neuron_of_equal_score():
    backbone = tiny_backbone("bert")
    table = unit_table(backbone, _cost())
    scores = unit_scores(_uniform_scores(1.0), table)
    keys = ranking_keys(_uniform_scores(1.0), table)
    assert torch.all(scores > 0)
    assert keys[table.is_head].max() < keys[~table.is_head].min()  # heads cost 50x a neuron here


def _uniform_scores(value):
    from skeleton.localize import Scores

    return Scores(
        ffn=[torch.full((FFN,), value) for _ in range(LAYERS)],
        heads=[torch.full((HEADS,), value) for _ in range(LAYERS)],
        num_instances=1,
    )


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2", "mistral"])
def test_joint_pruning_equals_masking(family):
    backbone, batch = tiny_backbone(family), make_batch()
    model = StandIn(backbone).eval()
    scores = score_neurons(model, [batch], heads=True)
    table = unit_table(backbone, flop_cost_model(backbone, 4, 8))
    keys = ranking_keys(scores, table)
    keep_ffn, keep_heads = select_units(keys, table, 0.6)
    assert sum(map(len, keep_heads)) < LAYERS * HEADS  # heads went too
    for keep, group in zip(keep_heads, table.groups):
        assert len(keep) % group == 0
    with masked(backbone, keep_ffn, keep_heads):
        want = _forward(model, batch)
    pruned = copy.deepcopy(model)
    prune_ffn(pruned.backbone, keep_ffn)
    prune_heads(pruned.backbone, keep_heads)
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)


def test_an_attention_that_cannot_be_skipped_keeps_one_group():
    config = tiny_config("bert")
    table = unit_table(AutoModel.from_config(config), _cost())
    table.min_groups = [1, 1]  # as for ALBERT, whose attention module also holds the residual norm
    keys = torch.arange(len(table), dtype=torch.float64)
    keys[table.is_head] = -1.0  # every head is the first to go
    _, keep_heads = select_units(keys, table, 1.0)
    assert [len(k) for k in keep_heads] == [1, 1]


def _counted_scorer():
    """A tiny BERT, its unit table, an attribution pass on one batch and the list of passes it ran."""
    backbone, batch = tiny_backbone("bert"), make_batch()
    model = StandIn(backbone).eval()
    calls = []

    def score_once():
        calls.append(1)
        return score_neurons(model, [batch], heads=True)

    return backbone, unit_table(backbone, _cost()), score_once, calls


def test_joint_rescoring_stops_once_the_next_drops_no_longer_change():
    backbone, table, score_once, calls = _counted_scorer()

    rounds = [0.1, 0.2, 0.3, 0.4]
    full = JointRanking(score_once, backbone, table, rounds=rounds, stop_overlap=1.0).complete()
    assert len(calls) == 5 and full.meta["rounds"] == 5 and full.meta["stopped_at"] is None
    calls.clear()
    early = JointRanking(score_once, backbone, table, rounds=rounds, stop_overlap=0.0).complete()
    assert len(calls) == 2 and early.meta["stopped_at"] == 0.1
    # the joint keys reproduce the first round's mask at its rate
    keys = ranking_keys(full, table)
    first = score_once()  # the unmasked pass
    want = select_units(unit_scores(first, table) / table.cost, table, 0.1)
    got = select_units(keys, table, 0.1)
    for a, b in zip(want[0] + want[1], got[0] + got[1]):
        assert torch.equal(a, b)


# ---- acceptance ----------------------------------------------------------------------------------
def _predictions(labels, predicted, num_labels=2):
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), num_labels).float()
    return Predictions(logits, {"labels": torch.tensor(labels)})


def test_paired_drop_is_the_difference_and_its_bootstrap_error():
    task = get_task("sst2")
    labels = [0, 1] * 50
    dense = _predictions(labels, labels)
    same = paired_drop(task, "accuracy", dense, dense)
    assert same.value == 0.0 and same.se == 0.0
    flipped = list(labels)
    for i in range(10):
        flipped[i] = 1 - flipped[i]
    drop = paired_drop(task, "accuracy", dense, _predictions(labels, flipped), resamples=400)
    assert drop.value == pytest.approx(0.1)
    assert drop.se == pytest.approx((0.1 * 0.9 / 100) ** 0.5, rel=0.25)  # binomial SE of the changed share
    assert drop.to_dict()["drop"] == pytest.approx(10.0)


def test_the_constant_baseline_is_the_best_single_answer_for_the_headline():
    from skeleton.uncertainty import constant_baseline

    labels = [1, 1, 1, 0]
    anything = _predictions(labels, [0, 1, 0, 1])
    assert constant_baseline(get_task("sst2"), anything, "accuracy") == (1, pytest.approx(0.75))
    # MRPC's headline is the mean of accuracy and F1: all-positive scores (0.75 + 6/7) / 2
    assert constant_baseline(get_task("mrpc"), anything, "acc_f1") == (1, pytest.approx((0.75 + 6 / 7) / 2))
    assert constant_baseline(get_task("stsb"), anything, "pearson_spearman") is None  # regression


@pytest.mark.parametrize(("dense_correct", "flagged"), [(80, True), (82, False)])
def test_a_dense_model_within_psi_of_a_constant_answer_is_flagged(monkeypatch, dense_correct, flagged):
    """79 of 100 search examples are positive: a dense model at 80% is one point above answering
    'positive' to all of them, so psi = 1 can prune it down to that answer; at 82% it is not."""
    from types import SimpleNamespace

    import skeleton.pipeline as pipeline
    from skeleton.summary import Measured

    labels = [0] * 21 + [1] * 79
    wrong = 100 - dense_correct  # the negatives answered right, the first positives wrongly
    predicted = [0] * 21 + [0] * wrong + [1] * (79 - wrong)
    preds = _predictions(labels, predicted)
    accuracy = sum(p == y for p, y in zip(predicted, labels)) / 100
    assert accuracy == pytest.approx(dense_correct / 100)
    measured = Measured(search={"accuracy": accuracy}, dev={"accuracy": accuracy})
    monkeypatch.setattr(pipeline, "measure", lambda model, data: (measured, {"search": preds}))
    model = SimpleNamespace(task=get_task("sst2"))
    warnings = []
    _, _, constant = pipeline.measure_dense(model, None, warnings, report=lambda _: None, margin=0.01)
    assert constant == {"label": "positive", "search": pytest.approx(0.79)}
    assert any(w.startswith(pipeline.NEAR_CONSTANT) for w in warnings) is flagged
    if flagged:
        assert "0.7900 for answering 'positive'" in warnings[0] and "trainer.max_steps" in warnings[0]


def test_split_loader_halves_are_disjoint_complete_and_in_order():
    loader = DataLoader(list(range(101)), batch_size=8)
    a, b = split_loader(loader, 0.5, seed=3)
    got_a = [int(x) for batch in a for x in batch]
    got_b = [int(x) for batch in b for x in batch]
    assert sorted(got_a + got_b) == list(range(101)) and not set(got_a) & set(got_b)
    assert got_a == sorted(got_a) and got_b == sorted(got_b) and abs(len(got_a) - 50) <= 1
    assert [int(x) for batch in split_loader(loader, 0.5, seed=3)[0] for x in batch] == got_a
    first, rest = split_indices(101, 0.5, seed=3)  # what the search slices the dense predictions with
    assert first.tolist() == got_a and rest.tolist() == got_b


def test_an_acceptance_rule_decides_instead_of_the_bare_threshold():
    curve = {r / 100: 0.9 - r / 1000 for r in range(0, 101)}  # falls 0.1 point per grid step
    plain = search_pruning_rate(lambda r: curve[round(r, 2)], 0.9, 0.01, lookahead=0)
    assert plain.rate == pytest.approx(0.1)
    strict = search_pruning_rate(
        lambda r: curve[round(r, 2)], 0.9, 0.01, lookahead=0, accept=lambda r, s: 0.9 - s + 0.0045 <= 0.01
    )
    assert strict.rate == pytest.approx(0.05)


def test_confirmation_walks_down_to_the_largest_rate_the_held_back_part_keeps():
    from skeleton.pipeline import _Split, confirm_rate

    held_back = _Split(loader=None, dense=None, base=0.90)
    on_held_back = {0.6: 0.85, 0.5: 0.889, 0.4: 0.895, 0.3: 0.9}  # 0.6 was the search part's lucky pass
    points = {r: {"accepted": True} for r in on_held_back} | {0.7: {"accepted": False}}
    asked = []

    def evaluate_on(split, rate):
        asked.append(rate)
        return on_held_back[rate], None

    rate = confirm_rate(held_back, points, 0.6, evaluate_on, 0.01, "accuracy", report=lambda _: None)
    assert rate == 0.4 and asked == [0.6, 0.5, 0.4]
    assert points[0.6]["confirmed"] is False and points[0.4]["confirmed"] is True
    assert points[0.5]["confirm_drop"] == pytest.approx(1.1)
    nothing = {0.6: {"accepted": True}}
    assert confirm_rate(held_back, nothing, 0.6, lambda s, r: (0.0, None), 0.01, "accuracy", print) == 0.0


def test_auto_ranks_by_flops_on_a_busy_machine_and_by_a_measurement_when_one_is_cached(tmp_path, monkeypatch):
    backbone = tiny_backbone("bert")
    monkeypatch.setattr(cost_module, "cpu_busy", lambda others: (True, "load 3.0 per core"))
    monkeypatch.setattr(
        cost_module, "measure_cost_model", lambda *a, **k: pytest.fail("timed on a busy machine")
    )
    assert (
        cached_cost_model(backbone, 4, 16, kind="auto", cache_dir=tmp_path, report=lambda _: None).kind
        == "flops"
    )
    monkeypatch.setattr(cost_module, "cpu_busy", lambda others: (False, "idle"))
    monkeypatch.setattr(cost_module, "measure_cost_model", measure_cost_model)
    measured = cached_cost_model(backbone, 4, 16, kind="auto", cache_dir=tmp_path, report=lambda _: None)
    assert measured.kind == "measured"
    monkeypatch.setattr(
        cost_module, "cpu_busy", lambda others: (True, "load 3.0 per core")
    )  # busy again: the cached one still counts
    assert (
        cached_cost_model(backbone, 4, 16, kind="auto", cache_dir=tmp_path, report=lambda _: None) == measured
    )


def test_confirmation_refines_between_the_rate_that_held_and_the_one_that_did_not():
    from skeleton.pipeline import _Split, confirm_rate

    held_back = _Split(loader=None, dense=None, base=0.90)
    points = {0.25: {"accepted": True}, 0.37: {"accepted": True}}

    def evaluate_on(split, rate):  # the held-back part keeps psi up to 0.33
        return (0.90 if rate <= 0.33 else 0.85), None

    def passes(rate):  # the search part accepts everything below 0.37
        points.setdefault(rate, {})["accepted"] = True
        return True

    rate = confirm_rate(
        held_back, points, 0.37, evaluate_on, 0.01, "accuracy", report=lambda _: None, passes=passes
    )
    assert rate == pytest.approx(0.33)
    assert points[0.25]["confirmed"] and not points[0.37]["confirmed"] and points[0.33]["confirmed"]
    # galloping down from 0.37 (0.36, 0.34, 0.30 holds), then bisecting: never the slow rates near 0.25
    assert [r for r in sorted(points, reverse=True) if "confirmed" in points[r]] == [
        0.37,
        0.36,
        0.34,
        0.33,
        0.32,
        0.3,
        0.25,
    ]


@pytest.mark.parametrize("boundary", [0.0, 0.01, 0.26, 0.45, 0.48, 0.49])
def test_refining_finds_the_largest_rate_both_parts_keep_probing_near_the_refused_one_first(boundary):
    """On a monotone curve the refinement lands on the boundary wherever it is; one grid point below
    the refused rate costs one probe, a few points below it at most 2 log2(distance) + 1."""
    from skeleton.pipeline import _Split, confirm_rate

    held_back = _Split(loader=None, dense=None, base=0.90)
    points = {0.5: {"accepted": True}}
    asked = []

    def evaluate_on(split, rate):
        asked.append(rate)
        return (0.90 if rate <= boundary + 1e-9 else 0.85), None

    def passes(rate):
        points[rate] = {"accepted": True}
        return True

    rate = confirm_rate(
        held_back, points, 0.5, evaluate_on, 0.01, "accuracy", report=lambda _: None, passes=passes
    )
    assert rate == pytest.approx(boundary)
    distance = round((0.5 - boundary) / 0.01)
    assert len(asked) - 1 <= 2 * math.log2(distance) + 1  # the first ask is the refused rate's confirmation
    if distance == 1:
        assert asked == [0.5, 0.49]


def test_refining_does_not_score_a_rate_the_search_part_already_judged():
    from skeleton.pipeline import _Split, confirm_rate

    held_back = _Split(loader=None, dense=None, base=0.90)
    points = {0.25: {"accepted": True}, 0.36: {"accepted": False}, 0.37: {"accepted": True}}
    asked = []

    def passes(rate):
        asked.append(rate)
        points[rate] = {"accepted": True}
        return True

    rate = confirm_rate(
        held_back,
        points,
        0.37,
        lambda split, r: (0.90 if r <= 0.33 else 0.85, None),
        0.01,
        "accuracy",
        report=lambda _: None,
        passes=passes,
    )
    assert rate == pytest.approx(0.33)  # 0.36 was refused by the search part: judged without a pass
    assert asked == [0.34, 0.3, 0.32, 0.33]


def test_confirmation_never_looks_at_or_below_a_floor():
    from skeleton.pipeline import _Split, confirm_rate

    held_back = _Split(loader=None, dense=None, base=0.90)
    points = {0.2: {"accepted": True}, 0.4: {"accepted": True}, 0.5: {"accepted": True}}
    asked = []

    def evaluate_on(split, rate):
        asked.append(rate)
        return 0.80, None  # nothing holds

    rate = confirm_rate(
        held_back, points, 0.5, evaluate_on, 0.01, "accuracy", report=lambda _: None, floor=0.3
    )
    assert rate == 0.3 and asked == [0.5, 0.4]  # 0.2 is below the floor another search already reached


def test_a_floored_search_that_nothing_above_its_floor_survives_returns_the_floor(monkeypatch):
    """The search half accepts rates past the floor, the pooled confirmation refuses them all: the floor
    comes back (another search's rate), with no point of this search marked chosen."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    import skeleton.pipeline as pipeline
    from skeleton.localize.config import SkeletonConfig

    model = SimpleNamespace(task=SimpleNamespace(headline="accuracy"))
    asked = {}

    def select(rate):
        asked["rate"] = rate
        return [torch.arange(FFN // 2)] * LAYERS, None

    def evaluate(_, loader):  # the search half keeps everything, the pooled split nothing past 0.3
        return {"accuracy": 0.9 if loader == "half" or asked["rate"] <= 0.3 else 0.8}

    parts = (pipeline._Split("half", None, 0.9), pipeline._Split("whole", None, 0.9))
    monkeypatch.setattr(pipeline, "search_splits", lambda *a: parts)
    monkeypatch.setattr(pipeline, "candidate", lambda m, *a: nullcontext(m))
    monkeypatch.setattr(pipeline, "collect", lambda m, loader: loader)  # not Predictions: evaluate decides
    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    cfg = SkeletonConfig(search={"acceptance": "pooled", "granularity": 0.1, "max_rate": 0.6})
    lines = []
    rate, _, points = pipeline.search_rate(
        model, None, select, _cost(), None, None, cfg, [], lines.append, floor=0.3
    )
    assert rate == 0.3 and points and all(p["rate"] > 0.3 for p in points)
    assert not any(p.get("chosen") for p in points) and any(p.get("accepted") for p in points)
    assert "nothing past 0.30" in lines[-1]


def _best_setup():
    from skeleton.localize.config import SkeletonConfig
    from skeleton.pipeline import ffn_only, ffn_share, selector

    backbone = tiny_backbone("bert")
    table = unit_table(backbone, flop_cost_model(backbone, 4, 16))
    scores = score_neurons(StandIn(backbone), [make_batch()], heads=True, head_score="channels")
    cfg = SkeletonConfig(pruning={"units": "best"})
    joint = selector(scores, cfg, table)
    return table, joint, ffn_only(joint.keys_of, table, cfg), ffn_share(table), cfg


def test_the_ffn_only_ranking_keeps_every_head_and_drops_neurons_in_the_joint_order():
    table, joint, alone, share, _ = _best_setup()
    keys = joint.keys_of(0.3)
    neurons = ~table.is_head
    for rate in (0.1, 0.3, share * 0.99):
        keep_ffn, keep_heads = alone(rate)
        assert all(len(k) == h for k, h in zip(keep_heads, table.heads))  # no head goes
        kept = torch.zeros(len(table), dtype=torch.bool)
        for i, k in enumerate(keep_ffn):
            kept[((table.layer == i) & neurons).nonzero().view(-1)[k]] = True
        removed = float(table.cost[neurons & ~kept].sum()) / table.total
        assert rate - float(table.cost[neurons].max()) / table.total <= removed <= rate + 1e-9
        # every dropped neuron ranks at or below every kept one under the joint keys
        assert keys[neurons & ~kept].max() <= keys[neurons & kept].min()
    assert not all(len(k) == h for k, h in zip(joint(0.3)[1], table.heads))  # the joint ranking drops heads


@pytest.mark.parametrize("ffn_rate, wins", [(0.55, True), (0.2, False)])
def test_best_keeps_the_ffn_only_network_only_where_it_is_modelled_faster(ffn_rate, wins):
    from skeleton.localize.config import Units
    from skeleton.pipeline import search_past_joint

    table, joint, alone, share, cfg = _best_setup()
    cost = flop_cost_model(tiny_backbone("bert"), 4, 16)
    asked = {}

    def search(select, floor, max_rate, ranking):
        asked.update(floor=floor, max_rate=max_rate, ranking=ranking)
        found = ffn_rate if ffn_rate > floor else floor
        return found, [[0.0, 0.9]], [{"rate": found, "ranking": "ffn", "chosen": True}]

    joint_points = [{"rate": 0.3, "ranking": "joint", "chosen": True}]
    select, rate, _, points, units = search_past_joint(
        search, joint, alone, (0.3, [[0.0, 0.9]], joint_points), table, cost, cfg, report=lambda _: None
    )
    assert asked == {"floor": 0.3, "max_rate": pytest.approx(min(0.99, share)), "ranking": Units.FFN}
    assert len(points) == 2 and sum("chosen" in p for p in points) == 1
    if wins:
        assert units == Units.FFN and rate == 0.55 and select is alone and points[1]["chosen"]
        assert cost.latency(*[[len(k) for k in x] for x in alone(0.55)]) < cost.latency(
            *[[len(k) for k in x] for x in joint(0.3)]
        )
    else:
        assert units == Units.JOINT and rate == 0.3 and select is joint and points[0]["chosen"]


def test_joint_ranking_refuses_scores_without_heads_or_of_another_shape():
    from skeleton.localize import Scores

    table = unit_table(tiny_backbone("bert"), _cost())
    with pytest.raises(ValueError, match=r"needs head scores: score with heads=True"):
        unit_scores(Scores(ffn=[torch.rand(FFN)] * LAYERS, heads=None), table)
    wrong = Scores(ffn=[torch.rand(FFN // 2)] * LAYERS, heads=[torch.rand(HEADS)] * LAYERS)
    with pytest.raises(ValueError, match=r"scores cover 72 units, the backbone has 136"):
        unit_scores(wrong, table)


def test_an_unreadable_cached_latency_model_is_named_and_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(cost_module, "cpu_busy", lambda others: (False, "idle"))
    backbone = tiny_backbone("bert")
    first = cached_cost_model(backbone, 4, 16, cache_dir=tmp_path, report=lambda _: None)
    (path,) = (tmp_path / "latency").glob("*.json")
    path.write_text('{"kind": "measured"}')  # a truncated or older entry
    said = []
    again = cached_cost_model(backbone, 4, 16, cache_dir=tmp_path, report=said.append)
    assert any(f"unreadable latency model {path}: measuring again" in line for line in said)
    assert again.kind == "measured" and CostModel.from_dict(json.loads(path.read_text())) == again
    assert again.dense_widths == first.dense_widths


def test_rescoring_rounds_run_on_their_own_sample_and_the_first_pass_on_the_full_one():
    backbone, table, score_once, first = _counted_scorer()
    rounds_seen = []

    def score_round():
        rounds_seen.append(1)
        return score_once()

    ranking = JointRanking(score_once, backbone, table, score_round=score_round, rounds=[0.1, 0.2, 0.3])
    assert len(first) == 1 and not rounds_seen
    ranking.complete()  # the rounds at 10%, 20% and 30%
    assert len(rounds_seen) == 3 and len(first) == 4  # (score_round calls score_once here)


def test_round_instances_cap_each_rounds_sample():
    from skeleton.localize.config import ConfigError, SkeletonConfig

    attribution = SkeletonConfig().attribution
    assert (attribution.max_instances, attribution.instances_per_round) == (256, 128)
    with pytest.raises(ConfigError, match=r"attribution\.round_instances"):
        SkeletonConfig.from_dict({"attribution": {"round_instances": 0}})
    small = SkeletonConfig.from_dict({"attribution": {"max_instances": 64}}).attribution
    assert small.instances_per_round == 64  # never more than the first pass
    every = SkeletonConfig.from_dict({"attribution": {"round_instances": None}}).attribution
    assert every.instances_per_round == 256


def test_a_candidate_the_family_cannot_slice_is_evaluated_on_masks(monkeypatch):
    import skeleton.pipeline as pipeline

    backbone, batch = tiny_backbone("bert"), make_batch()
    model = StandIn(backbone).eval()
    keep_ffn, keep_heads = [torch.arange(FFN // 2)] * LAYERS, [torch.arange(HEADS // 2)] * LAYERS
    with masked(backbone, keep_ffn, keep_heads):
        want = _forward(model, batch)
    monkeypatch.setattr(
        pipeline, "prune_units", lambda *a: (_ for _ in ()).throw(NotImplementedError("no slicing"))
    )
    with pipeline.candidate(model, keep_ffn, keep_heads) as fallback:
        assert fallback is model
        torch.testing.assert_close(_forward(fallback, batch), want)
    assert not torch.allclose(_forward(model, batch), want)  # the masks are gone afterwards


def test_lazy_rounds_give_the_full_ranking_at_every_rate_they_cover_and_resume_from_saved_scores():
    backbone, table, score_once, calls = _counted_scorer()

    rounds = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    full_keys = ranking_keys(JointRanking(score_once, backbone, table, rounds=rounds).complete(), table)
    calls.clear()
    lazy = JointRanking(score_once, backbone, table, rounds=rounds)
    assert len(calls) == 1 and lazy.exact_up_to >= 0.1  # a round masks at least its rate
    lazy.keys_for(0.3)  # the rounds at 10% and 20%, no more: the one at 30% only orders what lies past it
    assert lazy.done == 2 and len(calls) == 3 and lazy.exact_up_to >= 0.3
    covered, done = lazy.exact_up_to, lazy.done

    def same(keys, rate):
        got, want = select_units(keys, table, rate), select_units(full_keys, table, rate)
        return all(torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1]))

    assert all(same(lazy.keys_for(r), r) for r in (0.0, 0.05, 0.1, 0.17, 0.25, covered))
    assert len(calls) == done + 1
    assert not same(lazy.ranking, 0.55)  # past what it covers the ranking is not yet the full one
    saved = lazy.scores()
    assert saved.meta["rounds"] == done + 1 and saved.meta["exact_up_to"] == covered
    calls.clear()
    resumed = JointRanking(score_once, backbone, table, rounds=rounds, start=saved)
    assert len(calls) == 0 and resumed.exact_up_to == covered
    assert all(same(resumed.keys_for(r), r) for r in (0.2, covered, 0.4))
    assert resumed.passes_run == len(calls) == resumed.done - done == 1  # only the round at 30%
    assert all(same(resumed.keys_for(r), r) for r in (0.45, 0.61, 0.9, 1.0))
    assert resumed.scores().meta["rounds"] == len(rounds) + 1
    assert not JointRanking.resumes(saved, table, rounds[:3])  # saved under other rounds: score again
    saved.meta["ranking_version"] = 1  # or by an earlier definition of a round's mask
    assert not JointRanking.resumes(saved, table, rounds)


def test_each_search_half_scores_the_dense_model_as_a_pass_over_it_would(monkeypatch):
    """acceptance=confirm: the halves' dense predictions are sliced from the whole split's, not scored again."""
    from hydra.utils import instantiate

    import skeleton.pipeline as pipeline
    from skeleton.localize.config import SkeletonConfig
    from skeleton.uncertainty import collect
    from tests.helpers import compose_config

    monkeypatch.setattr(pipeline, "MIN_CONFIRM", 2)  # the fixtures are small: halves of 3 examples
    cfg = compose_config(["data.search_size=6"])
    data, model = instantiate(cfg.data), instantiate(cfg.module).eval()
    data.setup("fit")
    dense, preds = pipeline.measure(model, data)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "collect", lambda *a: pytest.fail("the dense model was run again"))
        confirm_cfg = SkeletonConfig(psi=1.0, search={"acceptance": "confirm"})
        search, confirm = pipeline.search_splits(model, data, dense, preds, confirm_cfg)
    assert confirm is not None and len(search.dense) + len(confirm.dense) == len(preds["search"])
    for part in (search, confirm):
        again = collect(model, part.loader)
        assert torch.allclose(part.dense.logits, again.logits, atol=1e-5)
        assert torch.equal(part.dense.fields["labels"], again.fields["labels"])


def test_a_pooled_confirmation_scores_the_pruned_model_on_the_whole_search_split(monkeypatch, tmp_path):
    """acceptance=pooled: the search part's predictions at a rate joined with the held-back part's are
    exactly a pass over the whole split, and that is what a candidate must keep within psi."""
    import shutil

    from hydra.utils import instantiate

    import skeleton.pipeline as pipeline
    from skeleton.localize.arch import ffn_widths
    from skeleton.localize.config import SkeletonConfig
    from skeleton.uncertainty import collect, score
    from tests.helpers import FIXTURES, compose_config

    monkeypatch.setattr(pipeline, "MIN_CONFIRM", 2)
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    train = tmp_path / "glue" / "STS-B" / "train.tsv"
    header, *rows = train.read_text().splitlines()
    words = ["red", "green", "blue", "black", "white", "brown", "pink", "grey", "gold"]  # no ties
    more = [
        r.rsplit("\t", 2)[0] + f" {words[i % 9]}\t{r.split(chr(9))[-2]} {words[i // 9]}\t{i * 7 % 26 / 5:.3f}"
        for i, r in enumerate(rows * 4)
    ]
    train.write_text("\n".join([header, *more]) + "\n")
    # STS-B's Pearson: no two parts of the split score alike, as accuracies on a few examples can
    cfg = compose_config(["task=stsb", "data.search_size=8", f"paths.data_dir={tmp_path}"])
    data, model = instantiate(cfg.data), instantiate(cfg.module).eval()
    data.setup("fit")
    dense, preds = pipeline.measure(model, data)
    skeleton_cfg = SkeletonConfig(psi=100.0, search={"acceptance": "pooled", "granularity": 0.25})
    search, confirm = pipeline.search_splits(model, data, dense, preds, skeleton_cfg)
    assert (
        len(search.dense) == 4
        and confirm.pooled is not None
        and confirm.dense is preds["search"]
        and len(confirm.dense) == 8
    )
    assert confirm.base == dense.search[model.task.headline]

    widths = ffn_widths(model.backbone)

    def select(rate):  # the first neurons of every layer, as many as the rate leaves
        return [torch.arange(max(1, round(w * (1 - rate)))) for w in widths], None

    cost = flop_cost_model(model.backbone, 4, 16)
    rate, _, points = pipeline.search_rate(
        model, data, select, cost, dense, preds, skeleton_cfg, [], report=lambda _: None
    )
    confirmed = [p for p in points if "confirm_score" in p]
    assert rate == 0.75 and confirmed  # psi=100: the largest grid rate below max_rate, confirmed
    whole = data.search_dataloader()
    for p in confirmed:
        with pipeline.candidate(model, *select(p["rate"])) as pruned:
            want = score(model.task, collect(pruned, whole))[model.task.headline]
            held_back = score(model.task, collect(pruned, confirm.loader))[model.task.headline]
        assert p["confirm_score"] == pytest.approx(want, abs=1e-6)
        assert held_back != pytest.approx(want, abs=1e-3)  # the held-back part alone would differ
