"""Least-squares compensation: the sliced network equals its hooks on the dense one in every family, the
fit reproduces a dense sublayer better than plain pruning, and a compensated skeleton reloads exactly."""

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES, FFN, GQA, make_batch, one_thread, tiny_backbone
from torch import nn

from skeleton.bench import synthetic_batch
from skeleton.export import load_skeleton, read_meta, save_skeleton
from skeleton.localize import layer_parts, masked, prune_ffn, prune_heads, resize_to_widths
from skeleton.localize.config import ConfigError, SkeletonConfig
from skeleton.localize.reconstruct import (
    Compensation,
    collect_statistics,
    compensate,
    compensated_masks,
    fit_compensation,
)
from skeleton.prompt import PromptTunedModel

assert one_thread  # autouse fixture


class Wrapped(nn.Module):
    """A bare backbone as the pipeline's model: ``backbone``, ``forward(batch)`` and ``content_mask``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, batch):
        return self.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state

    def content_mask(self, batch, include_prompt=True):
        return batch["attention_mask"].bool()


def _hidden(backbone, batch):
    with torch.no_grad():
        return Wrapped(backbone)(batch)


def _calibration(seeds=(1, 2, 3)):
    return [make_batch(rows=6, length=10, seed=s) for s in seeds]


def _keeps(family):
    """Layer 0 keeps every third neuron and half its heads; layer 1 loses every unit (skipped sublayers)."""
    half = torch.tensor([2, 3]) if family in GQA else torch.tensor([0, 2])  # whole key/value groups
    none = torch.zeros(0, dtype=torch.long)
    return [torch.arange(0, FFN, 3), none], [half, none]


@pytest.mark.parametrize("family", FAMILIES)
def test_compensated_pruning_equals_its_hooks_and_reloads(family):
    dense, batch = tiny_backbone(family), make_batch()
    stats = collect_statistics(Wrapped(dense), _calibration(), max_instances=18)
    keep_ffn, keep_heads = _keeps(family)
    comp = fit_compensation(stats, keep_ffn, keep_heads)
    with masked(dense, keep_ffn, keep_heads):
        plain = _hidden(dense, batch)
    with compensated_masks(dense, keep_ffn, keep_heads, comp):
        want = _hidden(dense, batch)
    assert not torch.allclose(want, plain, atol=1e-3), "the compensation changed nothing: test is vacuous"

    pruned = copy.deepcopy(dense)
    prune_ffn(pruned, keep_ffn)
    prune_heads(pruned, keep_heads)
    compensate(pruned, comp)
    got = _hidden(pruned, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=family)

    fresh = tiny_backbone(family, seed=7)  # what an export reloads: shapes from the config, then weights
    resize_to_widths(fresh, pruned.config.skeleton_ffn_widths, pruned.config.skeleton_heads_per_layer)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(_hidden(fresh, batch), got)


def _sublayer_error(dense, keep_ffn, keep_heads, comp, module, batches):
    """Squared error of one projection's output against the dense one, over the batches' real tokens."""
    errors, outs = [], {}

    def record(module, args, out):  # registered last: it sees the output after the shift hook
        outs[outs["now"]] = out

    for batch in batches:
        for name, hooks in (
            ("dense", masked(dense)),
            ("pruned", compensated_masks(dense, keep_ffn, keep_heads, comp)),
        ):
            outs["now"] = name
            with hooks:
                handle = module(dense).register_forward_hook(record)
                _hidden(dense, batch)
                handle.remove()
        real = batch["attention_mask"].bool()
        errors.append(((outs["pruned"] - outs["dense"])[real] ** 2).sum())
    return float(sum(errors))


@pytest.mark.parametrize("shift", [True, False])
def test_fit_reproduces_a_dense_sublayer_better_than_plain_pruning(shift):
    """With dense inputs (the first layer's FFN; its attention keeps every head) the fit is the least-
    squares optimum, and the plain pruned network is one of the candidates it beat."""
    dense, batches = tiny_backbone("bert"), _calibration()
    stats = collect_statistics(Wrapped(dense), batches, max_instances=18)
    keep_ffn = [torch.arange(0, FFN, 4), None]
    comp = fit_compensation(stats, keep_ffn, None, ridge=0.0, shift=shift)
    ones = fit_compensation(stats, [torch.arange(FFN), None], None)
    plain = Compensation(
        [torch.ones(len(keep_ffn[0])), ones.ffn_scale[1]], [None, None], ones.head_scale, [None, None]
    )
    down = lambda backbone: layer_parts(backbone)[0].down  # noqa: E731
    fitted = _sublayer_error(dense, keep_ffn, None, comp, down, batches)
    unfitted = _sublayer_error(dense, keep_ffn, None, plain, down, batches)
    assert fitted < (0.8 if shift else 0.9) * unfitted  # the shift is a further free parameter
    assert (comp.ffn_shift[0] is not None) == shift


def test_fit_of_heads_beats_plain_head_pruning():
    dense, batches = tiny_backbone("bert"), _calibration()
    stats = collect_statistics(Wrapped(dense), batches, max_instances=18)
    keep_ffn, keep_heads = [None, None], [torch.tensor([1, 3]), None]
    comp = fit_compensation(stats, keep_ffn, keep_heads, ridge=0.0)
    plain = copy.deepcopy(comp)
    plain.head_scale[0], plain.attn_shift[0] = torch.ones(2), None
    out = lambda backbone: layer_parts(backbone)[0].attn.out  # noqa: E731
    assert _sublayer_error(dense, keep_ffn, keep_heads, comp, out, batches) < 0.8 * _sublayer_error(
        dense, keep_ffn, keep_heads, plain, out, batches
    )


def test_statistics_count_real_tokens_only():
    dense = tiny_backbone("bert")
    batch = make_batch(rows=4, length=8, lengths=[8, 5, 3, 2])
    seen = {}
    handle = layer_parts(dense)[0].down.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0]))
    stats = collect_statistics(Wrapped(dense), [batch], max_instances=4)
    handle.remove()
    a = seen["a"][batch["attention_mask"].bool()].double()
    assert stats.tokens == 18
    torch.testing.assert_close(stats.ffn_gram[0], a.T @ a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.ffn_sum[0], a.sum(0), rtol=1e-5, atol=1e-4)
    first_two = collect_statistics(Wrapped(dense), [batch], max_instances=2)
    assert first_two.tokens == 13  # max_instances cuts the batch's rows


def test_keeping_every_unit_changes_nothing():
    dense, batch = tiny_backbone("llama"), make_batch()
    ref = _hidden(dense, batch)
    stats = collect_statistics(Wrapped(dense), _calibration(), max_instances=18)
    comp = fit_compensation(stats, [None, None], [None, None])
    assert all(bool((s == 1).all()) for s in comp.ffn_scale + comp.head_scale)
    assert comp.ffn_shift == [None, None] and comp.attn_shift == [None, None]
    pointers = [p.data_ptr() for p in dense.parameters()]
    compensate(dense, comp)
    assert [p.data_ptr() for p in dense.parameters()] == pointers  # nothing was even copied
    assert torch.equal(_hidden(dense, batch), ref)


def test_compensate_refuses_a_backbone_pruned_otherwise():
    dense = tiny_backbone("bert")
    stats = collect_statistics(Wrapped(dense), _calibration(), max_instances=18)
    comp = fit_compensation(stats, [torch.arange(10), None], None)
    prune_ffn(dense, [torch.arange(20), None])
    with pytest.raises(ValueError, match="prune with the same kept indices first"):
        compensate(dense, comp)


def test_compensated_skeleton_reloads_bit_for_bit(tmp_path):
    model = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 4})
    batch = synthetic_batch(model, 3, 9)
    identity = model.backbone_identity()
    stats = collect_statistics(
        model, [synthetic_batch(model, 8, 9, seed=s) for s in (1, 2)], max_instances=16
    )
    keep_ffn, keep_heads = [torch.arange(0, 64, 3), torch.tensor([5, 1, 60, 7])], [torch.tensor([0, 2]), None]
    comp = fit_compensation(stats, keep_ffn, keep_heads)
    prune_ffn(model.backbone, keep_ffn)
    prune_heads(model.backbone, keep_heads)
    with torch.no_grad():
        plain = model.eval()(batch)
    compensate(model.backbone, comp)
    with torch.no_grad():
        want = model(batch)
    assert not torch.allclose(plain, want, atol=1e-4)
    path = save_skeleton(
        model, tmp_path / "sk", keep_ffn=keep_ffn, keep_heads=keep_heads, dense_identity=identity,
        compensation=comp,
    )  # fmt: skip
    assert read_meta(path)["format_version"] == 2  # a reader that would drop the compensation refuses it
    with torch.no_grad():
        assert torch.equal(load_skeleton(path)(batch), want)

    meta = json.loads((path / "skeleton.json").read_text())
    meta["format_version"] = 3
    (path / "skeleton.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="upgrade the package"):
        load_skeleton(path)


def test_reconstruct_settings_are_validated():
    assert not SkeletonConfig().reconstruct.enabled and SkeletonConfig().reconstruct.shift
    with pytest.raises(ConfigError, match=r"skeleton\.reconstruct\.ridge"):
        SkeletonConfig.from_dict({"reconstruct": {"ridge": -1}})
    with pytest.raises(ConfigError, match=r"skeleton\.reconstruct\.instances"):
        SkeletonConfig.from_dict({"reconstruct": {"instances": 0}})
    with pytest.raises(ConfigError, match=r"skeleton\.reconstruct\.size is not a setting"):
        SkeletonConfig.from_dict({"reconstruct": {"size": 3}})


def test_a_candidate_the_family_cannot_slice_is_compensated_on_hooks(monkeypatch):
    import skeleton.pipeline as pipeline

    dense, batch = tiny_backbone("bert"), make_batch()
    model = Wrapped(dense)
    model.on_backbone = lambda other: Wrapped(other)
    stats = collect_statistics(model, _calibration(), max_instances=18)
    keep_ffn, keep_heads = _keeps("bert")
    fit = lambda f, h: fit_compensation(stats, f, h)  # noqa: E731
    with pipeline.candidate(model, keep_ffn, keep_heads, fit) as sliced:
        want = sliced(batch)
    monkeypatch.setattr(pipeline, "prune_units", lambda *a: (_ for _ in ()).throw(ValueError("no")))
    with pipeline.candidate(model, keep_ffn, keep_heads, fit) as fallback:
        assert fallback is model
        torch.testing.assert_close(fallback(batch), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(batch), want, atol=1e-3)  # the hooks are gone afterwards
