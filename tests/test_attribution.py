"""score_neurons against independent references: retain_grad + backward, and finite differences."""

import functools

import pytest
import torch
from tiny_models import StandIn, make_batch, one_thread, repad, tiny_backbone

from skeleton.localize import Scores, layer_parts, score_neurons, task_target

assert one_thread  # autouse fixture

# The reference implementation below follows the papers' formulation (logit target, |mean_t a*g| per
# instance, real tokens only); the config defaults differ and are tested in their own tests.
_score = functools.partial(score_neurons, target="logit", magnitude="instance", include_prompt=False)


def _model(family="bert", n_prompt=0, formulation="classification", seed=0):
    return StandIn(tiny_backbone(family, seed=seed), formulation=formulation, n_prompt=n_prompt)


def _reference(model, batch, *, criterion="attribution", token_agg="mean", magnitude="instance", heads=False,
               include_prompt=False, head_score="signed"):  # fmt: skip
    """Per-layer scores the slow, obvious way: retain_grad on hooked inputs, backward, loop over rows."""
    model.eval()
    parts = layer_parts(model.backbone)
    mods = [p.down for p in parts] + ([p.attn.out for p in parts] if heads else [])
    store = {}

    def keep(i):
        def hook(module, args):
            args[0].retain_grad()
            store[i] = args[0]

        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(mods)]
    logits = model(batch)
    logits.gather(1, batch["labels"][:, None]).sum().backward()
    for h in handles:
        h.remove()
    mask = model.content_mask(batch)
    if include_prompt:
        mask[:, : model.n_prompt] = True
    out = []
    for i in range(len(mods)):
        a, g = store[i].detach(), store[i].grad
        s = {"attribution": a * g, "activation": a, "gradient": g}[criterion]
        channels = i >= len(parts) and head_score == "channels"
        if i >= len(parts) and not channels:
            s = s.view(*s.shape[:2], parts[0].attn.num_heads, -1).sum(-1)
        rows = []
        for r in range(s.shape[0]):
            x = s[r][mask[r]]  # (tokens, d)
            x = x.abs() if magnitude == "token" else x
            x = {"mean": x.mean(0), "sum": x.sum(0), "max": x.max(0).values}[token_agg]
            rows.append(x.abs() if magnitude == "instance" else x)
        row = torch.stack(rows).mean(0)
        out.append(row.view(parts[0].attn.num_heads, -1).sum(-1) if channels else row)
    model.zero_grad(set_to_none=True)
    return out


def _close(a, b, rtol=1e-4, atol=1e-8):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("criterion", ["attribution", "activation", "gradient"])
@pytest.mark.parametrize("head_score", ["signed", "channels"])
def test_matches_reference(family, criterion, head_score):
    model, batch = _model(family), make_batch()
    s = _score(model, [batch], criterion=criterion, heads=True, head_score=head_score)
    ref = _reference(model, batch, criterion=criterion, heads=True, head_score=head_score)
    _close(s.ffn + s.heads, ref)
    assert s.num_instances == 4 and s.meta["criterion"] == criterion and s.meta["head_score"] == head_score


@pytest.mark.parametrize("token_agg,magnitude", [("max", "token"), ("sum", "instance"), ("mean", "token")])
def test_aggregation_variants(token_agg, magnitude):
    model, batch = _model(n_prompt=2), make_batch()
    s = _score(model, [batch], token_agg=token_agg, magnitude=magnitude)
    _close(s.ffn, _reference(model, batch, token_agg=token_agg, magnitude=magnitude))


def test_prompt_positions_excluded():
    model, batch = _model("bert", n_prompt=3), make_batch()
    s = _score(model, [batch])
    _close(s.ffn, _reference(model, batch))
    with_prompt = _reference(model, batch, include_prompt=True)
    assert not torch.allclose(s.ffn[0], with_prompt[0].float(), rtol=1e-2)  # the exclusion matters


@pytest.mark.parametrize("family,n_prompt", [("bert", 0), ("bert", 2), ("gpt2", 0)])
def test_padding_length_does_not_change_scores(family, n_prompt):
    model, batch = _model(family, n_prompt=n_prompt), make_batch(length=8)
    a = _score(model, [batch], heads=True)
    b = _score(model, [repad(batch, 13)], heads=True)
    _close(a.ffn + a.heads, b.ffn + b.heads, rtol=1e-4, atol=1e-7)


def test_finite_differences_single_instance():
    """attribution with token_agg="sum": |sum_t A_tj dT/dA_tj| = |d T(A_j * (1 + e)) / de| at e = 0, and
    gradient: |sum_t dT/dA_tj| = |d T(A_j + e) / de|. Checked in float64 by central differences."""
    model = _model("bert").double()
    batch = make_batch(rows=1, lengths=[8])
    attr = _score(model, [batch], token_agg="sum")
    grad = _score(model, [batch], criterion="gradient", token_agg="sum")
    parts, eps = layer_parts(model.backbone), 1e-6

    def target(layer, j, scale, shift):
        def hook(module, args):
            x = args[0].clone()
            x[..., j] = x[..., j] * scale + shift
            return (x,)

        h = parts[layer].down.register_forward_pre_hook(hook)
        with torch.no_grad():
            t = model(batch)[0, batch["labels"][0]].item()
        h.remove()
        return t

    for layer, j in [(0, 3), (0, 40), (1, 7), (1, 63)]:
        fd_attr = (target(layer, j, 1 + eps, 0) - target(layer, j, 1 - eps, 0)) / (2 * eps)
        fd_grad = (target(layer, j, 1, eps) - target(layer, j, 1, -eps)) / (2 * eps)
        assert attr.ffn[layer][j].item() == pytest.approx(abs(fd_attr), rel=1e-4, abs=1e-7)
        assert grad.ffn[layer][j].item() == pytest.approx(abs(fd_grad), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dead_neuron_scores_zero(family):
    model, batch = _model(family), make_batch()
    p = layer_parts(model.backbone)[0]
    with torch.no_grad():  # zero input row: GELU(0) = 0; in the gated MLP silu(gate = 0) = 0
        (p.gate if p.gate is not None else p.up).weight[5] = 0
        if p.up.bias is not None:
            p.up.bias[5] = 0
    for criterion in ("attribution", "activation"):
        s = _score(model, [batch], criterion=criterion)
        assert s.ffn[0][5].item() == 0.0
        assert (s.ffn[0] > 0).sum() >= 60
    assert _score(model, [batch], criterion="gradient").ffn[0][5].item() > 0


def test_streaming_equals_one_batch():
    model = _model("bert", n_prompt=2)
    full = make_batch(rows=6)
    parts = [{k: v[a:b] for k, v in full.items()} for a, b in [(0, 1), (1, 4), (4, 6)]]
    one, many = _score(model, [full], heads=True), _score(model, parts, heads=True)
    _close(one.ffn + one.heads, many.ffn + many.heads, rtol=1e-5)
    assert one.num_instances == many.num_instances == 6


def test_max_instances_and_progress():
    model = _model("bert")
    batches = [make_batch(rows=4, seed=i) for i in range(3)]
    consumed, calls = [], []

    def gen():
        for i, b in enumerate(batches):
            consumed.append(i)
            yield b

    s = _score(model, gen(), max_instances=6, progress=lambda d, t: calls.append((d, t)))
    assert s.num_instances == 6 and calls == [(4, 6), (6, 6)] and consumed == [0, 1]
    second = {k: v[:2] for k, v in batches[1].items()}
    _close(s.ffn, _score(model, [batches[0], second]).ffn, rtol=1e-5)


def test_unsupervised_uses_predictions():
    model, batch = _model("bert"), make_batch(rows=6)
    with torch.no_grad():
        pred = model(batch).argmax(-1)
    unsup = _score(model, [batch], unsupervised=True)
    as_gold = _score(model, [{**batch, "labels": pred}])
    wrong = _score(model, [{**batch, "labels": (pred + 1) % 3}])
    _close(unsup.ffn, as_gold.ffn, rtol=1e-6)
    assert not torch.allclose(unsup.ffn[0], wrong.ffn[0], rtol=1e-2)


def test_frozen_backbone_no_param_grads_and_modes_restored():
    model, batch = _model("bert"), make_batch()
    ref = _reference(model, batch)
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    model.backbone.embeddings.eval()
    s = _score(model, [batch])
    _close(s.ffn, ref)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and model.backbone.encoder.training and not model.backbone.embeddings.training


def test_works_under_inference_mode():
    model, batch = _model("bert"), make_batch()
    ref = _score(model, [batch])
    with torch.inference_mode():
        inf_batch = {k: v.clone() for k, v in batch.items()}
        s = _score(model, [inf_batch])
    _close(s.ffn, ref.ffn, rtol=1e-6)


def test_reduce_fn_applied_to_sums_and_counts():
    model, batch = _model("bert"), make_batch()
    seen = []

    def twice(t):  # what all_reduce(SUM) over two identical ranks returns
        seen.append(t.shape)
        return t * 2

    s = _score(model, [batch], heads=True, reduce_fn=twice)
    ref = _score(model, [batch], heads=True)
    assert len(seen) == 2 + 2 + 1  # ffn sums, head sums, count
    assert s.num_instances == 2 * ref.num_instances
    _close(s.ffn + s.heads, ref.ffn + ref.heads, rtol=1e-6)


def test_random_and_magnitude_criteria():
    model = _model("gpt2")
    a = _score(model, None, criterion="random", seed=3, heads=True)
    b = _score(model, None, criterion="random", seed=3, heads=True)
    c = _score(model, None, criterion="random", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.ffn + a.heads, b.ffn + b.heads))
    assert not torch.equal(a.ffn[0], c.ffn[0]) and a.num_instances == 0
    m = _score(model, None, criterion="magnitude")
    mlp = model.backbone.h[1].mlp  # Conv1D: weight is (in, out)
    want = mlp.c_fc.weight.norm(dim=0) * mlp.c_proj.weight.norm(dim=1)
    torch.testing.assert_close(m.ffn[1], want.detach())

    llama = _model("llama").backbone.layers[0].mlp
    m = _score(StandIn(_model("llama").backbone), None, criterion="magnitude")
    want = (
        llama.up_proj.weight.norm(dim=1)
        * llama.gate_proj.weight.norm(dim=1)
        * llama.down_proj.weight.norm(dim=0)
    )
    torch.testing.assert_close(m.ffn[0], want.detach())


def test_regression_and_multiple_choice_targets():
    logits = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.5, 0.5]])
    batch = {"labels": torch.tensor([0, -100])}  # unlabeled row falls back to the prediction
    assert task_target(logits, batch, "classification", "logit").tolist() == [1.0, 2.0]
    lp = task_target(logits, batch, "multiple_choice", "logprob")
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[[0, 1], [0, 0]])
    torch.testing.assert_close(task_target(logits, batch, "classification", "loss"), lp)
    assert task_target(logits, batch, "classification", "logit", unsupervised=True).tolist() == [3.0, 2.0]
    pred, y = torch.tensor([0.5, 2.0]), {"labels": torch.tensor([1.0, 2.0])}
    assert task_target(pred, y, "regression", "logit").tolist() == [0.5, 2.0]
    assert task_target(pred, y, "regression", "loss").tolist() == [-0.25, 0.0]

    mc = _model("bert", formulation="multiple_choice")
    batch = make_batch(rows=6)
    batch.update(num_choices=3, labels=torch.tensor([2, 0]))
    s = _score(mc, [batch], target="logprob")
    assert s.num_instances == 6 and all(torch.isfinite(x).all() for x in s.ffn)
    reg = _model("bert", formulation="regression")
    batch = {**make_batch(), "labels": torch.tensor([0.1, 0.5, 0.9, 0.2])}
    assert _score(reg, [batch], target="loss").ffn[0].sum() > 0


def test_scores_round_trip(tmp_path):
    model, batch = _model("bert"), make_batch()
    s = _score(model, [batch], heads=True)
    back = Scores.from_dict(s.to_dict())
    assert back.meta == s.meta and back.num_instances == s.num_instances
    _close(back.ffn + back.heads, s.ffn + s.heads, rtol=0, atol=0)
    s.save(str(tmp_path / "scores.safetensors"))
    loaded = Scores.load(str(tmp_path / "scores.safetensors"))
    assert loaded.meta == s.meta and loaded.num_instances == 4 and loaded.widths == [64, 64]
    _close(loaded.ffn + loaded.heads, s.ffn + s.heads, rtol=0, atol=0)


def test_bad_settings_raise():
    model = _model("bert")
    for kw in ({"criterion": "taylor"}, {"target": "prob"}, {"token_agg": "median"}, {"magnitude": "signed"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            _score(model, [], **kw)
