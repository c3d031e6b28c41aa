"""Adapters inferred from a backbone's module structure, and the forward check every adapter must pass.

For a family with no registered adapter, each layer's FFN and attention are found from shapes and names:
the FFN is an up projection (and a gate) hidden -> d_ff and a down projection d_ff -> hidden; attention is
query/key/value projections hidden -> heads * head_dim (key/value: kv_heads * head_dim, from the config)
named q/query, k/key, v/value, and the output projection heads * head_dim -> hidden closest to them. Fused
or ambiguous layouts are refused with what was not found, never guessed. `check_adapter` then proves the
result on the real model in seconds: masking neurons changes the output, and slicing equals masking.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arch import (
    ADAPTER_FIX,
    Adapter,
    AttentionParts,
    LayerParts,
    UnsupportedArchitectureError,
    get_adapter,
    group_heads,
    in_features,
    layer_parts,
    model_type_of,
    out_features,
    prune_separate_heads,
    shared_modules,
    supported_model_types,
)

log = logging.getLogger(__name__)

LINEAR = (nn.Linear, Conv1D)
_Q, _K, _V = ("q", "query", "wq"), ("k", "key", "wk"), ("v", "value", "wv")
_FUSED_NAMES = ("qkv", "query_key_value", "in_proj", "c_attn")


@dataclass(frozen=True)
class Dims:
    """The sizes the config promises; inference matches module shapes against them."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int | None


@dataclass(frozen=True)
class LayerNames:
    """Where one layer's parts are, as names relative to the layer (q/k/v, or one fused qkv)."""

    up: str
    gate: str | None
    down: str
    attn: str
    q: str | None
    k: str | None
    v: str | None
    out: str
    qkv: str | None = None


def _first(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_dims(config) -> Dims:
    """Hidden size, head counts, head_dim and FFN width from a config, whatever the family calls them."""
    hidden = _first(config, ("hidden_size", "n_embd", "d_model", "dim"))
    heads = _first(config, ("num_attention_heads", "n_head", "n_heads", "num_heads"))
    if hidden is None or heads is None:
        raise unsupported(
            getattr(config, "model_type", None), "its config names no hidden size or head count"
        )
    kv = _first(config, ("num_key_value_heads", "num_kv_heads", "n_kv_heads"))
    if kv is None and getattr(config, "multi_query", False):
        kv = 1
    head_dim = _first(config, ("head_dim", "attention_head_size")) or hidden // heads
    inter = _first(
        config, ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim", "d_ff", "ffn_hidden_size")
    )
    return Dims(hidden, heads, kv or heads, head_dim, inter)


def _role(name: str) -> str | None:
    """'q', 'k' or 'v' from a projection's name (q_proj, query, k_lin, wv, ...)."""
    leaf = name.rsplit(".", 1)[-1].lower()
    token = leaf.split("_")[0]
    for role, names in (("q", _Q), ("k", _K), ("v", _V)):
        if token in names:
            return role
    return None


def _fused_name(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return any(f in leaf for f in _FUSED_NAMES)


def _common_prefix(names: list[str]) -> str:
    split = [n.split(".")[:-1] for n in names]
    common = []
    for pieces in zip(*split):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def _shared_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


class _Missing(UnsupportedArchitectureError):
    """One part of a layer that inference could not find (the message says which)."""


def _one(found: list[str], what: str) -> str:
    if len(found) != 1:
        raise _Missing(f"{what}: {'none' if not found else 'ambiguous between ' + ', '.join(found)}")
    return found[0]


def _find_qkv(readers: dict, dims: Dims) -> tuple[str | None, str | None, str | None, str | None]:
    """(q, k, v, None) for separate projections, (None, None, None, qkv) for one fused projection."""
    qw, kvw = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    roles: dict[str, list[str]] = {"q": [], "k": [], "v": []}
    for n, m in readers.items():
        role = _role(n)
        if role and out_features(m) == (qw if role == "q" else kvw):
            roles[role].append(n)
    fused = [n for n, m in readers.items() if out_features(m) == qw + 2 * kvw or _fused_name(n)]
    if not any(roles.values()) and fused:
        return None, None, None, _one(fused, "fused query/key/value projection")
    width = {"q": qw, "k": kvw, "v": kvw}
    q, k, v = (_one(roles[r], f"{r} projection (hidden {dims.hidden} -> {width[r]})") for r in "qkv")
    return q, k, v, None


def _find_ffn(rest: dict, dims: Dims) -> tuple[str, str | None, str]:
    """(up, gate, down): hidden -> d_ff (one or two, the gate named so) and d_ff -> hidden."""
    h = dims.hidden
    widths = {dims.intermediate} if dims.intermediate else {out_features(m) for m in rest.values()} - {h}
    for width in widths:
        ups = [n for n, m in rest.items() if in_features(m) == h and out_features(m) == width]
        downs = [n for n, m in rest.items() if in_features(m) == width and out_features(m) == h]
        if ups and downs:
            break
    else:
        inter = dims.intermediate
        fused = [n for n, m in rest.items() if inter and out_features(m) == 2 * inter]
        what = "FFN: a fused gate/up projection " + fused[0] if fused else "FFN up/down projections"
        raise _Missing(f"{what} (hidden {h} -> d_ff -> hidden {h})")
    down = _one(downs, "FFN down projection")
    gates = [n for n in ups if "gate" in n.rsplit(".", 1)[-1].lower()]
    if len(ups) == 2 and len(gates) == 1:
        return next(n for n in ups if n not in gates), gates[0], down
    return _one(ups, "FFN up projection"), None, down


def infer_layer(layer: nn.Module, dims: Dims) -> LayerNames:
    """Names of the FFN and attention projections of one layer, from shapes, names and placement."""
    lins = {n: m for n, m in layer.named_modules() if isinstance(m, LINEAR)}
    h, qw = dims.hidden, dims.heads * dims.head_dim
    q, k, v, qkv = _find_qkv({n: m for n, m in lins.items() if in_features(m) == h}, dims)
    attn_names = [q, k, v] if qkv is None else [qkv]
    rest = {n: m for n, m in lins.items() if n not in attn_names}
    outs = [n for n, m in rest.items() if in_features(m) == qw and out_features(m) == h]
    if not outs:
        raise _Missing(f"attention output projection ({qw} -> hidden {h})")
    best = max(_shared_prefix_len(n, attn_names[0]) for n in outs)
    closest = [n for n in outs if _shared_prefix_len(n, attn_names[0]) == best]
    out = _one(closest, "attention output projection")
    rest.pop(out)
    up, gate, down = _find_ffn(rest, dims)
    return LayerNames(up, gate, down, _common_prefix(attn_names), q, k, v, out, qkv)


def _parts(layer: nn.Module, names: LayerNames, dims: Dims) -> LayerParts:
    get = layer.get_submodule
    module, out, d = get(names.attn), get(names.out), dims.head_dim
    if names.qkv is not None:
        attn = AttentionParts(module, None, None, None, out, d, qkv=get(names.qkv))
    else:
        kv = out_features(get(names.k)) // d if dims.kv_heads != dims.heads else None
        q, k, v = get(names.q), get(names.k), get(names.v)
        attn = AttentionParts(module, q, k, v, out, d, num_kv_heads=kv)
    return LayerParts(get(names.up), get(names.gate) if names.gate else None, get(names.down), attn)


def find_layer_list(backbone: nn.Module, dims: Dims) -> tuple[str, list[LayerNames]]:
    """The ModuleList of transformer layers: the longest (then deepest) one whose every element holds one
    FFN and one attention block, with the same names in each."""
    found, errors = [], []
    for name, module in backbone.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        try:
            names = [infer_layer(layer, dims) for layer in module]
        except _Missing as err:
            errors.append(f"{name}: {err}")
            continue
        if len(set(names)) != 1:
            errors.append(f"{name}: its layers are built differently")
            continue
        found.append((len(module), name.count("."), name, names))
    if not found:
        what = "; ".join(errors) or "no nn.ModuleList of layers"
        raise unsupported(
            model_type_of(backbone), f"inferring one from {type(backbone).__name__} failed: {what}"
        )
    _, _, name, names = max(found, key=lambda f: (f[0], f[1]))
    return _relative_to_base(backbone, name), names


def unsupported(model_type: str | None, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"no localization adapter for model_type={model_type!r}: none is registered (registered: "
        f"{', '.join(supported_model_types())}) and {what}. To use it, {ADAPTER_FIX}"
    )


def _relative_to_base(backbone: nn.Module, name: str) -> str:
    """`name` relative to the base model, so the same path serves a task wrapper and the bare model."""
    base = getattr(backbone, "base_model", backbone)
    if base is not backbone:
        for prefix, module in backbone.named_modules():
            if module is base and prefix and name.startswith(prefix + "."):
                return name[len(prefix) + 1 :]
    return name


_INFERRED: dict[tuple, Adapter] = {}


def _cache_key(backbone: nn.Module) -> tuple:
    """One inferred adapter per family and size: the parts closure holds the config's head_dim."""
    return model_type_of(backbone), type(backbone).__name__, config_dims(backbone.config)


def inferred_adapter(backbone: nn.Module) -> Adapter:
    """The inferred adapter for the backbone's family, inferred once per process from the dense model."""
    if getattr(backbone, "config", None) is None:
        raise unsupported(None, f"{type(backbone).__name__} has no config")
    key = _cache_key(backbone)
    if key not in _INFERRED:
        _INFERRED[key] = infer_adapter(backbone)
    return _INFERRED[key]


def infer_adapter(backbone: nn.Module) -> Adapter:
    """An Adapter from the structure of `backbone` (dense shapes), without registering it."""
    config = getattr(backbone, "config", None)
    if config is None:
        raise unsupported(None, f"{type(backbone).__name__} has no config")
    dims = config_dims(config)
    path, names = find_layer_list(backbone, dims)
    layer_names = names[0]
    # A fused q/k/v projection has a family-specific layout (per head or per projection): heads are
    # scored and masked, but not sliced.
    prune_heads = None if layer_names.qkv else prune_separate_heads
    return Adapter(path, lambda layer: _parts(layer, layer_names, dims), prune_heads)


# ----------------------------------------------------------------------------------------------------------
# The check


class AdapterCheckError(UnsupportedArchitectureError):
    """An adapter that fails the forward check on the real model: its slices would be wrong."""


def _probe_copy(backbone: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every tensor: slicing it assigns new Parameters to the copy's
    modules only, so the real model is untouched and nothing large is copied."""
    memo = {id(t): t for t in [*backbone.parameters(), *backbone.buffers()]}
    return copy.deepcopy(backbone, memo).eval()


def _probe_inputs(backbone: nn.Module) -> dict:
    vocab = getattr(backbone.config, "vocab_size", None) or 100
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(vocab, 1000), (2, 7), generator=g)
    ids[ids < 3] += 3  # stay clear of the usual special ids
    device = next(backbone.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}


@torch.no_grad()
def _forward(backbone: nn.Module, inputs: dict) -> torch.Tensor:
    out = backbone(**inputs)
    hidden = getattr(out, "last_hidden_state", None)
    return (hidden if hidden is not None else out[0]).float()


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(torch.allclose(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=tol))


def _ffn_keep(parts: list[LayerParts]) -> list[torch.Tensor]:
    """Drop every other neuron, and all of the first layer's when there are several layers."""
    keep = [torch.arange(1, max(p.ffn_width, 1), 2) for p in parts]
    if len(parts) > 1:
        keep[0] = torch.zeros(0, dtype=torch.long)
    return keep


def _head_keep(parts: list[LayerParts]) -> list[torch.Tensor]:
    """Keep every other key/value group (a wrong head_dim splits heads then); the last layer keeps none
    when it can be skipped."""
    from .skip import attention_skippable

    keep = []
    for p in parts:
        g = p.attn.group_size
        groups = torch.arange(1, max(p.attn.num_heads // g, 1), 2)
        keep.append(group_heads(groups, g))
    if len(parts) > 1 and attention_skippable(parts[-1]):
        keep[-1] = torch.zeros(0, dtype=torch.long)
    return keep


def _check_slicing(backbone, inputs, ref, what: str, prune, keep) -> str | None:
    """None when pruning a probe copy with `keep` equals masking the real model with it, else why not."""
    from .masks import masked

    mask_kw = {"ffn_keep": keep} if what == "FFN neurons" else {"head_keep": keep}
    with masked(backbone, **mask_kw):
        want = _forward(backbone, inputs)
    if torch.equal(want, ref):
        return f"masking {what} did not change the output (the masked point is not on the forward path)"
    probe = _probe_copy(backbone)
    try:
        prune(probe, keep)
        got = _forward(probe, inputs)
    except Exception as err:  # any failure of the sliced forward is the finding, reported by name
        return f"the forward with sliced {what} failed: {type(err).__name__}: {err}"
    if not _close(got, want, next(backbone.parameters()).dtype):
        return f"slicing {what} differs from masking them by {float((got - want).abs().max()):.3g}"
    return None


def _reference(backbone: nn.Module, inputs: dict, model_type) -> torch.Tensor:
    try:
        return _forward(backbone, inputs)
    except Exception as err:  # the check needs a plain forward: report why there is none
        raise AdapterCheckError(
            f"model_type={model_type!r}: the backbone's forward on a probe batch of input_ids failed "
            f"({type(err).__name__}: {err}); localization needs a model whose forward takes input_ids alone"
        ) from err


def _check_heads(backbone, adapter: Adapter, inputs, ref, parts, model_type) -> tuple[Adapter, str | None]:
    """The adapter after the head check and, when head pruning is off, why. A failing inferred adapter
    loses head pruning (FFN pruning stays); a failing registered or user adapter is an error."""
    from .prune import prune_heads

    if adapter.prune_heads is None:
        return adapter, "the adapter slices no heads (e.g. a fused q/k/v projection)"
    failure = _check_slicing(backbone, inputs, ref, "attention heads", prune_heads, _head_keep(parts))
    if failure is None:
        return adapter, None
    key = _cache_key(backbone)
    if _INFERRED.get(key) is not adapter:
        raise AdapterCheckError(
            f"the adapter for model_type={model_type!r} fails its head check: {failure}. {ADAPTER_FIX}"
        )
    _INFERRED[key] = adapter = replace(adapter, prune_heads=None)
    return adapter, failure


def check_adapter(backbone: nn.Module, *, heads: bool = True, require_heads: bool = False) -> Adapter:
    """Resolve the backbone's adapter and prove it on the real model, before any training: masking FFN
    neurons (and heads) changes the output, and slicing a probe copy equals masking (an emptied FFN and
    attention block included). The real model is left untouched (and in its train/eval mode); the probe
    batch is 2 x 7 tokens, so this takes seconds.

    Raises UnsupportedArchitectureError (no adapter) or AdapterCheckError (a wrong one) naming the
    model_type, what failed and the fix. When head slicing fails for an inferred adapter, head pruning is
    switched off for the family (logged; FFN pruning stays), unless `require_heads` (e.g. head_rate > 0),
    which makes it an error. heads=False skips the head check. Returns the adapter to use.
    """
    from .prune import prune_ffn

    adapter = get_adapter(backbone)
    parts = layer_parts(backbone)
    model_type = model_type_of(backbone)
    clashes = shared_modules(parts)
    if clashes:
        raise AdapterCheckError(
            f"model_type={model_type!r}: {'; '.join(clashes)}; slicing one would silently change the other. "
            f"List each shared layer once (one joint keep set): {ADAPTER_FIX}"
        )
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        inputs = _probe_inputs(backbone)
        ref = _reference(backbone, inputs, model_type)
        failure = _check_slicing(backbone, inputs, ref, "FFN neurons", prune_ffn, _ffn_keep(parts))
        if failure:
            raise AdapterCheckError(
                f"the adapter for model_type={model_type!r} fails its check: {failure}. {ADAPTER_FIX}"
            )
        if heads or require_heads:
            adapter, off = _check_heads(backbone, adapter, inputs, ref, parts, model_type)
            if off and require_heads:
                raise AdapterCheckError(
                    f"head pruning is not available for model_type={model_type!r}: {off}. Prune FFN neurons "
                    f"only (skeleton.pruning.head_rate=0), or {ADAPTER_FIX}"
                )
            if off:
                log.warning("head pruning is off for model_type=%r (%s); FFN pruning works", model_type, off)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return adapter
