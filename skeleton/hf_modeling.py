"""Hugging Face config/model classes for pruned backbones, one pair per supported family.

This file imports only torch and transformers: `skeleton.hf_native` registers its classes with the Auto
classes, and `export_pruned` also copies it into every export as `skeleton_pruned.py` (named in the
config's `auto_map`), so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads an export on
a machine without Skeleton installed.

A pruned config is the family's own config plus `skeleton_ffn_widths` / `skeleton_heads_per_layer`;
the model is the family's base model whose FFN and attention projections are shrunk to those widths right
after construction, so the pruned checkpoint then loads into it key for key. Stock classes cannot do
this: no supported family builds layers of different widths from its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

PREFIX = "skeleton-pruned-"
CODE_FILE = "skeleton_pruned.py"


@dataclass(frozen=True)
class Family:
    """Where the prunable projections of one family live, relative to a layer of its base model."""

    config: str  # transformers class names, resolved lazily
    model: str
    layers: str  # the nn.ModuleList of layers in the base model
    ffn_out: tuple[str, ...]  # projections whose outputs are the FFN neurons (up, gate)
    ffn_in: str  # the down projection: its inputs are the FFN neurons
    head_out: tuple[str, ...]  # projections whose outputs are heads x head_dim (q, k, v, ...)
    head_in: str  # the attention output projection
    attn: str  # the module holding the head-count attributes its forward reads
    head_attrs: tuple[str, ...] = ()  # attributes set to the new head count
    size_attrs: tuple[str, ...] = ()  # attributes set to heads x head_dim
    fused_qkv: bool = False  # GPT-2's c_attn is [q | k | v] in one projection
    kv_out: tuple[str, ...] = ()  # key/value projections: kv heads x head_dim (grouped-query attention)


_BERT_LIKE = dict(
    layers="encoder.layer",
    ffn_out=("intermediate.dense",),
    ffn_in="output.dense",
    head_in="attention.output.dense",
    attn="attention.self",
    head_attrs=("num_attention_heads",),
    size_attrs=("all_head_size",),
)
_BERT_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
_DEBERTA_QKV = tuple(
    f"attention.self.{n}" for n in ("query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj")
)
_LLAMA_LIKE = dict(
    layers="layers",
    ffn_out=("mlp.up_proj", "mlp.gate_proj"),
    ffn_in="mlp.down_proj",
    head_out=("self_attn.q_proj",),
    kv_out=("self_attn.k_proj", "self_attn.v_proj"),
    head_in="self_attn.o_proj",
    attn="self_attn",
)

FAMILIES: dict[str, Family] = {
    "bert": Family("BertConfig", "BertModel", head_out=_BERT_QKV, **_BERT_LIKE),
    "roberta": Family("RobertaConfig", "RobertaModel", head_out=_BERT_QKV, **_BERT_LIKE),
    "xlm-roberta": Family("XLMRobertaConfig", "XLMRobertaModel", head_out=_BERT_QKV, **_BERT_LIKE),
    "electra": Family("ElectraConfig", "ElectraModel", head_out=_BERT_QKV, **_BERT_LIKE),
    "deberta-v2": Family("DebertaV2Config", "DebertaV2Model", head_out=_DEBERTA_QKV, **_BERT_LIKE),
    "distilbert": Family(
        "DistilBertConfig",
        "DistilBertModel",
        layers="transformer.layer",
        ffn_out=("ffn.lin1",),
        ffn_in="ffn.lin2",
        head_out=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        head_in="attention.out_lin",
        attn="attention",
        head_attrs=("n_heads",),
    ),
    "gpt2": Family(
        "GPT2Config",
        "GPT2Model",
        layers="h",
        ffn_out=("mlp.c_fc",),
        ffn_in="mlp.c_proj",
        head_out=("attn.c_attn",),
        head_in="attn.c_proj",
        attn="attn",
        head_attrs=("num_heads",),
        size_attrs=("split_size",),
        fused_qkv=True,
    ),
    "llama": Family("LlamaConfig", "LlamaModel", **_LLAMA_LIKE),
    "qwen2": Family("Qwen2Config", "Qwen2Model", **_LLAMA_LIKE),
    "mistral": Family("MistralConfig", "MistralModel", **_LLAMA_LIKE),
}


# ---- shrinking projections (placeholder values: the checkpoint overwrites them) -------------------
class ZeroSafeConv1D(Conv1D):
    """Conv1D that also runs with zero input features (Conv1D.forward's view(-1, 0) fails)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


def _dims(m: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored (in, out))."""
    w = m.weight.shape
    return (w[1], w[0]) if isinstance(m, Conv1D) else (w[0], w[1])


def shrink(m: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    """Keep the first `out` outputs / `inp` inputs of a projection, in place."""
    o, i = _dims(m)
    o, i = o if out is None else out, i if inp is None else inp
    conv = isinstance(m, Conv1D)
    w = m.weight.detach()
    w = w[:i, :o] if conv else w[:o, :i]
    m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if out is not None and getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(m.bias.detach()[:o].clone(), requires_grad=m.bias.requires_grad)
    if conv:
        m.nf, m.nx = o, i
        if i == 0:
            m.__class__ = ZeroSafeConv1D
    else:
        m.out_features, m.in_features = o, i


class _NoHeads:
    """Forward of an attention block pruned to zero heads, which the family's own forward cannot run (it
    reshapes with -1 heads): only its output projection's bias remains, as masking all heads gives."""

    _skeleton_out = ""  # the output projection, relative to the block ("" = it lies outside the block)

    def forward(self, *args, **kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        empty = x[..., :0]
        return (self.get_submodule(self._skeleton_out)(empty) if self._skeleton_out else empty), None


def _skip_attention(attn: nn.Module, fam: Family) -> None:
    cls = type(attn)
    if not issubclass(cls, _NoHeads):
        attn.__class__ = type(f"NoHeads{cls.__name__}", (_NoHeads, cls), {"__module__": __name__})
    prefix = fam.attn + "."
    attn._skeleton_out = fam.head_in[len(prefix) :] if fam.head_in.startswith(prefix) else ""


def _get(root: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


def _shrink_ffn(layer: nn.Module, fam: Family, width: int) -> None:
    for path in fam.ffn_out:
        if (m := _get(layer, path)) is not None:
            shrink(m, out=width)
    shrink(_get(layer, fam.ffn_in), inp=width)


def _shrink_heads(layer: nn.Module, fam: Family, heads: int, dense_heads: int, group: int = 1) -> None:
    out = _get(layer, fam.head_in)
    head_dim = _dims(out)[1] // dense_heads
    size = heads * head_dim
    for path in fam.head_out:
        if (m := _get(layer, path)) is not None:
            shrink(m, out=3 * size if fam.fused_qkv else size)
    for path in fam.kv_out:  # pruning keeps whole groups: heads // group key/value heads remain
        if (m := _get(layer, path)) is not None:
            shrink(m, out=heads // group * head_dim)
    shrink(out, inp=size)
    attn = _get(layer, fam.attn)
    for name in fam.head_attrs:
        setattr(attn, name, heads)
    for name in fam.size_attrs:
        setattr(attn, name, size)
    if heads == 0:
        _skip_attention(attn, fam)


@torch.no_grad()
def shrink_to_config(model: nn.Module, fam: Family) -> None:
    """Give every layer the FFN width and head count recorded in the config (narrower layers only)."""
    cfg = model.config
    layers = _get(model, fam.layers)
    widths = getattr(cfg, "skeleton_ffn_widths", None) or [None] * len(layers)
    heads = getattr(cfg, "skeleton_heads_per_layer", None) or [None] * len(layers)
    if len(widths) != len(layers) or len(heads) != len(layers):
        raise ValueError(f"the config records {len(widths)} widths for a model of {len(layers)} layers")
    for layer, width, n in zip(layers, widths, heads):
        if width is not None and width < _dims(_get(layer, fam.ffn_in))[1]:
            _shrink_ffn(layer, fam, width)
        if n is not None and n < cfg.num_attention_heads:
            group = cfg.num_attention_heads // (
                getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            )
            _shrink_heads(layer, fam, n, cfg.num_attention_heads, group)


# ---- the classes ------------------------------------------------------------------------------------
def _make_classes(family: str) -> tuple[type, type]:
    fam = FAMILIES[family]
    base_config, base_model = getattr(transformers, fam.config), getattr(transformers, fam.model)
    name = f"SkeletonPruned{fam.model.removesuffix('Model')}"
    config_cls = type(
        f"{name}Config",
        (base_config,),
        {"model_type": PREFIX + family, "skeleton_family": family, "__module__": __name__},
    )

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        shrink_to_config(self, fam)

    model_cls = type(
        f"{name}Model",
        (base_model,),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )
    return config_cls, model_cls


CLASSES: dict[str, tuple[type, type]] = {family: _make_classes(family) for family in FAMILIES}
for _config_cls, _model_cls in CLASSES.values():
    globals()[_config_cls.__name__] = _config_cls
    globals()[_model_cls.__name__] = _model_cls
