"""Reversible 0/1 masks on FFN neurons and attention heads, for the pruning-rate search.

A mask multiplies the input of the down projection (FFN) or of the attention output projection (heads) by
a 0/1 vector through a forward pre-hook. No weight is copied or changed, so one dense model serves every
candidate rate of the search, and removing the hooks restores it exactly. Zeroing a channel at that point
is exactly what structural pruning removes, so a masked model and the pruned model agree up to float
rounding (tests/test_prune.py checks this for every family).

    with masked(backbone, select_neurons(scores, 0.4)):
        dev_score = evaluate()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .arch import check_per_layer, head_channels, layer_parts

KeepSpec = Sequence[torch.Tensor | None]


def as_keep_mask(keep: torch.Tensor | None, width: int) -> torch.Tensor:
    """A (width,) bool mask from a bool mask, a tensor of kept indices, or None (= keep all)."""
    if keep is None:
        return torch.ones(width, dtype=torch.bool)
    keep = torch.as_tensor(keep)
    if keep.dtype == torch.bool:
        if keep.shape != (width,):
            raise ValueError(f"bool keep mask has shape {tuple(keep.shape)}, expected ({width},)")
        return keep.cpu()
    idx = keep.long().cpu().view(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= width):
        raise ValueError(f"kept indices out of range [0, {width})")
    mask = torch.zeros(width, dtype=torch.bool)
    mask[idx] = True
    return mask


def _multiply_input(mask: torch.Tensor):
    cache: dict[tuple, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = mask.to(device=x.device, dtype=x.dtype)
        return (x * cache[key], *args[1:])

    return hook


class NeuronMask:
    """Masks on a backbone's FFN neurons and/or attention heads, applied as removable forward pre-hooks.

    ffn_keep: one entry per layer: bool mask (d_ff,), LongTensor of kept indices, or None (keep all).
    head_keep: the same per layer over heads. Zero kept heads is allowed here (the head outputs are
        zeroed), although `prune_heads` needs at least one per layer.
    Layers that keep everything get no hook at all, so an all-keep mask changes nothing bit for bit.
    """

    def __init__(
        self, backbone: nn.Module, ffn_keep: KeepSpec | None = None, head_keep: KeepSpec | None = None
    ):
        parts = layer_parts(backbone)
        self.ffn: list[torch.Tensor | None] = [None] * len(parts)
        self.heads: list[torch.Tensor | None] = [None] * len(parts)
        if ffn_keep is not None:
            check_per_layer(ffn_keep, len(parts), "ffn_keep")
            self.ffn = [as_keep_mask(k, p.ffn_width) for k, p in zip(ffn_keep, parts)]
        if head_keep is not None:
            check_per_layer(head_keep, len(parts), "head_keep")
            self.heads = [as_keep_mask(k, p.attn.num_heads) for k, p in zip(head_keep, parts)]
        self._parts = parts
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def apply(self) -> NeuronMask:
        if self.active:
            return self
        for p, fm, hm in zip(self._parts, self.ffn, self.heads):
            if fm is not None and not bool(fm.all()):
                self._handles.append(p.down.register_forward_pre_hook(_multiply_input(fm.float())))
            if hm is not None and not bool(hm.all()):
                ch = torch.zeros(p.attn.num_heads * p.attn.head_dim)
                ch[head_channels(hm.nonzero().view(-1), p.attn.head_dim)] = 1.0
                self._handles.append(p.attn.out.register_forward_pre_hook(_multiply_input(ch)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> NeuronMask:
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()


def masked(
    backbone: nn.Module, ffn_keep: KeepSpec | None = None, head_keep: KeepSpec | None = None
) -> NeuronMask:
    """Context manager: `with masked(backbone, ffn_keep, head_keep): ...` (hooks removed on exit)."""
    return NeuronMask(backbone, ffn_keep, head_keep)
