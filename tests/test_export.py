"""Artifacts reload into exactly the model that was saved, refuse the wrong backbone, and serve predictions."""

import json
import shutil

import pytest
import torch

from skeleton.backbones import load_backbone, load_tokenizer
from skeleton.bench import synthetic_batch
from skeleton.cli.predict import main as predict_main
from skeleton.export import (
    BackboneMismatchError,
    export_pruned,
    load_pruned,
    load_skeleton,
    save_skeleton,
)
from skeleton.localize import ffn_widths, heads_per_layer, prune_ffn, prune_heads
from skeleton.prompt import PromptTunedModel

KEEP_FFN = [torch.arange(0, 64, 3), torch.tensor([5, 1, 60, 7])]  # unsorted on purpose
KEEP_HEADS = [torch.tensor([0, 2]), None]


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch)


def _pruned(backbone="tiny:bert"):
    """A prompt model pruned in place, its dense identity, and its dense logits on a fixed batch."""
    model = PromptTunedModel(backbone=backbone, task="sst2", prompt={"num_tokens": 4})
    batch = synthetic_batch(model, 3, 9)
    dense_logits, identity = _logits(model, batch), model.backbone_identity()
    prune_ffn(model.backbone, KEEP_FFN)
    prune_heads(model.backbone, KEEP_HEADS)
    assert not torch.equal(_logits(model, batch), dense_logits)  # the pruning really changed the model
    return model, identity, batch


def _save(model, identity, path):
    return save_skeleton(model, path, keep_ffn=KEEP_FFN, keep_heads=KEEP_HEADS, dense_identity=identity,
                         extra={"rate": 0.5, "psi": 1.0})  # fmt: skip


def _dense_folder(path, seed=0):
    """A local backbone folder, as an offline cluster would hold it (weights + tokenizer)."""
    load_backbone("tiny:bert", seed=seed).save_pretrained(path)
    load_tokenizer("tiny:bert").save_pretrained(path)
    return str(path)


def test_skeleton_roundtrip_is_bit_identical_and_pickle_free(tmp_path):
    model, identity, batch = _pruned()
    path = _save(model, identity, tmp_path / "sk")
    assert sorted(p.name for p in path.iterdir()) == ["skeleton.json", "skeleton.safetensors"]
    meta = json.loads((path / "skeleton.json").read_text())
    assert (
        meta["backbone"] == identity and meta["ffn_widths"] == [22, 4] and meta["heads_per_layer"] == [2, 4]
    )
    assert meta["extra"]["rate"] == 0.5 and meta["model"]["prompt"]["num_tokens"] == 4
    loaded = load_skeleton(path)
    assert ffn_widths(loaded.backbone) == [22, 4] and heads_per_layer(loaded.backbone) == [2, 4]
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_save_refuses_indices_the_model_was_not_pruned_with(tmp_path):
    model = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 4})
    with pytest.raises(ValueError, match="prune the model"):
        save_skeleton(model, tmp_path, keep_ffn=KEEP_FFN, dense_identity=model.backbone_identity())


def test_other_backbone_is_refused_with_both_hashes(tmp_path):
    model, identity, batch = _pruned()
    path = _save(model, identity, tmp_path / "sk")
    same = load_skeleton(path, backbone=_dense_folder(tmp_path / "same", seed=0))  # a local copy: accepted
    assert torch.equal(_logits(same, batch), _logits(model, batch))
    other = _dense_folder(tmp_path / "other", seed=1)
    with pytest.raises(BackboneMismatchError) as err:
        load_skeleton(path, backbone=other)
    message = str(err.value)
    assert identity["sha256"] in message and "check_hash=False" in message and "backbone" in message
    forced = load_skeleton(path, backbone=other, check_hash=False)
    assert ffn_widths(forced.backbone) == [22, 4]


def test_export_reloads_identically_without_the_dense_weights(tmp_path):
    dense = _dense_folder(tmp_path / "dense")
    model, _, batch = _pruned(backbone=dense)
    path = export_pruned(model, tmp_path / "export")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "skeleton.json", "skeleton.safetensors"} <= names
    code = {"skeleton_pruned.py"}  # for AutoModel.from_pretrained(..., trust_remote_code=True); no pickles
    assert all(n.endswith((".json", ".safetensors", ".txt", ".model")) for n in names - code), names
    config = json.loads((path / "config.json").read_text())
    assert config["skeleton_ffn_widths"] == [22, 4] and config["skeleton_heads_per_layer"] == [2, 4]
    shutil.rmtree(dense)  # the dense backbone is gone: the export must not need it
    loaded = load_pruned(path)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert sum(p.numel() for p in loaded.backbone.parameters()) == sum(
        p.numel() for p in model.backbone.parameters()
    )


def _sst2_tsv(path, rows=5):
    lines = ["sentence\tlabel"] + [
        f"a {'good' if i % 2 else 'bad'} film number {i}\t{i % 2}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_predict_cli_on_a_run_folder(tmp_path, capsys):
    model, identity, _ = _pruned()
    _save(model, identity, tmp_path / "run" / "skeleton")
    tsv, out = _sst2_tsv(tmp_path / "dev.tsv"), tmp_path / "preds.jsonl"
    code = predict_main(
        [str(tmp_path / "run"), "--input", str(tsv), "--output", str(out), "--batch-size", "2"]
    )
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(5))
    assert all(r["prediction"] in ("negative", "positive") and len(r["scores"]) == 2 for r in lines)
    printed = capsys.readouterr().out
    assert "examples/s" in printed and "accuracy" in printed

    assert (
        predict_main([str(tmp_path / "run"), "--input", str(tsv), "--output", str(out), "--limit", "2"]) == 0
    )
    assert len(out.read_text().splitlines()) == 2


def test_predict_cli_clear_errors(tmp_path, capsys):
    model, identity, _ = _pruned()
    path = _save(model, identity, tmp_path / "sk")
    tsv = _sst2_tsv(tmp_path / "dev.tsv")
    assert predict_main([str(tmp_path / "missing"), "--input", str(tsv)]) == 2
    assert "does not exist" in capsys.readouterr().err
    wrong = tmp_path / "dev.jsonl"
    wrong.write_text('{"text": "x", "label": 1}\n')
    assert predict_main([str(path), "--input", str(wrong), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "missing field(s) ['sentence']" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\t1\n")
    assert predict_main([str(path), "--input", str(bad), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "lacks column" in capsys.readouterr().err
