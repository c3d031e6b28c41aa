"""Adapters inferred from the module structure of families with no registered adapter: the right modules
are found, the forward check passes, and pruning (FFN neurons and heads, emptied sublayers included)
equals masking; shared layers get one joint keep set; unsupported or wrong adapters fail fast by name."""

import copy
import time

import pytest
import torch
from tiny_models import (
    FAMILIES,
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    MAXPOS,
    STD,
    VOCAB,
    StandIn,
    make_batch,
    one_thread,
    tiny_backbone,
)
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from skeleton.localize import (
    Adapter,
    AttentionParts,
    LayerParts,
    UnsupportedArchitectureError,
    ffn_widths,
    get_adapter,
    heads_per_layer,
    layer_parts,
    masked,
    prune_ffn,
    prune_heads,
    register_adapter,
    resize_to_widths,
    score_neurons,
    select_heads,
    select_neurons,
    supported_model_types,
)
from skeleton.localize import arch as arch_mod
from skeleton.localize.infer import AdapterCheckError, check_adapter

assert one_thread  # autouse fixture

_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=FFN,
    max_position_embeddings=MAXPOS,
    initializer_range=STD,
    pad_token_id=0,
)
_EXTRA = {
    "opt": dict(ffn_dim=FFN, word_embed_proj_dim=HIDDEN),
    "gptj": dict(n_inner=FFN, rotary_dim=4, bos_token_id=0, eos_token_id=0),
    "gemma2": dict(head_dim=HIDDEN // HEADS, num_key_value_heads=HEADS),
    "stablelm": dict(num_key_value_heads=2),
    "albert": dict(embedding_size=16),
    "bloom": dict(intermediate_size=None),  # its FFN is 4 x hidden
    "falcon": dict(intermediate_size=None),
    "squeezebert": dict(embedding_size=HIDDEN),
    "t5": dict(d_model=HIDDEN, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS, d_kv=HIDDEN // HEADS),
}
# family -> (layers path suffix, up, gate, down, attention module, q, out)
BERT_NAMES = (
    "encoder.layer",
    "intermediate.dense",
    None,
    "output.dense",
    "attention.self",
    "attention.self.query",
)
LLAMA_NAMES = ("layers", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", "self_attn", "self_attn.q_proj")
EXPECTED = {
    "ernie": (*BERT_NAMES, "attention.output.dense"),
    "megatron-bert": (*BERT_NAMES, "attention.output.dense"),
    "roberta-prelayernorm": (*BERT_NAMES, "attention.output.dense"),
    "opt": ("decoder.layers", "fc1", None, "fc2", "self_attn", "self_attn.q_proj", "self_attn.out_proj"),
    "phi": ("layers", "mlp.fc1", None, "mlp.fc2", "self_attn", "self_attn.q_proj", "self_attn.dense"),
    "gptj": ("h", "mlp.fc_in", None, "mlp.fc_out", "attn", "attn.q_proj", "attn.out_proj"),
    "olmo": (*LLAMA_NAMES, "self_attn.o_proj"),
    "gemma2": (*LLAMA_NAMES, "self_attn.o_proj"),
    "stablelm": (*LLAMA_NAMES, "self_attn.o_proj"),
    "albert": ("albert_layers", "ffn", None, "ffn_output", "attention", "attention.query", "attention.dense"),
}
ENCODERS = ["ernie", "megatron-bert", "roberta-prelayernorm"]
DECODERS = ["opt", "phi", "gptj", "olmo", "gemma2", "stablelm"]


def tiny(model_type: str, seed: int = 0, **kw):
    cfg = AutoConfig.for_model(model_type, **{**_TINY, **_EXTRA.get(model_type, {}), **kw})
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg).eval()
    with torch.no_grad():  # random biases make a mis-sliced bias visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _forward(backbone, batch):
    with torch.no_grad():
        return backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


def _name(layer, module):
    return None if module is None else next(n for n, m in layer.named_modules() if m is module)


@pytest.mark.parametrize("family", ENCODERS + DECODERS + ["albert"])
def test_inference_finds_the_right_modules(family):
    backbone = tiny(family)
    assert backbone.config.model_type not in supported_model_types()
    adapter = get_adapter(backbone)
    path, up, gate, down, attn, q, out = EXPECTED[family]
    assert adapter.layers.endswith(path) and arch_mod.adapter_name(backbone) == "inferred"
    for p in layer_parts(backbone):
        got = [_name(p.layer, m) for m in (p.up, p.gate, p.down, p.attn.module, p.attn.q, p.attn.out)]
        assert got == [up, gate, down, attn, q, out]
        assert p.attn.head_dim == HIDDEN // HEADS and p.attn.num_heads == HEADS
    assert p.attn.num_kv_heads == (2 if family == "stablelm" else None)


def _keep_sets(backbone):
    parts = layer_parts(backbone)
    g = torch.Generator().manual_seed(3)
    ffn_scores = [torch.rand(p.ffn_width, generator=g) for p in parts]
    head_scores = [torch.rand(p.attn.num_heads, generator=g) for p in parts]
    groups = [p.attn.group_size for p in parts]
    yield "global", select_neurons(ffn_scores, 0.4), select_heads(head_scores, 0.4, group_sizes=groups)
    none = torch.zeros(0, dtype=torch.long)
    half = select_heads(head_scores, 0.5, scope="layer", group_sizes=groups)
    yield "emptied", [none, *select_neurons(ffn_scores[1:], 0.5)], [none, *half[1:]]


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_pruned_equals_masked_with_heads(family):
    dense, batch = tiny(family), make_batch()
    started = time.perf_counter()
    adapter = check_adapter(dense)
    assert time.perf_counter() - started < 5 and adapter.prune_heads is not None
    ref = _forward(dense, batch)
    for name, ffn_keep, head_keep in _keep_sets(dense):
        with masked(dense, ffn_keep, head_keep):
            want = _forward(dense, batch)
        assert not torch.allclose(want, ref, atol=1e-3), f"{name}: masking had no effect, test is vacuous"
        pruned = copy.deepcopy(dense)
        prune_ffn(pruned, ffn_keep)
        prune_heads(pruned, head_keep)
        torch.testing.assert_close(
            _forward(pruned, batch), want, atol=1e-5, rtol=1e-5, msg=f"{family} {name}"
        )
        assert ffn_widths(pruned) == [len(k) for k in ffn_keep]
        assert heads_per_layer(pruned) == [len(k) for k in head_keep]

        fresh = tiny(family, seed=7)
        resize_to_widths(fresh, pruned.config.skeleton_ffn_widths, pruned.config.skeleton_heads_per_layer)
        fresh.load_state_dict(pruned.state_dict())
        assert torch.equal(_forward(fresh, batch), _forward(pruned, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_adapters_pass_the_check_with_heads(family):
    backbone = tiny_backbone(family)
    started = time.perf_counter()
    adapter = check_adapter(backbone)
    assert time.perf_counter() - started < 5
    assert adapter is get_adapter(backbone) and adapter.prune_heads is not None
    assert arch_mod.adapter_name(backbone) == "registered"


def test_task_wrapper_uses_the_same_inferred_layers():
    cfg = tiny("ernie").config
    cfg.num_labels = 2
    wrapped = AutoModelForSequenceClassification.from_config(cfg)
    got, want = layer_parts(wrapped), layer_parts(wrapped.base_model)
    assert all(a.down is b.down and a.attn.out is b.attn.out for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------------------
# shared layers


def test_albert_shared_layer_is_one_joint_keep_set():
    dense, batch = tiny("albert"), make_batch()
    assert dense.config.num_hidden_layers == 2 and len(layer_parts(dense)) == 1  # one layer, run twice
    check_adapter(dense)
    keep = select_neurons([torch.rand(FFN, generator=torch.Generator().manual_seed(0))], 0.5)
    heads = [torch.tensor([1, 2])]
    with masked(dense, keep, heads):
        want = _forward(dense, batch)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, keep)
    prune_heads(pruned, heads)
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be skipped"):  # its attention module holds the residual norm
        prune_heads(copy.deepcopy(dense), [torch.zeros(0, dtype=torch.long)])


def test_albert_scores_are_summed_over_the_layers_that_share_them():
    model, batch = StandIn(tiny("albert")), make_batch()
    down = layer_parts(model.backbone)[0].down
    calls = []
    handle = down.register_forward_pre_hook(lambda m, args: calls.append(args[0].detach()))
    with torch.no_grad():
        model(batch)
    handle.remove()
    assert len(calls) == 2
    mask = batch["attention_mask"].bool().unsqueeze(-1).float()
    want = sum(((a * mask).sum(1) / mask.sum(1)).abs().mean(0) for a in calls)
    scores = score_neurons(model, [batch], criterion="activation", magnitude="instance", token_agg="mean")
    torch.testing.assert_close(scores.ffn[0], want.float(), atol=1e-5, rtol=1e-5)


def test_modules_shared_between_listed_layers_are_refused():
    backbone = tiny("ernie")
    backbone.config.model_type = "ernie-shared-ffn"
    backbone.encoder.layer[1].intermediate = backbone.encoder.layer[0].intermediate
    with pytest.raises(AdapterCheckError, match="layers 0 and 1 share Linear"):
        check_adapter(backbone)
    with pytest.raises(ValueError, match="layers 0 and 1 share Linear"):
        prune_ffn(backbone, [torch.arange(8), torch.arange(4)])


# ---------------------------------------------------------------------------------------------------------
# what inference cannot do


@pytest.mark.parametrize("family", ["mpnet", "nystromformer"])
def test_head_slicing_that_fails_the_check_turns_head_pruning_off(family, caplog):
    """MPNet adds a per-head relative position bias and Nystromformer a per-head convolution that inference
    does not know: the check sees slicing heads differ from masking them, so only FFN pruning stays."""
    dense, batch = tiny(family), make_batch()
    adapter = check_adapter(dense)
    assert adapter.prune_heads is None and get_adapter(dense) is adapter
    assert "head pruning is off" in caplog.text
    with pytest.raises(AdapterCheckError, match="head_rate=0"):
        check_adapter(dense, require_heads=True)
    keep = select_neurons([torch.rand(FFN), torch.rand(FFN)], 0.5)
    with masked(dense, keep):
        want = _forward(dense, batch)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, keep)
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="head pruning"):
        prune_heads(pruned, [torch.tensor([0]), None])


@pytest.mark.parametrize("family", ["deberta", "gpt_neox", "bloom", "falcon"])
def test_fused_qkv_families_prune_ffn_and_mask_heads(family, caplog):
    """A fused q/k/v projection has a family-specific layout: heads are scored and masked at the output
    projection, FFN neurons are sliced; head slicing needs a registered or user adapter."""
    dense, batch = tiny(family), make_batch()
    adapter = check_adapter(dense)
    assert adapter.prune_heads is None and "fused q/k/v" in caplog.text
    assert all(p.attn.qkv is not None and p.attn.q is None for p in layer_parts(dense))
    ref = _forward(dense, batch)
    with masked(dense, head_keep=[torch.tensor([0, 3]), None]):
        assert not torch.allclose(_forward(dense, batch), ref, atol=1e-3)
    width = layer_parts(dense)[0].ffn_width
    keep = select_neurons([torch.rand(width), torch.rand(width)], 0.5)
    with masked(dense, keep):
        want = _forward(dense, batch)
    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, keep)
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family,error,what",
    [
        ("phi3", UnsupportedArchitectureError, "fused gate/up projection mlp.gate_up_proj"),
        ("squeezebert", UnsupportedArchitectureError, "q projection"),  # nn.Conv1d layers, channels first
        ("t5", AdapterCheckError, "forward on a probe batch"),  # an encoder-decoder
    ],
)
def test_unsupported_family_fails_within_seconds_naming_the_fix(family, error, what):
    backbone = tiny(family)
    started = time.perf_counter()
    with pytest.raises(error) as err:
        check_adapter(backbone)
    assert time.perf_counter() - started < 5
    msg = str(err.value)
    assert f"model_type={family!r}" in msg and what in msg
    assert error is AdapterCheckError or "model.adapter=package.module:function" in msg


def test_wrong_registered_adapter_fails_the_check():
    def wrong_head_dim(layer):
        s = layer.attention.self
        attn = AttentionParts(
            s, s.query, s.key, s.value, layer.attention.output.dense, s.attention_head_size // 2
        )
        return LayerParts(layer.intermediate.dense, None, layer.output.dense, attn)

    backbone = tiny("ernie")
    backbone.config.model_type = "ernie-wrong"
    register_adapter("ernie-wrong", Adapter("encoder.layer", wrong_head_dim, arch_mod.prune_separate_heads))
    try:
        with pytest.raises(AdapterCheckError, match="fails its head check"):
            check_adapter(backbone)
    finally:
        arch_mod._ADAPTERS.pop("ernie-wrong")


def test_check_leaves_the_real_model_untouched():
    backbone, batch = tiny("opt"), make_batch()
    backbone.train()
    check_adapter(backbone)
    assert all(m.training for m in backbone.modules())  # its modes restored
    backbone.eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    ref = _forward(backbone, batch)
    check_adapter(backbone)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert torch.equal(_forward(backbone, batch), ref) and ffn_widths(backbone) == [FFN] * LAYERS


@pytest.mark.parametrize("family", ["opt", "stablelm"])
def test_check_runs_on_an_already_pruned_model(family):
    """Serving checks the adapter of an export, whose layers may already be narrow or empty."""
    backbone = tiny(family)
    none = torch.zeros(0, dtype=torch.long)
    prune_ffn(backbone, [torch.arange(0, FFN, 2), none])
    prune_heads(backbone, [torch.tensor([0, 1]), none])
    assert check_adapter(backbone).prune_heads is not None


def test_inference_reads_gpt2_conv1d_layouts():
    """Forced with model.adapter=inferred, GPT-2's Conv1D projections (weights stored (in, out)) are matched
    by their real shapes; its fused c_attn makes it FFN-only, which the registered adapter is not."""
    from transformers.pytorch_utils import Conv1D

    backbone, batch = tiny_backbone("gpt2"), make_batch()
    arch_mod.use_adapter(backbone, "inferred")
    adapter = check_adapter(backbone)
    assert adapter is not arch_mod._ADAPTERS["gpt2"] and adapter.prune_heads is None
    for layer, p in zip(backbone.h, layer_parts(backbone)):
        assert (p.up, p.down, p.attn.qkv, p.attn.out) == (
            layer.mlp.c_fc,
            layer.mlp.c_proj,
            layer.attn.c_attn,
            layer.attn.c_proj,
        )
        assert isinstance(p.up, Conv1D)
    keep = select_neurons([torch.rand(FFN), torch.rand(FFN)], 0.5)
    with masked(backbone, keep):
        want = _forward(backbone, batch)
    pruned = copy.deepcopy(backbone)
    prune_ffn(pruned, keep)
    torch.testing.assert_close(_forward(pruned, batch), want, atol=1e-5, rtol=1e-5)
