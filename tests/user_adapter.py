"""A user adapter named in the config (model.adapter=tests.user_adapter:deberta_v1), as a project outside
Skeleton would write one. DeBERTa v1 fuses q/k/v into one `in_proj` laid out per head ([q_h k_h v_h] for
each head h), so inference slices its FFN only; this adapter also prunes its heads. Every call appends a
line to $SKELETON_ADAPTER_LOG, so a test can see that each fresh process (train, bench, predict, reload)
resolved this very adapter."""

import os

from torch import nn

from skeleton.localize import Adapter, AttentionParts, LayerParts
from skeleton.localize.arch import head_channels, slice_in, slice_out


def _deberta_v1_parts(layer):
    s = layer.attention.self
    out = layer.attention.output.dense
    attn = AttentionParts(s, None, None, None, out, s.attention_head_size, qkv=s.in_proj)
    return LayerParts(layer.intermediate.dense, None, layer.output.dense, attn)


def _deberta_v1_prune_heads(parts, keep):
    s, d = parts.module, parts.head_dim
    slice_out(s.in_proj, head_channels(keep, 3 * d))  # each head owns 3 * head_dim consecutive rows
    ch = head_channels(keep, d)
    for name in ("q_bias", "v_bias"):
        old = getattr(s, name)
        setattr(
            s, name, nn.Parameter(old.detach()[ch.to(old.device)].clone(), requires_grad=old.requires_grad)
        )
    for name in ("pos_proj", "pos_q_proj"):
        if getattr(s, name, None) is not None:
            slice_out(getattr(s, name), ch)
    slice_in(parts.out, ch)
    s.num_attention_heads, s.all_head_size = len(keep), len(keep) * d


def deberta_v1() -> Adapter:
    log = os.environ.get("SKELETON_ADAPTER_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    return Adapter("encoder.layer", _deberta_v1_parts, _deberta_v1_prune_heads)


def register_bert_like() -> None:
    """The other form: register an adapter for the model_type and return nothing."""
    from skeleton.localize import register_adapter
    from skeleton.localize.arch import _bert_parts, prune_separate_heads

    register_adapter("bert-user", Adapter("encoder.layer", _bert_parts, prune_separate_heads), overwrite=True)
