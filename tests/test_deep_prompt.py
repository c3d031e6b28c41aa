"""Deep prompts (prompt=deep): vectors really reach every layer's input, prune and reload exactly, fold
their reparameterisation away without changing a prediction, and are validated and cached by config."""

import copy
import threading

import pytest
import torch
from hydra.utils import instantiate
from tiny_models import HIDDEN, LAYERS, make_batch, one_thread, tiny_backbone

from skeleton.deep_prompt import DeepPromptError, optimizer_groups
from skeleton.export import (
    apply_keep,
    export_pruned,
    load_pruned,
    load_skeleton,
    load_trained,
    model_hparams,
    read_tensors,
    save_skeleton,
)
from skeleton.localize import (
    get_layers,
    masked,
    prune_ffn,
    prune_heads,
    score_neurons,
    select_heads,
    select_neurons,
)
from skeleton.peft_interop import PeftAdapterError, save_peft_adapter
from skeleton.prompt import PromptConfig, PromptTunedModel
from skeleton.reuse import PromptCache
from tests.helpers import compose_config

assert one_thread  # autouse fixture

FAMILIES = ["bert", "roberta", "electra", "deberta-v2", "gpt2", "llama"]
N = 3  # prompt tokens


def deep_model(family="bert", reparam=0, deep=True, pooling="mean", seed=0, perturb=True):
    """A prompt model on a tiny test backbone (large weights); deep vectors moved off their start, so
    that a hook that never fired, or fired at the wrong layer, changes the output."""
    model = PromptTunedModel(
        backbone=f"tiny:{family}",
        task="sst2",
        prompt={"num_tokens": N, "deep": deep, "reparam": reparam},
        pooling=pooling,
        backbone_module=tiny_backbone(family, seed=seed),
    ).eval()
    if perturb and deep:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            if reparam:
                model.prompt.deep.down.normal_(0, 0.3, generator=gen)
            else:
                model.prompt.deep.vectors.add_(torch.randn(model.prompt.deep.vectors.shape, generator=gen))
    return model


def batch(seed=0):
    return make_batch(rows=3, length=7, seed=seed, num_labels=2)


def logits(model, b):
    with torch.no_grad():
        return model(b)


@pytest.mark.parametrize("family", [*FAMILIES, "albert"])
def test_every_later_layer_reads_its_own_vectors(family):
    """Layer l >= 1 sees vector l-1 at the prompt positions (ALBERT: one shared layer module, one vector
    per call); layer 0 sees the input prompt; text positions are the backbone's own."""
    model, b = deep_model(family), batch()
    seen = []
    handles = [
        m.register_forward_pre_hook(
            lambda m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True
        )
        for m in {id(m): m for m in get_layers(model.backbone)}.values()
    ]
    try:
        logits(model, b)
    finally:
        for h in handles:
            h.remove()
    vectors = model.prompt.deep.vectors
    assert len(seen) == LAYERS == vectors.shape[0] + 1
    for layer, hidden in enumerate(seen[1:]):
        assert torch.equal(hidden[:, :N], vectors[layer].expand(3, -1, -1))
    assert not torch.allclose(seen[0][:, :N], vectors[0].expand(3, -1, -1))
    with torch.no_grad():  # the backbone alone is untouched: the hooks are idle outside the prompt model
        plain = model.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert plain.last_hidden_state.shape[1] == 7


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoders_start_exactly_at_the_input_only_model(family):
    """The vectors start as the layer inputs the input prompt alone produces; in a causal decoder the
    prompt positions never see the text, so an untrained deep prompt predicts as the input-only one."""
    deep = deep_model(family, perturb=False)
    shallow = deep_model(family, deep=False)
    shallow.load_trained_state({k: v for k, v in deep.trained_state().items() if "deep" not in k})
    torch.testing.assert_close(logits(deep, batch()), logits(shallow, batch()), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        deep.prompt.deep.vectors.add_(
            torch.randn(deep.prompt.deep.vectors.shape)
        )  # not a scale: LN ignores it
    assert not torch.allclose(logits(deep, batch()), logits(shallow, batch()), atol=1e-3)


def test_deep_vectors_train_and_the_backbone_does_not():
    model = deep_model("bert").train()
    assert all(n.startswith(("prompt.", "head.")) for n in model.trainable_names())
    assert model.parameter_counts()["prompt"] == N * HIDDEN * LAYERS  # input prompt + one layer's vectors
    loss = torch.nn.functional.cross_entropy(model(batch()), batch()["labels"])
    loss.backward()
    assert model.prompt.deep.vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked_with_deep_prompts_and_heads(family):
    """Attribution on the deep model, FFN neurons and heads masked vs sliced; also a first layer left
    with no neuron and no head (skipped or bypassed)."""
    model, b = deep_model(family), batch()
    dense = logits(model, b)
    scores = score_neurons(model, [b, batch(1)], heads=True)
    ffn_keep, head_keep = select_neurons(scores, 0.5), select_heads(scores, 0.5)
    none = torch.zeros(0, dtype=torch.long)
    for ffn, heads in ((ffn_keep, head_keep), ([none, ffn_keep[1]], [none, head_keep[1]])):
        with masked(model.backbone, ffn, heads):
            want = logits(model, b)
        assert not torch.allclose(want, dense, atol=1e-4), "masking changed nothing: the test is vacuous"
        pruned = copy.deepcopy(model)
        prune_ffn(pruned.backbone, ffn)
        prune_heads(pruned.backbone, heads)
        for _ in range(2):  # the second call runs a bypassed layer as the identity
            torch.testing.assert_close(logits(pruned, b), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_attribution_counts_deep_prompt_positions_which_add_exactly_zero(family):
    """With deep prompts the FFN output at a prompt position is replaced at the next layer's input (and the
    last layer's is not pooled), so those positions carry zero act x grad: counting them (include_prompt)
    only divides each row's mean by n + length instead of length. An input-only prompt's first layer
    does move the output from the prompt positions, so there the relation fails."""
    b = make_batch(rows=1, length=6, seed=3, num_labels=2)
    scale = (N + 6) / 6
    for deep in (True, False):
        model = deep_model(family, deep=deep)
        counted = score_neurons(model, [b], include_prompt=True)
        real = score_neurons(model, [b], include_prompt=False)
        assert counted.meta["include_prompt"] and not real.meta["include_prompt"]
        same = all(torch.allclose(c * scale, r, rtol=1e-4, atol=1e-7) for c, r in zip(counted.ffn, real.ffn))
        assert same == deep, f"deep={deep}"


def test_pooling_on_the_prompt_reads_the_last_deep_vectors_output():
    model, b = deep_model("bert", pooling="prompt"), batch()
    before = logits(model, b)
    with torch.no_grad():
        model.prompt.deep.vectors.add_(1.0)
    assert not torch.allclose(logits(model, b), before, atol=1e-3)


def test_skeleton_and_export_reload_exactly(tmp_path):
    model, b = deep_model("llama"), batch()
    identity = model.backbone_identity()
    scores = score_neurons(model, [b], heads=True)
    keep_ffn, keep_heads = select_neurons(scores, 0.5), select_heads(scores, 0.5)
    prune_ffn(model.backbone, keep_ffn)
    prune_heads(model.backbone, keep_heads)
    want = logits(model, b)
    path = save_skeleton(
        model, tmp_path / "sk", keep_ffn=keep_ffn, keep_heads=keep_heads, dense_identity=identity
    )
    assert "prompt.deep.vectors" in read_tensors(path / "skeleton.safetensors")
    # what load_skeleton does, on the test's own dense weights (large-weight tiny:llama, vocabulary 100)
    loaded = PromptTunedModel(**model_hparams(model), backbone_module=tiny_backbone("llama"))
    load_trained(loaded, path)
    apply_keep(loaded, path)
    assert torch.equal(logits(loaded.eval(), b), want)
    exported = load_pruned(export_pruned(model, tmp_path / "export"))
    torch.testing.assert_close(logits(exported, b), want, atol=1e-6, rtol=1e-6)


def test_cli_style_artifact_reload_from_tiny_backbone(tmp_path):
    """Through the loader every command uses: load_skeleton rebuilds the dense tiny backbone by name."""
    model = PromptTunedModel(
        backbone="tiny:gpt2", task="sst2", prompt={"num_tokens": N, "deep": True, "reparam": 8}
    )
    with torch.no_grad():
        model.prompt.deep.down.normal_(0, 0.5)
    identity, b = model.backbone_identity(), batch()
    keep = [torch.arange(0, 64, 2), torch.arange(10)]
    prune_ffn(model.backbone, keep)
    want = logits(model.eval(), b)
    path = save_skeleton(model, tmp_path / "sk", keep_ffn=keep, dense_identity=identity)
    tensors = read_tensors(path / "skeleton.safetensors")
    assert sorted(k for k in tensors if k.startswith("prompt.")) == [
        "prompt.deep.vectors",
        "prompt.embeddings",
    ]
    loaded = load_skeleton(path)
    assert loaded.prompt.deep.reparam == 0  # the final vectors only: the MLP is folded away on load
    torch.testing.assert_close(logits(loaded, b), want, atol=1e-6, rtol=1e-6)


def test_reparameterisation_trains_the_mlp_and_folds_without_changing_predictions():
    model, b = deep_model("bert", reparam=16, perturb=False), batch()
    start = model.prompt.deep.start.clone()
    assert torch.equal(model.prompt.deep.current(), start)  # the zero last layer: it starts at `start`
    groups = optimizer_groups(model.prompt, 0.03, 1e-4)
    assert [g["lr"] for g in groups] == [0.03, 1e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.prompt.deep.reparam_parameters()}
    optimizer = torch.optim.AdamW(groups)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(b), b["labels"]).backward()
        optimizer.step()
    assert not torch.allclose(model.prompt.deep.current(), start)
    before, state = logits(model, b), model.trained_state()
    assert [k for k in state if "deep" in k] == ["prompt.deep.vectors"]  # final vectors only, even now
    model.on_train_end()  # what Lightning calls when training ends
    assert model.prompt.deep.reparam == 0 and model.prompt.deep.reparam_parameters() == []
    assert torch.equal(logits(model, b), before)
    assert torch.equal(model.trained_state()["prompt.deep.vectors"], state["prompt.deep.vectors"])
    fresh = deep_model("bert", reparam=16, perturb=False)
    fresh.load_trained_state(state)  # a folded state folds the model it is loaded into
    assert fresh.prompt.deep.reparam == 0 and torch.equal(logits(fresh, b), before)


def test_two_threads_on_one_backbone_keep_their_own_deep_prompts():
    """Serving: tasks share layer modules, so the active vectors are per thread, never per module."""
    a = deep_model("bert", seed=0)
    b_model = PromptTunedModel(
        backbone="tiny:bert", task="sst2", prompt={"num_tokens": N, "deep": True}, backbone_module=a.backbone
    ).eval()
    with torch.no_grad():
        b_model.prompt.deep.vectors.add_(3.0)
    x = batch()
    want = {"a": logits(a, x), "b": logits(b_model, x)}
    assert not torch.allclose(want["a"], want["b"], atol=1e-3)
    wrong = []

    def work(name, model):
        for _ in range(20):
            if not torch.equal(logits(model, x), want[name]):
                wrong.append(name)

    threads = [
        threading.Thread(target=work, args=("a", a)),
        threading.Thread(target=work, args=("b", b_model)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"deep": "yes"}, "prompt.deep must be true or false"),
        ({"deep": True, "reparam": -1}, "prompt.reparam must be an integer >= 0"),
        ({"deep": True, "reparam": 1.5}, "prompt.reparam must be an integer >= 0"),
        ({"reparam": 64}, "reparameterises deep prompts only: set prompt.deep=true"),
        ({"deep": True, "reparam": 8, "reparam_lr": 0}, "prompt.reparam_lr must be a number > 0"),
    ],
)
def test_bad_deep_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptConfig(**kwargs)


def test_a_single_layer_backbone_is_refused_naming_the_key():
    from transformers import AutoModel

    from skeleton.backbones import tiny_config

    one = AutoModel.from_config(tiny_config("bert", 100, num_hidden_layers=1))
    with pytest.raises(DeepPromptError, match=r"prompt\.deep=true needs a backbone of at least 2 layers"):
        PromptTunedModel(
            backbone="tiny:bert", task="sst2", prompt={"num_tokens": N, "deep": True}, backbone_module=one
        )


def test_peft_export_refuses_a_deep_prompt(tmp_path):
    with pytest.raises(PeftAdapterError, match="deep prompt"):
        save_peft_adapter(deep_model("bert"), tmp_path)


def test_config_composes_instantiates_and_keys_the_prompt_cache(tmp_path):
    cfgs = {
        "vocab": compose_config(["prompt=vocab"]),
        "deep": compose_config(["prompt=deep", "prompt.num_tokens=3"]),
        "reparam": compose_config(["prompt=deep", "prompt.num_tokens=3", "prompt.reparam=8"]),
    }
    model = instantiate(cfgs["reparam"].module)
    assert model.prompt.deep.reparam == 8 and model.hparams["prompt"]["deep"] is True
    assert not hasattr(instantiate(cfgs["vocab"].module).prompt, "deep")
    keys = {
        name: PromptCache(cfg, tmp_path, data="d", backbone_sha256="s").prompt_key
        for name, cfg in cfgs.items()
    }
    assert len(set(keys.values())) == 3


def test_whole_run_with_a_reparameterised_deep_prompt_reloads_and_reuses_it(tmp_path):
    """A real fit (MLP reparameterisation), the Skeleton step, the artifact; its reload scores exactly what
    the run reported, and a second margin reuses the cached (folded) prompt without training."""
    from skeleton.evaluate import evaluate
    from skeleton.train import train

    deep = ["prompt=deep", "prompt.num_tokens=3", "prompt.reparam=8"]
    cfg = compose_config([*deep, "skeleton.psi=100"], run_dir=tmp_path / "a")
    first = train(cfg)
    artifact = read_tensors(tmp_path / "a" / "skeleton" / "skeleton.safetensors")
    assert sorted(k for k in artifact if k.startswith("prompt.")) == [
        "prompt.deep.vectors",
        "prompt.embeddings",
    ]
    data = instantiate(cfg.data)
    data.setup("fit")
    loaded = load_skeleton(tmp_path / "a")
    assert evaluate(loaded, data.dev_dataloader()) == pytest.approx(first.skeleton.pruned.dev, abs=1e-6)
    second = train(compose_config([*deep, "skeleton.psi=0"], run_dir=tmp_path / "b"))
    assert second.train.get("reused_prompt") and second.dense == first.dense


def _left_padded(b: dict) -> dict:
    """The same rows with their padding moved in front of the text."""
    out = dict(b)
    lengths = b["attention_mask"].sum(1)
    shifts = [int(b["attention_mask"].shape[1] - n) for n in lengths]
    out["input_ids"] = torch.stack([row.roll(s) for row, s in zip(b["input_ids"], shifts)])
    out["attention_mask"] = torch.stack([row.roll(s) for row, s in zip(b["attention_mask"], shifts)])
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_deep_prompts_with_the_verbalizer_head_ignore_padding_and_prune_exactly(family):
    """The verbalizer reads the LM's own output layer; the deep vectors stay at the prompt positions
    whichever side the text is padded on, and pruning with them equals masking."""
    from tests.test_verbalizer import loud

    model = PromptTunedModel(
        backbone=f"tiny:{family}",
        task="sst2",
        prompt={"num_tokens": N, "deep": True},
        head="verbalizer",
        pooling="auto",
    )
    model = loud(model)
    with torch.no_grad():
        model.prompt.deep.vectors.add_(torch.randn(model.prompt.deep.vectors.shape))
    b = batch()
    dense = logits(model, b)
    torch.testing.assert_close(logits(model, _left_padded(b)), dense, atol=1e-5, rtol=1e-5)
    scores = score_neurons(model, [b], heads=True)
    ffn, heads = select_neurons(scores, 0.5), select_heads(scores, 0.5)
    with masked(model.backbone, ffn, heads):
        want = logits(model, b)
    assert not torch.allclose(want, dense, atol=1e-4)
    prune_ffn(model.backbone, ffn)
    prune_heads(model.backbone, heads)
    torch.testing.assert_close(logits(model, b), want, atol=1e-5, rtol=1e-5)
