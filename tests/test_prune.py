"""Structural pruning must compute exactly what masking computes, for every supported family."""

import copy

import pytest
import torch
from tiny_models import (
    FAMILIES,
    FFN,
    GATED,
    GQA,
    HEADS,
    HIDDEN,
    LAYERS,
    make_batch,
    one_thread,
    tiny_backbone,
)

from skeleton.localize import (
    Scores,
    backbone_flops,
    count_parameters,
    ffn_widths,
    heads_per_layer,
    layer_parts,
    masked,
    prune_ffn,
    prune_heads,
    random_scores,
    resize_to_widths,
    select_heads,
    select_neurons,
)

assert one_thread  # autouse fixture


def _forward(backbone, batch):
    with torch.no_grad():
        return backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


def _scores(backbone, seed=1):
    return Scores(*random_scores(layer_parts(backbone), heads=True, seed=seed))


def _per_neuron_params(backbone):
    p = layer_parts(backbone)[0]
    n = HIDDEN + (p.up.bias is not None) + HIDDEN  # up row (+bias) and down column
    if p.gate is not None:
        n += HIDDEN + (p.gate.bias is not None)
    return n


def _keep_sets(scores):
    half = select_neurons(scores, 0.5, scope="layer")
    return {
        "global-0.3": select_neurons(scores, 0.3),
        "layer-0.7": select_neurons(scores, 0.7, scope="layer"),
        "zero-width-layer": [torch.zeros(0, dtype=torch.long), half[1]],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked_and_reloads(family):
    dense, batch = tiny_backbone(family), make_batch()
    ref = _forward(dense, batch)
    scores = _scores(dense)
    per_neuron = _per_neuron_params(dense)
    for name, keep in _keep_sets(scores).items():
        with masked(dense, keep):
            want = _forward(dense, batch)
        assert not torch.allclose(want, ref, atol=1e-3), f"{name}: masking had no effect, test is vacuous"
        pruned = copy.deepcopy(dense)
        before = count_parameters(pruned)["total"]
        prune_ffn(pruned, keep)
        got = _forward(pruned, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{family} {name}")
        widths = [len(k) for k in keep]
        assert ffn_widths(pruned) == widths == pruned.config.skeleton_ffn_widths
        removed = LAYERS * FFN - sum(widths)
        assert count_parameters(pruned)["total"] == before - removed * per_neuron

        fresh = tiny_backbone(family, seed=7)
        resize_to_widths(fresh, pruned.config.skeleton_ffn_widths)
        fresh.load_state_dict(pruned.state_dict())
        assert torch.equal(_forward(fresh, batch), got)


@pytest.mark.parametrize("family", FAMILIES)
def test_rate_zero_is_bit_identical(family):
    dense, batch = tiny_backbone(family), make_batch()
    ref = _forward(dense, batch)
    keep = select_neurons(_scores(dense), 0.0)
    with masked(dense, keep):
        assert torch.equal(_forward(dense, batch), ref)
    before = [p.data_ptr() for p in dense.parameters()]
    prune_ffn(dense, keep)
    assert torch.equal(_forward(dense, batch), ref)
    assert [p.data_ptr() for p in dense.parameters()] == before  # nothing was even copied


def test_mask_is_reversible():
    dense, batch = tiny_backbone("bert"), make_batch()
    ref = _forward(dense, batch)
    m = masked(dense, select_neurons(_scores(dense), 0.6))
    with m:
        assert m.active and not torch.allclose(_forward(dense, batch), ref)
    assert not m.active and torch.equal(_forward(dense, batch), ref)


def test_gpt2_conv1d_orientation():
    dense = tiny_backbone("gpt2")
    keep = [torch.tensor([0, 5, 63]), torch.arange(10)]
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, keep)
    for d, p, k in zip(dense.h, pruned.h, keep):
        # Conv1D weight is (in, out): the up projection (c_fc) loses columns, the down (c_proj) rows.
        assert p.mlp.c_fc.weight.shape == (HIDDEN, len(k)) and p.mlp.c_fc.nf == len(k)
        assert p.mlp.c_proj.weight.shape == (len(k), HIDDEN) and p.mlp.c_proj.nx == len(k)
        assert torch.equal(p.mlp.c_fc.weight, d.mlp.c_fc.weight[:, k])
        assert torch.equal(p.mlp.c_fc.bias, d.mlp.c_fc.bias[k])
        assert torch.equal(p.mlp.c_proj.weight, d.mlp.c_proj.weight[k, :])
        assert torch.equal(p.mlp.c_proj.bias, d.mlp.c_proj.bias)


@pytest.mark.parametrize("family", sorted(GATED))
def test_gated_mlp_slices_gate_and_up(family):
    dense = tiny_backbone(family)
    keep = [torch.tensor([1, 2, 40]), torch.tensor([63])]
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, keep)
    for d, p, k in zip(dense.layers, pruned.layers, keep):
        for name in ("gate_proj", "up_proj"):
            new, old = getattr(p.mlp, name), getattr(d.mlp, name)
            assert new.out_features == len(k) and torch.equal(new.weight, old.weight[k])
        assert p.mlp.down_proj.in_features == len(k)
        assert torch.equal(p.mlp.down_proj.weight, d.mlp.down_proj.weight[:, k])


def test_prune_preserves_dtype_and_requires_grad():
    dense = tiny_backbone("bert").to(torch.bfloat16)
    for p in dense.parameters():
        p.requires_grad_(False)
    dense.encoder.layer[0].output.dense.weight.requires_grad_(True)
    prune_ffn(dense, select_neurons(_scores(dense), 0.5, scope="layer"))
    up, down = dense.encoder.layer[0].intermediate.dense, dense.encoder.layer[0].output.dense
    assert up.weight.dtype == torch.bfloat16 and not up.weight.requires_grad
    assert isinstance(down.weight, torch.nn.Parameter) and down.weight.requires_grad
    assert up.out_features == down.in_features == 32


HEAD_FAMILIES = [f for f in FAMILIES if f not in GQA]  # GQA: tests/test_gqa.py


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_head_pruning_equals_head_masking(family):
    dense, batch = tiny_backbone(family), make_batch()
    ref = _forward(dense, batch)
    scores = _scores(dense)
    ffn_keep = select_neurons(scores, 0.4)
    head_keep = [torch.tensor([0, 2]), torch.tensor([3])]
    with masked(dense, ffn_keep, head_keep):
        want = _forward(dense, batch)
    assert not torch.allclose(want, ref, atol=1e-3)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, ffn_keep)
    prune_heads(pruned, head_keep)
    got = _forward(pruned, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert heads_per_layer(pruned) == [2, 1] == pruned.config.skeleton_heads_per_layer

    fresh = tiny_backbone(family, seed=3)
    resize_to_widths(fresh, pruned.config.skeleton_ffn_widths, pruned.config.skeleton_heads_per_layer)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(_forward(fresh, batch), got)


def test_head_pruning_parameter_count():
    dense = tiny_backbone("bert")
    before = count_parameters(dense)["attention"]
    prune_heads(dense, [torch.tensor([1]), None])
    dh = HIDDEN // HEADS
    # 3 heads gone in layer 0: q/k/v rows (+bias) and output projection columns
    assert count_parameters(dense)["attention"] == before - 3 * (3 * dh * (HIDDEN + 1) + dh * HIDDEN)


def _empty_keeps(family):
    """Layer 0 loses every head and neuron (a dropped layer); layer 1 keeps half its heads and neurons."""
    none = torch.zeros(0, dtype=torch.long)
    half_heads = torch.tensor([2, 3]) if family in GQA else torch.tensor([1, 3])  # whole groups under GQA
    return [none, torch.arange(0, FFN, 2)], [none, half_heads]


@pytest.mark.parametrize("family", FAMILIES)
def test_emptied_sublayers_are_skipped_and_equal_masking(family):
    dense, batch = tiny_backbone(family), make_batch()
    ffn_keep, head_keep = _empty_keeps(family)
    for ffn, heads in (([None, None], head_keep), (ffn_keep, [None, None]), (ffn_keep, head_keep)):
        with masked(dense, ffn, heads):
            want = _forward(dense, batch)
        pruned = copy.deepcopy(dense)
        prune_ffn(pruned, ffn)
        prune_heads(pruned, heads)
        torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)  # after the bypass

    parts = layer_parts(pruned)
    assert parts[0].ffn_width == 0 and parts[0].attn.num_heads == 0
    assert type(parts[0].attn.module).__name__.startswith("EmptyAttention")
    assert type(parts[0].layer).__name__.startswith("BypassLayer")
    # pre-norm layers without output biases compute the identity once emptied: they are bypassed
    assert parts[0].layer._skeleton_identity == (family in GATED)

    fresh = tiny_backbone(family, seed=5)
    resize_to_widths(fresh, pruned.config.skeleton_ffn_widths, pruned.config.skeleton_heads_per_layer)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(_forward(fresh, batch), _forward(pruned, batch))


# ---------------------------------------------------------------------------------------------------------
# select_neurons


def _two_layer_scores():
    return [torch.arange(10.0), torch.arange(10.0, 20.0)]  # layer 0 all below layer 1


def test_select_global_vs_layer():
    s = _two_layer_scores()
    g = select_neurons(s, 0.5)
    assert [len(k) for k in g] == [0, 10]
    lay = select_neurons(s, 0.5, scope="layer")
    assert [k.tolist() for k in lay] == [[5, 6, 7, 8, 9], [15 - 10, 6, 7, 8, 9]]
    assert all(k.dtype == torch.long for k in g + lay)


@pytest.mark.parametrize("rate,dropped", [(0.0, 0), (0.29, 29), (0.5, 50), (0.333, 33), (1.0, 100)])
def test_select_exact_counts(rate, dropped):
    s = [torch.rand(60, generator=torch.Generator().manual_seed(0)), torch.rand(40)]
    assert 100 - sum(len(k) for k in select_neurons(s, rate)) == dropped
    per_layer = select_neurons(s, rate, scope="layer")
    assert [len(k) for k in per_layer] == [60 - int(rate * 60 + 1e-6), 40 - int(rate * 40 + 1e-6)]


def test_select_floor_keeps_best_of_layer():
    s = _two_layer_scores()
    k = select_neurons(s, 0.5, min_per_layer=3)
    assert k[0].tolist() == [7, 8, 9] and len(k[1]) == 10
    assert [len(x) for x in select_neurons(s, 1.0, min_per_layer=20)] == [10, 10]  # capped at width


def test_select_round_to():
    s = [torch.rand(64), torch.rand(10)]
    k = select_neurons(s, 0.4, scope="layer", round_to=8)
    assert [len(x) for x in k] == [40, 8]  # 64-25=39 -> 40; 10-4=6 -> 8
    k = select_neurons([torch.rand(64), torch.rand(10)], 0.1, scope="layer", round_to=8)
    assert [len(x) for x in k] == [64, 10]  # 58 -> 64; 9 -> 16 capped at 10
    k = select_neurons([torch.rand(64)], 1.0, round_to=8)
    assert len(k[0]) == 0  # zero is a multiple: use min_per_layer to keep some


def test_select_sorted_and_keeps_top():
    s = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7])
    (k,) = select_neurons([s], 0.4)
    assert k.tolist() == [0, 2, 4]


def test_select_errors_and_heads_floor():
    s = _two_layer_scores()
    with pytest.raises(ValueError, match="rate"):
        select_neurons(s, 1.5)
    with pytest.raises(ValueError, match="scope"):
        select_neurons(s, 0.5, scope="model")
    with pytest.raises(ValueError, match="heads"):
        select_heads(Scores(ffn=s), 0.5)
    assert [len(k) for k in select_heads([torch.rand(4), torch.rand(4)], 1.0)] == [1, 1]


def test_backbone_flops_analytic():
    dense = tiny_backbone("bert")
    t = 10
    attn = LAYERS * (4 * 2 * t * HIDDEN * HIDDEN + 2 * 2 * t * t * HIDDEN)
    ffn = LAYERS * (2 * 2 * t * HIDDEN * FFN)
    assert backbone_flops(dense, t) == {"attention": attn, "ffn": ffn, "total": attn + ffn}
    prune_ffn(dense, [torch.arange(16), torch.arange(32)])
    assert backbone_flops(dense, t)["ffn"] == 2 * 2 * t * HIDDEN * (16 + 32)
