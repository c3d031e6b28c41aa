"""A user adapter named in the config (model.adapter=tests.user_adapter:deberta_v1), as a project outside
Skeleton would write one. DeBERTa v1 fuses q/k/v into one `in_proj`, which inference refuses, so its FFN
is described here (no head pruning). Every call appends a line to $SKELETON_ADAPTER_LOG, so a test can
see that each fresh process (train, bench, predict, reload) resolved this very adapter."""

import os

from skeleton.localize import Adapter, AttentionParts, LayerParts


def _deberta_v1_parts(layer):
    s = layer.attention.self
    out = layer.attention.output.dense
    attn = AttentionParts(s, None, None, None, out, s.attention_head_size, qkv=s.in_proj)
    return LayerParts(layer.intermediate.dense, None, layer.output.dense, attn)


def deberta_v1() -> Adapter:
    log = os.environ.get("SKELETON_ADAPTER_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    return Adapter("encoder.layer", _deberta_v1_parts)
