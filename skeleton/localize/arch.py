"""Architecture adapters: where the FFN neurons and attention heads live in each Hugging Face family.

Everything else in `skeleton.localize` (scoring, masking, pruning) talks to a backbone only through
`layer_parts(backbone)`, so supporting a new family means registering one `Adapter` here:

    from skeleton.localize import Adapter, LayerParts, AttentionParts, register_adapter
    register_adapter("my_family", Adapter(layers="encoder.layers", parts=my_parts_fn))

An FFN "neuron" is one channel of the input of the down projection (after the activation, and after the
gate product in gated MLPs): that is the point we score, mask and slice. An attention "head" is one
`head_dim` slice of the input of the attention output projection.

transformers has two linear layouts: `nn.Linear` (weight (out, in)) and GPT-2's `Conv1D` (weight (in, out)).
`in_features`, `out_features`, `slice_out` and `slice_in` hide the difference.

Which adapter a backbone gets (`get_adapter`): the one named by `config.skeleton_adapter` when set (a user
`package.module:function`, "registered" or "inferred"; see `resolve_adapter`), else the registered one for
its model_type, else one inferred from its module structure (`skeleton.localize.infer`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class UnsupportedArchitectureError(ValueError):
    """No adapter for the backbone: none registered, none named, and its structure could not be inferred."""


def check_per_layer(values, n: int, what: str) -> None:
    """Per-layer settings (kept indices, widths, head counts) must have one entry per layer."""
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries but the backbone has {n} layers")


ADAPTER_FIX = (
    "name an adapter in the config: model.adapter=package.module:function, where function() returns a "
    "skeleton.localize.Adapter(layers='path.to.ModuleList', parts=fn) (fn(layer) -> LayerParts) or "
    "registers one with skeleton.localize.register_adapter(model_type, adapter)"
)


# ----------------------------------------------------------------------------------------------------------
# Linear / Conv1D primitives


def in_features(m: nn.Module) -> int:
    return m.weight.shape[0] if isinstance(m, Conv1D) else m.weight.shape[1]


def out_features(m: nn.Module) -> int:
    return m.weight.shape[1] if isinstance(m, Conv1D) else m.weight.shape[0]


def weight_out_in(m: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view whatever the layout."""
    return m.weight.t() if isinstance(m, Conv1D) else m.weight


def _new_param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def slice_out(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep only output channels `idx` (and their bias entries), in place. Returns nothing: the module
    keeps its identity (hooks, parent references stay valid) but gets new, smaller Parameters."""
    idx = idx.to(m.weight.device)
    if isinstance(m, Conv1D):
        m.weight = _new_param(m.weight, m.weight.detach().index_select(1, idx))
        m.nf = len(idx)
    else:
        m.weight = _new_param(m.weight, m.weight.detach().index_select(0, idx))
        m.out_features = len(idx)
    if getattr(m, "bias", None) is not None:
        m.bias = _new_param(m.bias, m.bias.detach().index_select(0, idx))


class ZeroSafeConv1D(Conv1D):
    """Conv1D whose forward also runs with zero input features (Conv1D.forward's `x.view(-1, 0)` fails on
    an empty tensor). Installed by `slice_in` only on a Conv1D pruned to width 0; same parameters and
    state-dict keys, so the model saves and loads as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


def slice_in(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep only input channels `idx`, in place (the bias lives on the output side and is untouched)."""
    idx = idx.to(m.weight.device)
    if isinstance(m, Conv1D):
        m.weight = _new_param(m.weight, m.weight.detach().index_select(0, idx))
        m.nx = len(idx)
        if len(idx) == 0:
            m.__class__ = ZeroSafeConv1D
    else:
        m.weight = _new_param(m.weight, m.weight.detach().index_select(1, idx))
        m.in_features = len(idx)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of the given heads in a (num_heads * head_dim) projection."""
    heads = heads.long().view(-1, 1)
    return (heads * head_dim + torch.arange(head_dim, device=heads.device)).view(-1)


# ----------------------------------------------------------------------------------------------------------
# Adapter data


@dataclass
class AttentionParts:
    """One self-attention block. `q`, `k`, `v` are None when the family fuses them into `qkv` (GPT-2)."""

    module: nn.Module  # the attention module that holds the head-count attributes the forward reads
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    out: nn.Module  # output projection; its input is the per-head point we score and mask
    head_dim: int
    num_kv_heads: int | None = None  # None = same as num_heads (no grouped-query attention)
    qkv: nn.Module | None = None

    @property
    def num_heads(self) -> int:
        """Current number of heads, read from the output projection so it reflects pruning."""
        return in_features(self.out) // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention). Pruning keeps it fixed:
        a key/value head goes with all the query heads of its group."""
        if self.num_kv_heads is None or self.num_kv_heads == 0:
            return 1
        return max(1, self.num_heads // self.num_kv_heads)


@dataclass
class LayerParts:
    """One transformer layer. The FFN activation point is the input of `down`."""

    up: nn.Module
    gate: nn.Module | None
    down: nn.Module
    attn: AttentionParts
    layer: nn.Module | None = None  # the layer module itself (set by `layer_parts`)

    @property
    def ffn_width(self) -> int:
        return in_features(self.down)


@dataclass(frozen=True)
class Adapter:
    """How to find and edit the layers of one model family.

    layers: dotted path of the `nn.ModuleList` of layers inside the base model (found at any depth, so a
        `*ForSequenceClassification` wrapper works too).
    parts: layer module -> LayerParts.
    prune_heads: (AttentionParts, kept head indices) -> None, slicing in place; None = not supported.
    """

    layers: str
    parts: Callable[[nn.Module], LayerParts]
    prune_heads: Callable[[AttentionParts, torch.Tensor], None] | None = None


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(model_type: str, adapter: Adapter, *, overwrite: bool = False) -> None:
    """Register `adapter` for backbones whose `config.model_type == model_type`."""
    if model_type in _ADAPTERS and not overwrite:
        raise ValueError(f"an adapter for {model_type!r} is already registered (pass overwrite=True)")
    _ADAPTERS[model_type] = adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def model_type_of(backbone: nn.Module) -> str | None:
    config = getattr(backbone, "config", None)
    # skeleton.hf_modeling's pruned configs name their family: they have a model type of their own
    return getattr(config, "skeleton_family", None) or getattr(config, "model_type", None)


_USER: dict[str, Adapter] = {}


def _import_function(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UnsupportedArchitectureError(
            f"adapter {spec!r} is not 'package.module:function' (nor 'registered' / 'inferred')"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UnsupportedArchitectureError(f"adapter {spec!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise UnsupportedArchitectureError(f"adapter {spec!r} is not a function")
    return fn


def resolve_adapter(spec: str, model_type: str | None, backbone: nn.Module | None = None) -> Adapter:
    """The adapter a `model.adapter` value names.

    "registered": the one registered for `model_type`; "inferred": inferred from `backbone`'s structure;
    "package.module:function": the function is imported and called once per process; it returns an
    `Adapter`, or returns None after registering one for `model_type`.
    """
    if spec == "registered":
        if model_type not in _ADAPTERS:
            raise UnsupportedArchitectureError(
                f"model.adapter=registered but no adapter is registered for model_type={model_type!r}; "
                f"{ADAPTER_FIX}"
            )
        return _ADAPTERS[model_type]
    if spec == "inferred":
        if backbone is None:
            raise ValueError("resolve_adapter('inferred', ...) needs the backbone to infer from")
        from .infer import inferred_adapter

        return inferred_adapter(backbone)
    if spec not in _USER:
        made = _import_function(spec)()
        if made is None:
            made = _ADAPTERS.get(model_type)
        if not isinstance(made, Adapter):
            raise UnsupportedArchitectureError(
                f"adapter function {spec!r} returned {type(made).__name__} and registered nothing for "
                f"model_type={model_type!r}: it must return a skeleton.localize.Adapter or register one"
            )
        _USER[spec] = made
    return _USER[spec]


def adapter_name(backbone: nn.Module) -> str:
    """Which adapter `get_adapter` uses: the configured spec, "registered" or "inferred"."""
    spec = getattr(backbone.config, "skeleton_adapter", None)
    if spec:
        return spec
    return "registered" if model_type_of(backbone) in _ADAPTERS else "inferred"


def use_adapter(backbone: nn.Module, spec: str | None) -> Adapter:
    """Make `backbone` use the adapter `spec` names (None = registered, else inferred) and return it. The
    spec is kept on `backbone.config.skeleton_adapter`, so exports save it in config.json and every later
    `get_adapter` (in this process or after a reload) finds the same adapter."""
    if spec:
        backbone.config.skeleton_adapter = spec
    return get_adapter(backbone)


def adopt_adapter(backbone: nn.Module, spec: str | None = None) -> str | None:
    """Resolve the backbone's adapter now, as `spec` says (None = registered, else inferred), keep its name
    on `config.skeleton_adapter` and return it to record with the model, so a reload uses the same one. A user spec that
    cannot be resolved raises at once; with no spec, a family without any adapter gives None (prompt
    tuning alone needs none; `check_adapter` refuses it before any localization)."""
    if spec:
        use_adapter(backbone, spec)
        return spec
    try:
        get_adapter(backbone)
    except UnsupportedArchitectureError:
        return None
    backbone.config.skeleton_adapter = adapter_name(backbone)
    return backbone.config.skeleton_adapter


def get_adapter(backbone: nn.Module) -> Adapter:
    model_type = model_type_of(backbone)
    spec = getattr(getattr(backbone, "config", None), "skeleton_adapter", None)
    if spec:
        return resolve_adapter(spec, model_type, backbone)
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]
    from .infer import inferred_adapter

    return inferred_adapter(backbone)


def find_layers(backbone: nn.Module, path: str) -> nn.ModuleList:
    """The ModuleList at `path` in the backbone, or at `<prefix>.path` (task wrappers, prompt wrappers)."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and (name == path or name.endswith("." + path)):
            return module
    raise UnsupportedArchitectureError(f"no nn.ModuleList at '{path}' in {type(backbone).__name__}")


def get_layers(backbone: nn.Module) -> nn.ModuleList:
    return find_layers(backbone, get_adapter(backbone).layers)


def layer_parts(backbone: nn.Module) -> list[LayerParts]:
    """The per-layer parts of `backbone`, in depth order."""
    adapter = get_adapter(backbone)
    out = []
    for layer in find_layers(backbone, adapter.layers):
        parts = adapter.parts(layer)
        parts.layer = layer
        out.append(parts)
    return out


def shared_modules(parts: list[LayerParts]) -> list[str]:
    """Clashes where two listed layers hold the same projection module: slicing it for one layer would
    silently change the other (an adapter must list a shared layer once, for one joint keep set)."""
    seen: dict[int, int] = {}
    clashes = []
    for i, p in enumerate(parts):
        for m in (p.up, p.gate, p.down, p.attn.q, p.attn.k, p.attn.v, p.attn.qkv, p.attn.out):
            if m is not None and seen.setdefault(id(m), i) != i:
                clashes.append(f"layers {seen[id(m)]} and {i} share {type(m).__name__}")
    return clashes


def ffn_widths(backbone: nn.Module) -> list[int]:
    return [p.ffn_width for p in layer_parts(backbone)]


def heads_per_layer(backbone: nn.Module) -> list[int]:
    return [p.attn.num_heads for p in layer_parts(backbone)]


def count_parameters(backbone: nn.Module) -> dict[str, int]:
    """Parameter counts: `embeddings` (any module named *embed*/wte/wpe or an nn.Embedding), `layers`
    (the transformer layers, split further into `ffn` and `attention` projections), `other` (final norms,
    pooler, task head) and `total`. Shared (tied) parameters are counted once."""
    parts = layer_parts(backbone)
    layer_ids = {id(p) for p in get_layers(backbone).parameters()}
    ffn_ids = {
        id(p) for lp in parts for m in (lp.up, lp.gate, lp.down) if m is not None for p in m.parameters()
    }
    attn_mods = [m for lp in parts for m in (lp.attn.q, lp.attn.k, lp.attn.v, lp.attn.qkv, lp.attn.out)]
    attn_ids = {id(p) for m in attn_mods if m is not None for p in m.parameters()}
    embed_ids = set()
    for name, module in backbone.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) or "embed" in leaf or leaf in ("wte", "wpe"):
            embed_ids |= {id(p) for p in module.parameters()}
    counts = dict.fromkeys(("embeddings", "layers", "ffn", "attention", "other", "total"), 0)
    for p in backbone.parameters():
        n = p.numel()
        counts["total"] += n
        if id(p) in layer_ids:
            counts["layers"] += n
            counts["ffn"] += n if id(p) in ffn_ids else 0
            counts["attention"] += n if id(p) in attn_ids else 0
        elif id(p) in embed_ids:
            counts["embeddings"] += n
        else:
            counts["other"] += n
    return counts


# ----------------------------------------------------------------------------------------------------------
# Families


def _bert_parts(layer: nn.Module) -> LayerParts:
    s = layer.attention.self
    attn = AttentionParts(s, s.query, s.key, s.value, layer.attention.output.dense, s.attention_head_size)
    return LayerParts(layer.intermediate.dense, None, layer.output.dense, attn)


def _deberta_parts(layer: nn.Module) -> LayerParts:
    s = layer.attention.self
    attn = AttentionParts(
        s, s.query_proj, s.key_proj, s.value_proj, layer.attention.output.dense, s.attention_head_size
    )
    return LayerParts(layer.intermediate.dense, None, layer.output.dense, attn)


def _distilbert_parts(layer: nn.Module) -> LayerParts:
    a = layer.attention
    attn = AttentionParts(a, a.q_lin, a.k_lin, a.v_lin, a.out_lin, a.attention_head_size)
    return LayerParts(layer.ffn.lin1, None, layer.ffn.lin2, attn)


def _gpt2_parts(layer: nn.Module) -> LayerParts:
    a = layer.attn
    attn = AttentionParts(a, None, None, None, a.c_proj, a.head_dim, qkv=a.c_attn)
    return LayerParts(layer.mlp.c_fc, None, layer.mlp.c_proj, attn)


def _llama_parts(layer: nn.Module) -> LayerParts:
    a, m = layer.self_attn, layer.mlp
    attn = AttentionParts(
        a,
        a.q_proj,
        a.k_proj,
        a.v_proj,
        a.o_proj,
        a.head_dim,
        num_kv_heads=out_features(a.k_proj) // a.head_dim,
    )
    return LayerParts(m.up_proj, m.gate_proj, m.down_proj, attn)


def kv_groups(parts: AttentionParts, keep: torch.Tensor) -> torch.Tensor:
    """The key/value heads behind the kept query heads `keep` (sorted), which must be whole groups: a key/value
    head serves every query head of its group, so it can only go once they all go."""
    g = parts.group_size
    if g == 1:
        return keep
    groups = torch.unique(keep // g)
    if not torch.equal(group_heads(groups, g), keep.sort().values):
        raise ValueError(
            f"kept heads {keep.tolist()} are not whole key/value groups of {g} query heads: with grouped-query "
            "attention keep or drop a group's heads together (select_heads does so on Scores from score_neurons)"
        )
    return groups


def group_heads(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """The query heads of key/value heads `groups`."""
    return (groups.long().view(-1, 1) * group_size + torch.arange(group_size)).view(-1)


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTH_ATTRS = ("all_head_size", "inner_dim")


def set_head_counts(module: nn.Module, old: tuple[int, int, int], new: tuple[int, int, int]) -> None:
    """Update the head-count attributes an attention forward may read: `old` / `new` are (query heads,
    key/value heads, head_dim); only attributes holding the old value change."""
    (h0, kv0, d), (h1, kv1, _) = old, new
    for names, before, after in (
        (_HEAD_ATTRS, h0, h1),
        (_KV_ATTRS, kv0, kv1),
        (_WIDTH_ATTRS, h0 * d, h1 * d),
    ):
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == before:
                setattr(module, name, after)


def prune_separate_heads(parts: AttentionParts, keep: torch.Tensor) -> None:
    """Slice separate q/k/v projections and the output projection to the kept heads, whole key/value groups
    under grouped-query attention, and update the module's head-count attributes."""
    keep = keep.long().view(-1)
    groups = kv_groups(parts, keep)
    d, h, kv = parts.head_dim, parts.num_heads, parts.num_kv_heads or parts.num_heads
    ch, kv_ch = head_channels(keep, d), head_channels(groups, d)
    slice_out(parts.q, ch)
    slice_out(parts.k, kv_ch)
    slice_out(parts.v, kv_ch)
    slice_in(parts.out, ch)
    if parts.num_kv_heads is not None:
        parts.num_kv_heads = len(groups)
    set_head_counts(parts.module, (h, kv, d), (len(keep), len(groups), d))


def _slice_separate_qkv(parts: AttentionParts, keep: torch.Tensor) -> int:
    ch = head_channels(keep, parts.head_dim)
    for m in (parts.q, parts.k, parts.v):
        slice_out(m, ch)
    slice_in(parts.out, ch)
    return len(keep)


def _bert_prune_heads(parts: AttentionParts, keep: torch.Tensor) -> None:
    n = _slice_separate_qkv(parts, keep)
    parts.module.num_attention_heads = n
    parts.module.all_head_size = n * parts.head_dim


def _deberta_prune_heads(parts: AttentionParts, keep: torch.Tensor) -> None:
    # Relative-position projections are per head too (unless share_att_key reuses query/key_proj).
    ch = head_channels(keep, parts.head_dim)
    for name in ("pos_key_proj", "pos_query_proj"):
        if getattr(parts.module, name, None) is not None:
            slice_out(getattr(parts.module, name), ch)
    _bert_prune_heads(parts, keep)


def _distilbert_prune_heads(parts: AttentionParts, keep: torch.Tensor) -> None:
    parts.module.n_heads = _slice_separate_qkv(parts, keep)


def _gpt2_prune_heads(parts: AttentionParts, keep: torch.Tensor) -> None:
    # c_attn is one Conv1D producing [q | k | v], each split_size wide.
    a, ch = parts.module, head_channels(keep, parts.head_dim)
    width = a.split_size
    slice_out(parts.qkv, torch.cat([ch, ch + width, ch + 2 * width]))
    slice_in(parts.out, ch)
    a.num_heads = len(keep)
    a.split_size = len(keep) * parts.head_dim


_BERT = Adapter("encoder.layer", _bert_parts, _bert_prune_heads)
for _t in ("bert", "roberta", "xlm-roberta", "electra"):
    register_adapter(_t, _BERT)
register_adapter("deberta-v2", Adapter("encoder.layer", _deberta_parts, _deberta_prune_heads))
register_adapter("distilbert", Adapter("transformer.layer", _distilbert_parts, _distilbert_prune_heads))
register_adapter("gpt2", Adapter("h", _gpt2_parts, _gpt2_prune_heads))
for _t in ("llama", "qwen2", "mistral"):
    register_adapter(_t, Adapter("layers", _llama_parts, prune_separate_heads))
