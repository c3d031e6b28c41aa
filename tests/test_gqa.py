"""Grouped-query attention: heads are selected, masked and pruned as whole key/value groups, and pruning
equals masking for LLaMA, Qwen2 and Mistral tiny configs with 2 key/value heads for 4 query heads."""

import copy

import pytest
import torch
from tiny_models import FFN, HEADS, HIDDEN, StandIn, make_batch, one_thread, tiny_config
from transformers import AutoModel

from skeleton.localize import (
    layer_parts,
    masked,
    prune_ffn,
    prune_heads,
    resize_to_widths,
    score_neurons,
    select_heads,
    select_neurons,
)

assert one_thread  # autouse fixture

KV = 2
GROUP = HEADS // KV
DH = HIDDEN // HEADS
FAMILIES = ["llama", "qwen2", "mistral"]


def gqa_backbone(family: str, seed: int = 0):
    cfg = tiny_config(family)
    cfg.num_key_value_heads = KV
    torch.manual_seed(seed)
    return AutoModel.from_config(cfg).eval()


def _forward(backbone, batch):
    with torch.no_grad():
        return backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_record_groups_and_selection_keeps_whole_groups(family):
    model = StandIn(gqa_backbone(family))
    scores = score_neurons(model, [make_batch()], heads=True)
    assert scores.meta["head_groups"] == [GROUP, GROUP]
    for rate in (0.25, 0.5, 0.75):
        for keep in select_heads(scores, rate, min_per_layer=0):
            groups = set((keep // GROUP).tolist())
            assert sorted(keep.tolist()) == [g * GROUP + i for g in sorted(groups) for i in range(GROUP)]
    # 4 groups in all, rate 0.5 drops the 2 with the lowest summed scores
    kept = select_heads(scores, 0.5, min_per_layer=0)
    assert sum(len(k) for k in kept) == HEADS
    group_scores = torch.cat([s.view(-1, GROUP).sum(1) for s in scores.heads])
    dropped = set(torch.argsort(group_scores, stable=True)[:2].tolist())
    assert {i * KV + int(g) for i, k in enumerate(kept) for g in torch.unique(k // GROUP)} == set(
        range(4)
    ) - dropped


@pytest.mark.parametrize("family", FAMILIES)
def test_group_pruning_equals_masking_and_reloads(family):
    dense, batch = gqa_backbone(family), make_batch()
    ref = _forward(dense, batch)
    ffn_keep = select_neurons([torch.rand(FFN), torch.rand(FFN)], 0.4)
    head_keep = [torch.tensor([2, 3]), torch.tensor([0, 1])]  # one whole group per layer
    with masked(dense, ffn_keep, head_keep):
        want = _forward(dense, batch)
    assert not torch.allclose(want, ref, atol=1e-3)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, ffn_keep)
    assert prune_heads(pruned, head_keep) == [2, 2]
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)
    for d, p, k in zip(layer_parts(dense), layer_parts(pruned), head_keep):
        group = k[0] // GROUP
        assert p.attn.num_kv_heads == 1 and p.attn.group_size == GROUP
        assert p.attn.k.out_features == p.attn.v.out_features == DH
        assert torch.equal(p.attn.k.weight, d.attn.k.weight[group * DH : (group + 1) * DH])
        assert torch.equal(p.attn.q.weight, d.attn.q.weight[k[0] * DH : (k[-1] + 1) * DH])

    fresh = gqa_backbone(family, seed=3)
    resize_to_widths(fresh, pruned.config.skeleton_ffn_widths, pruned.config.skeleton_heads_per_layer)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(_forward(fresh, batch), _forward(pruned, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_selected_groups_prune_like_masking(family):
    model, batch = StandIn(gqa_backbone(family)), make_batch()
    scores = score_neurons(model, [batch], heads=True)
    head_keep = select_heads(scores, 0.75, min_per_layer=0)  # 3 of 4 groups go: one layer loses all
    with masked(model.backbone, head_keep=head_keep):
        want = _forward(model.backbone, batch)
    pruned = copy.deepcopy(model.backbone)
    prune_heads(pruned, head_keep)
    assert sorted(len(k) for k in head_keep) == [0, GROUP]
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_group_is_refused(family):
    dense = gqa_backbone(family)
    with pytest.raises(ValueError, match="whole key/value groups"):
        prune_heads(dense, [torch.tensor([0, 2]), None])
    assert [p.attn.num_heads for p in layer_parts(dense)] == [HEADS, HEADS]  # nothing was sliced
