"""Choose the neurons to keep, and remove the others from the weights in place.

`select_neurons` turns scores into kept indices; `prune_ffn` / `prune_heads` slice the projections so the
pruned model is genuinely smaller and faster (not a masked dense one); `resize_to_widths` rebuilds those
shapes on a fresh dense backbone so a saved pruned state dict can be loaded; `backbone_flops` gives the
analytic cost to report the ideal speedup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .arch import (
    check_per_layer,
    get_adapter,
    group_heads,
    heads_per_layer,
    in_features,
    kv_groups,
    layer_parts,
    out_features,
    shared_modules,
    slice_in,
    slice_out,
)
from .masks import as_keep_mask
from .reconstruct import Compensation, compensate
from .skip import attention_skippable, refresh_skips

SCOPES = ("global", "layer")


def _n_drop(rate: float, n: int) -> int:
    # floor, with a little slack so that 0.29 * 100 (= 28.999999999999996) drops 29, not 28.
    return min(n, math.floor(rate * n + 1e-6))


def _layer_scores(scores, attr: str) -> list[torch.Tensor]:
    if hasattr(scores, attr):
        scores = getattr(scores, attr)
        if scores is None:
            raise ValueError(f"the Scores have no '{attr}' scores (score with heads=True)")
    out = [torch.as_tensor(s).detach().double().cpu().view(-1) for s in scores]
    return [torch.nan_to_num(s, nan=-math.inf) for s in out]  # a NaN score is ranked lowest


def _select(
    layer_scores: list[torch.Tensor], rate: float, scope: str, min_per_layer: int, round_to: int
) -> list[torch.Tensor]:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if min_per_layer < 0 or round_to < 1:
        raise ValueError("min_per_layer must be >= 0 and round_to >= 1")
    widths = [len(s) for s in layer_scores]
    if scope == "global":
        flat = torch.cat(layer_scores) if layer_scores else torch.zeros(0, dtype=torch.float64)
        keep = torch.ones(len(flat), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[: _n_drop(rate, len(flat))]] = False
        keeps = list(keep.split(widths))
    else:
        keeps = []
        for s in layer_scores:
            k = torch.ones(len(s), dtype=torch.bool)
            k[torch.argsort(s, stable=True)[: _n_drop(rate, len(s))]] = False
            keeps.append(k)
    out = []
    for s, k in zip(layer_scores, keeps):
        k, n, w = k.clone(), int(k.sum()), len(s)
        target = max(n, min(min_per_layer, w))
        target = min(w, math.ceil(target / round_to) * round_to)
        if target > n:  # add back the best-scoring dropped neurons of this layer
            order = torch.argsort(s.masked_fill(k, -math.inf), descending=True, stable=True)
            k[order[: target - n]] = True
        out.append(k.nonzero().view(-1))
    return out


def select_neurons(
    scores, rate: float, *, scope: str = "global", min_per_layer: int = 0, round_to: int = 1
) -> list[torch.Tensor]:
    """Sorted kept FFN neuron indices per layer after dropping the lowest-scoring `rate` fraction.

    scores: a `Scores` (its `.ffn` is used) or a list of per-layer 1-D score tensors.
    scope="global" (default) ranks all neurons of all layers together and drops floor(rate * total): layers
        hold very different numbers of task neurons (README, Choices: "ranking"). scope="layer" drops
        floor(rate * width) in each layer.
    min_per_layer: floor on each layer's kept width (capped at the width); 0 lets a layer vanish, which the
        pruned model handles (the FFN then outputs its down-projection bias).
    round_to: round each kept width UP to a multiple (e.g. 8 or 64 for tensor-core friendly GEMMs), never
        above the layer width. Floor and rounding add back the best-scoring dropped neurons of that layer,
        so the realised rate can be a little below `rate`.
    Ties are broken by position (earlier layer / lower index dropped first); NaN scores rank lowest.
    """
    return _select(_layer_scores(scores, "ffn"), rate, scope, min_per_layer, round_to)


def select_heads(
    scores,
    rate: float,
    *,
    scope: str = "global",
    min_per_layer: int = 1,
    round_to: int = 1,
    group_sizes: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Like `select_neurons` for attention heads (`Scores.heads`). The floor defaults to 1 head per layer;
    0 lets a layer lose all its heads (the attention block is then skipped, see `skip`).

    group_sizes: query heads per key/value head in each layer (grouped-query attention), by default the
        `head_groups` that `score_neurons` records in `Scores.meta`. Whole groups are then ranked (by the sum
        of their heads' scores) and kept or dropped together, since pruning can only remove a key/value head
        with all its query heads; `rate`, the floor and `round_to` count query heads.
    """
    layer_scores = _layer_scores(scores, "heads")
    if group_sizes is None:
        group_sizes = (getattr(scores, "meta", None) or {}).get("head_groups")
    if not group_sizes or all(g == 1 for g in group_sizes):
        return _select(layer_scores, rate, scope, min_per_layer, round_to)
    if len(group_sizes) != len(layer_scores):
        raise ValueError(f"group_sizes has {len(group_sizes)} entries for {len(layer_scores)} layers")
    grouped = [s.view(-1, g).sum(1) for s, g in zip(layer_scores, group_sizes)]
    g_max = max(group_sizes)
    kept = _select(grouped, rate, scope, math.ceil(min_per_layer / g_max), max(1, round_to // g_max))
    return [group_heads(k, g) for k, g in zip(kept, group_sizes)]


def _as_indices(keep: torch.Tensor | None, width: int) -> torch.Tensor:
    return as_keep_mask(keep, width).nonzero().view(-1)


def _layer_parts(backbone: nn.Module) -> list:
    """`layer_parts`, refusing an adapter that lists a shared module in two layers."""
    parts = layer_parts(backbone)
    clashes = shared_modules(parts)
    if clashes:
        raise ValueError(f"{'; '.join(clashes)}: list each shared layer once in the adapter")
    return parts


@torch.no_grad()
def prune_ffn(backbone: nn.Module, keep: Sequence[torch.Tensor | None]) -> list[int]:
    """Remove the FFN neurons not in `keep` (per layer: kept indices, a bool mask, or None = all), in place.

    Slices the up (and gate) projection's output rows and bias and the down projection's input columns,
    replacing them by new smaller Parameters with the same dtype, device and requires_grad (an optimizer
    built before pruning holds stale references: build it after). Layers that keep everything are not
    touched, so rate 0 is bit-identical. Records the widths on `backbone.config.skeleton_ffn_widths` so an
    export can rebuild the shapes with `resize_to_widths`. Returns the new widths.
    """
    parts = _layer_parts(backbone)
    check_per_layer(keep, len(parts), "keep")
    for p, k in zip(parts, keep):
        idx = _as_indices(k, p.ffn_width)
        if len(idx) == p.ffn_width:
            continue
        slice_out(p.up, idx)
        if p.gate is not None:
            slice_out(p.gate, idx)
        slice_in(p.down, idx)
    refresh_skips(parts)
    widths = [p.ffn_width for p in parts]
    backbone.config.skeleton_ffn_widths = widths
    return widths


@torch.no_grad()
def prune_heads(backbone: nn.Module, keep_heads: Sequence[torch.Tensor | None]) -> list[int]:
    """Remove the attention heads not in `keep_heads`, in place: q/k/v output rows (+bias) and the output
    projection's input columns, and the head-count attributes the attention forward reads.

    Supported: BERT/RoBERTa/ELECTRA, DeBERTa-v2 (incl. relative-position projections), DistilBERT, GPT-2
    (fused c_attn), LLaMA/Qwen2/Mistral (grouped-query attention: the kept heads must be whole key/value
    groups, as `select_heads` returns them) and inferred adapters whose check passed. A layer may keep no
    head: its attention block is then skipped (only the output bias remains), where the block holds nothing
    but its heads (ValueError otherwise, e.g. ALBERT whose attention module also holds the residual norm).
    Records `backbone.config.skeleton_heads_per_layer`. Returns the new head counts.
    """
    adapter = get_adapter(backbone)
    parts = _layer_parts(backbone)
    check_per_layer(keep_heads, len(parts), "keep_heads")
    todo = []
    for i, (p, k) in enumerate(zip(parts, keep_heads)):
        idx = _as_indices(k, p.attn.num_heads)
        if len(idx) == 0 and p.attn.num_heads and not attention_skippable(p):
            raise ValueError(
                f"layer {i} keeps no attention head, but its attention module "
                f"{type(p.attn.module).__name__} computes more than its heads, so it cannot be skipped "
                "exactly; keep at least one head per layer (select_heads(..., min_per_layer=1))"
            )
        if len(idx) < p.attn.num_heads:
            kv_groups(p.attn, idx)  # whole key/value groups, checked in every layer before any slicing
            todo.append((p, idx))
    if todo and adapter.prune_heads is None:
        raise NotImplementedError(f"head pruning is not implemented for {backbone.config.model_type}")
    for p, idx in todo:
        adapter.prune_heads(p.attn, idx)
    refresh_skips(parts)
    heads = [p.attn.num_heads for p in parts]
    backbone.config.skeleton_heads_per_layer = heads
    return heads


def prune_units(
    backbone: nn.Module,
    keep_ffn: Sequence[torch.Tensor | None],
    keep_heads: Sequence[torch.Tensor | None] | None = None,
    comp: Compensation | None = None,
) -> None:
    """Cut the backbone to its kept FFN neurons and heads and fold in a compensation: the one way a
    searched candidate, the final skeleton, a reload and a serving view are built, so they are equal.
    Heads are sliced only where one goes (a family that cannot slice heads still prunes its FFN)."""
    prune_ffn(backbone, keep_ffn)
    if keep_heads is not None and any(
        len(_as_indices(k, h)) < h for k, h in zip(keep_heads, heads_per_layer(backbone))
    ):
        prune_heads(backbone, keep_heads)
    if comp is not None:
        compensate(backbone, comp)


def resize_to_widths(
    backbone: nn.Module, widths: Sequence[int] | None = None, heads: Sequence[int] | None = None
) -> None:
    """Shrink a freshly built dense backbone to the given FFN widths / head counts, so that the state dict
    of a pruned model loads into it (`load_state_dict` then overwrites every value). `widths` / `heads`
    default to `config.skeleton_ffn_widths` / `config.skeleton_heads_per_layer` when present.

    The kept channels are simply the first ones: their values are placeholders until the load.
    """
    cfg = backbone.config
    widths = widths if widths is not None else getattr(cfg, "skeleton_ffn_widths", None)
    heads = heads if heads is not None else getattr(cfg, "skeleton_heads_per_layer", None)
    parts = layer_parts(backbone)
    if widths is not None:
        check_per_layer(widths, len(parts), "widths")
        for w, p in zip(widths, parts):
            if not 0 <= w <= p.ffn_width:
                raise ValueError(f"width {w} not in [0, {p.ffn_width}]")
        prune_ffn(backbone, [torch.arange(w) for w in widths])
    if heads is not None:
        check_per_layer(heads, len(parts), "heads")
        for h, p in zip(heads, parts):
            if not 0 <= h <= p.attn.num_heads:
                raise ValueError(f"head count {h} not in [0, {p.attn.num_heads}]")
        prune_heads(backbone, [torch.arange(h) for h in heads])


def _proj_flops(m: nn.Module | None, tokens: int) -> int:
    return 0 if m is None else 2 * tokens * in_features(m) * out_features(m)


def backbone_flops(backbone: nn.Module, seq_len: int) -> dict[str, int]:
    """Analytic forward FLOPs (2 per multiply-add) of the transformer layers for one sequence of `seq_len`
    tokens, from the current (possibly pruned) shapes: `attention` (q/k/v and output projections plus the
    QK^T and AV products, counted in full even for causal models), `ffn` (up, gate, down) and `total`.
    Embeddings, norms, activations and the task head are left out: they do not change with pruning.
    dense_total / pruned_total is the ideal speedup.
    """
    t = seq_len
    attn = ffn = 0
    for p in layer_parts(backbone):
        a = p.attn
        attn += sum(_proj_flops(m, t) for m in (a.q, a.k, a.v, a.qkv, a.out))
        attn += 2 * 2 * t * t * a.num_heads * a.head_dim
        ffn += _proj_flops(p.up, t) + _proj_flops(p.gate, t) + _proj_flops(p.down, t)
    return {"attention": attn, "ffn": ffn, "total": attn + ffn}
