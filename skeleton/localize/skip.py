"""Skip sublayers whose units are all pruned, exactly.

An attention block with no heads left contributes only the bias of its output projection, or nothing, but
its forward cannot even run on zero heads (it reshapes with -1 heads): its class is swapped for a subclass
whose forward computes only that bias path. An FFN with no neurons needs no swap: its zero-width
projections already compute just the down projection's bias, at no cost. A layer left with neither is
bypassed once its first call shows it returns its input unchanged (pre-norm layers without output biases).
Parameters, hooks and state-dict keys stay as they are, and the swaps follow from the shapes alone, so
`resize_to_widths` on a fresh backbone installs the same skips before a reload.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .arch import LayerParts

# Parameterised submodules an attention block may hold besides q/k/v/out and still be skipped exactly:
# per-head query/key norms, rotary tables and DeBERTa's relative-position projections act only on heads.
_HEAD_LOCAL_PREFIXES = ("q_", "k_", "rotary", "pos_")


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args and torch.is_tensor(args[0]):
        return args[0]
    for value in kwargs.values():
        if torch.is_tensor(value) and value.is_floating_point():
            return value
    raise TypeError("cannot find the hidden states among the arguments of a skipped module")


class _EmptyAttention:
    """Forward of an attention block with no heads: the output projection of zero channels (its bias)."""

    def forward(self, *args, **kwargs):
        empty = _hidden_states(args, kwargs)[..., :0]
        name = self._skeleton_out
        return (self.get_submodule(name)(empty) if name else empty), None


class _BypassLayer:
    """A layer with no heads and no neurons: bypassed once a first call returned its input unchanged."""

    _skeleton_identity: bool | None = None
    _skeleton_arity: int = 0  # 0 = the layer returns a tensor, else the length of its tuple

    def forward(self, *args, **kwargs):
        x = _hidden_states(args, kwargs)
        if self._skeleton_identity:
            return x if self._skeleton_arity == 0 else (x, *([None] * (self._skeleton_arity - 1)))
        out = super().forward(*args, **kwargs)
        if self._skeleton_identity is None:
            first = out if torch.is_tensor(out) else out[0]
            self._skeleton_arity = 0 if torch.is_tensor(out) else len(out)
            self._skeleton_identity = bool(first.shape == x.shape and torch.equal(first, x))
        return out


_CLASSES: dict[tuple[type, type], type] = {}


def _swap(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if (mixin, cls) not in _CLASSES:
        _CLASSES[(mixin, cls)] = type(mixin.__name__.strip("_") + cls.__name__, (mixin, cls), {})
    module.__class__ = _CLASSES[(mixin, cls)]


def _relative_name(root: nn.Module, target: nn.Module) -> str | None:
    for name, module in root.named_modules():
        if module is target:
            return name
    return None


def _only_holds(module: nn.Module, allowed: list[nn.Module], prefixes: tuple[str, ...] = ()) -> bool:
    """True when every parameter of `module` belongs to one of `allowed` (or a child named with a prefix)."""
    ok = {id(p) for m in allowed if m is not None for p in m.parameters()}
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1].startswith(prefixes) and name:
            ok |= {id(p) for p in sub.parameters()}
    return all(id(p) in ok for p in module.parameters())


def attention_skippable(parts: LayerParts) -> bool:
    """Whether the attention module computes nothing beyond its heads and output projection, so that
    returning the output projection's bias is exactly what it would compute with zero heads."""
    a = parts.attn
    if parts.layer is not None and a.module is parts.layer:
        return False
    if any("residual" in name for name in inspect.signature(a.module.forward).parameters):
        return False  # it adds the residual itself (BLOOM, Falcon)
    return _only_holds(a.module, [a.q, a.k, a.v, a.qkv, a.out], _HEAD_LOCAL_PREFIXES)


def refresh_skips(parts: list[LayerParts]) -> None:
    """Install the skips the current shapes call for: an empty attention block, an empty layer (bypass)."""
    for p in parts:
        no_heads, no_neurons = p.attn.num_heads == 0, p.ffn_width == 0
        if no_heads and attention_skippable(p):
            p.attn.module._skeleton_out = _relative_name(p.attn.module, p.attn.out) or ""
            _swap(p.attn.module, _EmptyAttention)
        if no_heads and no_neurons and p.layer is not None:
            _swap(p.layer, _BypassLayer)
