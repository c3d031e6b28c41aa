"""Adapters find the right modules in every family, wrapped or not; unknown families fail clearly."""

import types

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
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from skeleton.localize import (
    Adapter,
    UnsupportedArchitectureError,
    count_parameters,
    ffn_widths,
    get_adapter,
    heads_per_layer,
    layer_parts,
    masked,
    register_adapter,
    supported_model_types,
)
from skeleton.localize import arch as arch_mod

assert one_thread  # autouse fixture


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_parts_shapes(family):
    backbone = tiny_backbone(family)
    parts = layer_parts(backbone)
    assert len(parts) == LAYERS
    assert ffn_widths(backbone) == [FFN] * LAYERS and heads_per_layer(backbone) == [HEADS] * LAYERS
    for p in parts:
        assert arch_mod.out_features(p.up) == FFN and arch_mod.in_features(p.down) == FFN
        assert arch_mod.out_features(p.down) == HIDDEN
        assert (p.gate is not None) == (family in GATED)
        assert p.attn.head_dim == HIDDEN // HEADS and p.attn.num_heads == HEADS
        assert p.attn.num_kv_heads == (2 if family in GQA else (HEADS if family in GATED else None))
        assert (p.attn.qkv is not None) == (family == "gpt2")
        if family == "gpt2":
            assert isinstance(p.up, Conv1D) and p.up.weight.shape == (HIDDEN, FFN)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "deberta-v2"])
def test_task_wrapper_is_found(family):
    from tiny_models import tiny_config

    cfg = tiny_config(family)
    cfg.num_labels, cfg.pad_token_id = 2, 0
    model = AutoModelForSequenceClassification.from_config(cfg)
    base = model.base_model
    got, want = layer_parts(model), layer_parts(base)
    assert all(a.down is b.down and a.attn.out is b.attn.out for a, b in zip(got, want))


def test_count_parameters_split():
    backbone = tiny_backbone("bert")
    c = count_parameters(backbone)
    assert c["total"] == sum(p.numel() for p in backbone.parameters())
    assert c["embeddings"] + c["layers"] + c["other"] == c["total"]
    assert c["embeddings"] == sum(p.numel() for p in backbone.embeddings.parameters())
    assert c["ffn"] == LAYERS * (HIDDEN * FFN + FFN + FFN * HIDDEN + HIDDEN)
    assert c["attention"] == LAYERS * 4 * (HIDDEN * HIDDEN + HIDDEN)
    assert c["other"] == HIDDEN * HIDDEN + HIDDEN  # pooler
    llama = count_parameters(tiny_backbone("llama"))
    assert llama["ffn"] == LAYERS * 3 * HIDDEN * FFN and llama["other"] == HIDDEN  # final RMSNorm


def test_unknown_architecture_lists_supported():
    fake = torch.nn.Module()
    fake.config = types.SimpleNamespace(model_type="t5")
    with pytest.raises(UnsupportedArchitectureError) as err:
        layer_parts(fake)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "'t5'" in msg and "register_adapter" in msg
    for t in ["bert", "roberta", "electra", "deberta-v2", "distilbert", "gpt2", "llama", "qwen2", "mistral"]:
        assert t in msg and t in supported_model_types()


def test_register_adapter_for_new_family():
    backbone, batch = tiny_backbone("bert"), make_batch()
    backbone.config.model_type = "my-bert"
    inferred = get_adapter(backbone)  # nothing registered: inferred from the structure, same modules
    assert arch_mod.adapter_name(backbone) == "inferred"
    assert [p.down for p in layer_parts(backbone)] == [layer.output.dense for layer in backbone.encoder.layer]
    register_adapter("my-bert", Adapter("encoder.layer", arch_mod._bert_parts))
    try:
        assert get_adapter(backbone) is not inferred and arch_mod.adapter_name(backbone) == "registered"
        with pytest.raises(ValueError, match="already registered"):
            register_adapter("my-bert", Adapter("encoder.layer", arch_mod._bert_parts))
        assert ffn_widths(backbone) == [FFN] * LAYERS
        ids, am = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            dense = backbone(input_ids=ids, attention_mask=am).last_hidden_state
            with masked(backbone, [torch.arange(10), None]):
                assert not torch.allclose(backbone(input_ids=ids, attention_mask=am).last_hidden_state, dense)
    finally:
        arch_mod._ADAPTERS.pop("my-bert")


def test_wrong_layer_path_is_clear():
    register_adapter("bert-bad", Adapter("decoder.blocks", arch_mod._bert_parts))
    try:
        backbone = tiny_backbone("bert")
        backbone.config.model_type = "bert-bad"
        with pytest.raises(UnsupportedArchitectureError, match=r"decoder\.blocks"):
            layer_parts(backbone)
    finally:
        arch_mod._ADAPTERS.pop("bert-bad")
