"""Inference paths compute what the eager model computes, on dense and pruned models alike, and
skeleton-bench times each path for both side by side; paths a model cannot run are refused by name."""

import json

import pytest
import torch
from torch import nn

from skeleton.bench import benchmark, synthetic_batch
from skeleton.cli.bench import main
from skeleton.export import save_skeleton
from skeleton.fastpath import PathUnsupportedError, check_path, default_path, prepare
from skeleton.localize import ffn_widths, heads_per_layer, masked, prune_ffn, prune_heads
from skeleton.prompt import PromptTunedModel
from tests.tiny_models import one_thread, tiny_backbone  # noqa: F401  (one_thread: fixture)

# FFN 64 -> 32 and 10 neurons, heads 4 -> 2 and 1 (whole key/value groups under GQA)
FFN_KEEP = [torch.arange(0, 64, 2), torch.arange(10)]
HEAD_KEEP = {"qwen2": [torch.tensor([0, 1]), torch.tensor([2, 3])]}
HEAD_KEEP_DEFAULT = [torch.tensor([0, 2]), torch.tensor([1])]


def _inputs(family: str):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding, so that the attention mask takes part
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama", "qwen2"])
def test_pruned_under_sdpa_equals_masked_and_eager(family):
    dense = tiny_backbone(family)
    heads = HEAD_KEEP.get(family, HEAD_KEEP_DEFAULT)
    inputs = _inputs(family)
    sdpa_dense = prepare(dense, "sdpa")
    assert sdpa_dense.config._attn_implementation == "sdpa"
    with torch.no_grad():
        full = sdpa_dense(**inputs).last_hidden_state
        with masked(sdpa_dense, FFN_KEEP, heads):
            want = sdpa_dense(**inputs).last_hidden_state
    assert not torch.allclose(want, full, atol=1e-3), "masking had no effect: the test would be vacuous"

    pruned = prepare(dense, "eager")
    prune_ffn(pruned, FFN_KEEP)
    prune_heads(pruned, heads)
    got = {}
    for path in ("sdpa", "eager"):
        model = prepare(pruned, path)
        assert model.config._attn_implementation == path
        assert heads_per_layer(model) == [len(h) for h in heads] and ffn_widths(model) == [32, 10]
        with torch.no_grad():
            got[path] = model(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()  # padded positions carry no meaning
    torch.testing.assert_close(got["sdpa"][real], want[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["eager"][real], got["sdpa"][real], atol=1e-4, rtol=1e-4)


def test_sdpa_with_an_emptied_attention_block():
    dense = tiny_backbone("bert")
    inputs = _inputs("bert")
    heads = [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)]  # layer 1 keeps no head: skipped
    with torch.no_grad(), masked(dense, FFN_KEEP, heads):
        want = dense(**inputs).last_hidden_state
    pruned = prepare(dense, "eager")
    prune_ffn(pruned, FFN_KEEP)
    prune_heads(pruned, heads)
    with torch.no_grad():
        got = prepare(pruned, "sdpa")(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _pair(family: str = "bert", empty_layer: bool = False):
    dense = PromptTunedModel(backbone=f"tiny:{family}", task="sst2", prompt={"num_tokens": 4})
    pruned = PromptTunedModel(backbone=f"tiny:{family}", task="sst2", prompt={"num_tokens": 4})
    identity = pruned.backbone_identity()
    keep = [torch.arange(16), torch.arange(0) if empty_layer else torch.arange(0, 64, 4)]
    prune_ffn(pruned.backbone, keep)
    return dense, pruned, identity, keep


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def test_int8_path_keeps_predictions_and_leaves_empty_linears_alone():
    _, pruned, _, _ = _pair(empty_layer=True)  # layer 1's FFN has no neuron left
    batch = synthetic_batch(pruned, 64, 16, seed=1)
    eager, int8 = prepare(pruned, "eager"), prepare(pruned, "int8")
    layer = int8.backbone.encoder.layer[0]
    for m in (layer.attention.self.query, layer.intermediate.dense, layer.output.dense, int8.head.net[1]):
        assert m._get_name() == "DynamicQuantizedLinear"
    empty_down = int8.backbone.encoder.layer[1].output.dense  # 0 input features: kept in float
    assert type(empty_down) is nn.Linear and empty_down.in_features == 0
    with torch.no_grad():
        want, got = eager(batch), int8(batch)
    assert torch.isfinite(got).all()
    scale = want.abs().max()
    assert (got - want).abs().max() <= 0.05 * scale, "int8 drifted far from the float model"
    assert _agreement(got, want) >= 0.9
    assert type(pruned.backbone.encoder.layer[0].output.dense) is nn.Linear  # the original is untouched


def test_int8_path_on_a_verbalizer_keeps_the_tied_output_layer_in_float():
    model = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 3}, head="verbalizer",
                             pooling="auto").eval()  # fmt: skip
    prune_ffn(model.backbone, [torch.arange(32), torch.arange(0, 64, 2)])
    batch = synthetic_batch(model, 32, 10)
    int8 = prepare(model, "int8")
    assert int8.backbone.encoder.layer[0].output.dense._get_name() == "DynamicQuantizedLinear"
    with torch.no_grad():
        want, got = prepare(model, "eager")(batch), int8(batch)
    assert (got - want).abs().max() <= 0.05 * want.abs().max() and _agreement(got, want) >= 0.9


def test_compile_path_matches_eager():
    _, pruned, _, _ = _pair()
    batch = synthetic_batch(pruned, 4, 8)
    compiled = prepare(pruned, "compile")  # inductor, the default backend
    with torch.inference_mode():
        want, got = prepare(pruned, "eager")(batch), compiled(batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unsupported_paths_are_refused_by_name(monkeypatch):
    deberta = tiny_backbone("deberta-v2")
    assert default_path(deberta) == "eager"
    with pytest.raises(PathUnsupportedError, match="'sdpa': DebertaV2Model has no SDPA attention"):
        check_path(deberta, "sdpa")
    check_path(deberta, "eager")  # eager is what it runs anyway
    with pytest.raises(PathUnsupportedError, match="GPT-2 keeps them in Conv1D"):
        check_path(tiny_backbone("gpt2"), "int8")
    bert = tiny_backbone("bert")
    with pytest.raises(PathUnsupportedError, match=r"'int8': .*CPU only"):
        check_path(bert, "int8", device="cuda")
    with pytest.raises(PathUnsupportedError, match=r"'int8': .*float32 models, not bfloat16"):
        check_path(bert, "int8", dtype="bfloat16")
    with pytest.raises(PathUnsupportedError, match="unknown path; choose from eager, sdpa, compile, int8"):
        check_path(bert, "onnx")
    monkeypatch.setattr("skeleton.fastpath.shutil.which", lambda name: None)
    with pytest.raises(PathUnsupportedError, match=r"'compile': .*needs a C\+\+ compiler"):
        check_path(bert, "compile")
    check_path(bert, "compile", compile_backend="aot_eager")  # no C++ needed


def test_benchmark_has_one_row_per_path_and_leaves_models_alone():
    dense, pruned, _, _ = _pair()
    paths = ["eager", "sdpa", "int8"]
    rows = benchmark(dense, pruned, batch_sizes=(2,), seq_lens=(8,), devices=("cpu",), repeats=2, warmup=1,
                     show=False, paths=paths)  # fmt: skip
    assert [r["path"] for r in rows] == paths
    for r in rows:
        assert r["dense_ms"] > 0 and r["pruned_ms"] > 0 and r["ideal_speedup"] > 1
        assert r["base_path"] == "eager" and r["tokens"] == 12 and r["dtype"] == "float32"
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
    assert [r["attention"] for r in rows] == ["eager", "sdpa", "sdpa"]
    assert rows[0]["speedup_vs_base"] == pytest.approx(rows[0]["speedup"])
    for model in (dense, pruned):  # prepared copies ran, not the models themselves
        assert model.backbone.config._attn_implementation == "sdpa"
        assert not any(m._get_name() == "DynamicQuantizedLinear" for m in model.modules())


def test_cli_reports_paths_side_by_side_and_names_refusals(tmp_path, capsys):
    _, pruned, identity, keep = _pair()
    path = save_skeleton(pruned, tmp_path / "sk", keep_ffn=keep, dense_identity=identity)
    out = tmp_path / "bench.json"
    argv = [str(path), "--batch-sizes", "2", "--seq-lens", "8", "--repeats", "2", "--device", "cpu"]
    assert main([*argv, "--paths", "eager,sdpa,int8", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["paths"] == ["eager", "sdpa", "int8"] and len(result["rows"]) == 3
    assert "load_per_core" in result
    assert all(r["dense_ms"] > 0 and r["pruned_ms"] > 0 for r in result["rows"])
    printed = capsys.readouterr().out
    assert all(p in printed for p in ("eager", "sdpa", "int8")) and "vs base = dense eager ms" in printed

    assert main([*argv, "--dtype", "bfloat16", "--paths", "int8", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "skeleton-bench: error: path 'int8'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--paths", "sdpa,onnx"])
    assert exit_.value.code == 2 and "unknown path(s) onnx" in capsys.readouterr().err


def test_cli_refuses_sdpa_for_a_family_without_it(tmp_path, capsys):
    model = PromptTunedModel(backbone="tiny:deberta-v2", task="sst2", prompt={"num_tokens": 2})
    identity = model.backbone_identity()
    keep = [torch.arange(32), torch.arange(32)]
    prune_ffn(model.backbone, keep)
    path = save_skeleton(model, tmp_path / "sk", keep_ffn=keep, dense_identity=identity)
    argv = [str(path), "--batch-sizes", "1", "--seq-lens", "4", "--repeats", "1", "--device", "cpu"]
    assert main([*argv, "--paths", "eager,sdpa", "--output", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "path 'sdpa': DebertaV2Model has no SDPA attention" in err and "--paths eager" in err
    assert not (tmp_path / "b.json").exists()  # refused before timing anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_on_cuda_in_half_precision(tmp_path):
    _, pruned, identity, keep = _pair()
    path = save_skeleton(pruned, tmp_path / "sk", keep_ffn=keep, dense_identity=identity)
    out = tmp_path / "bench.json"
    argv = [str(path), "--batch-sizes", "2", "--seq-lens", "8", "--repeats", "2", "--device", "cuda"]
    assert main([*argv, "--paths", "eager,sdpa,compile", "--dtype", "float16", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["device"] for r in rows] == ["cuda"] * 3 and all(r["dtype"] == "float16" for r in rows)
