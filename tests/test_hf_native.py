"""Exports load with AutoModel.from_pretrained for every supported family, with and without Skeleton."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from skeleton import hf_modeling
from skeleton.export import export_pruned, load_pruned
from skeleton.hf_native import SkeletonForTask
from skeleton.localize import ffn_widths, heads_per_layer, prune_ffn, prune_heads, supported_model_types
from skeleton.prompt import PromptTunedModel
from tests.tiny_models import GQA, make_batch, one_thread, tiny_backbone  # noqa: F401

FAMILIES = supported_model_types()
KEEP_FFN = [torch.arange(0, 64, 3), torch.tensor([], dtype=torch.long)]  # layer 1 loses its whole FFN
KEEP_HEADS = [torch.tensor([0, 2]), torch.tensor([1, 2, 3])]
KEEP_GROUPS = [torch.tensor([2, 3]), torch.tensor([0, 1])]  # whole key/value groups (2 heads each)


def _pruned_model(family: str) -> PromptTunedModel:
    model = PromptTunedModel(
        backbone="tiny:bert", task="sst2", prompt={"num_tokens": 3}, backbone_module=tiny_backbone(family)
    )
    prune_ffn(model.backbone, KEEP_FFN)
    prune_heads(model.backbone, KEEP_GROUPS if family in GQA else KEEP_HEADS)
    return model.eval()


def _hidden(backbone, batch):
    with torch.no_grad():
        return backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One pruned export per family, with the in-memory model that wrote it."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for family in FAMILIES:
        model = _pruned_model(family)
        out[family] = (model, export_pruned(model, root / family))
    return out


def test_every_supported_family_has_a_pruned_class_pair():
    assert sorted(hf_modeling.FAMILIES) == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_automodel_loads_the_export_and_predictions_equal_the_skeleton(exports, family):
    model, path = exports[family]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == f"skeleton-pruned-{family}"
    assert config["skeleton_ffn_widths"] == [22, 0]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    backbone = AutoModel.from_pretrained(path)
    assert type(backbone) is hf_modeling.CLASSES[family][1]
    assert ffn_widths(backbone) == [22, 0] and heads_per_layer(backbone) == heads_per_layer(model.backbone)
    batch = make_batch(rows=3, length=7, num_labels=2)
    assert torch.equal(_hidden(backbone.eval(), batch), _hidden(model.backbone, batch))
    task_model = SkeletonForTask.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(task_model(batch), model(batch))


def test_a_natively_loaded_model_exports_again(exports, tmp_path):
    model, path = exports["gpt2"]
    again = export_pruned(load_pruned(path), tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["skeleton_ffn_widths"] == [22, 0]
    batch = make_batch(rows=2, length=5, num_labels=2)
    with torch.no_grad():
        assert torch.equal(SkeletonForTask.from_pretrained(again)(batch), model(batch))


def test_plain_exports_from_before_the_pruned_classes_still_load(exports):
    model, path = exports["bert"]
    legacy = path.parent / "legacy"
    legacy.mkdir()
    for f in path.iterdir():
        if f.name not in ("config.json", hf_modeling.CODE_FILE):
            (legacy / f.name).write_bytes(f.read_bytes())
    model.backbone.config.save_pretrained(legacy)  # the family's own config + widths, as exports were
    assert json.loads((legacy / "config.json").read_text())["model_type"] == "bert"
    batch = make_batch(rows=2, length=6, num_labels=2)
    with torch.no_grad():
        assert torch.equal(load_pruned(legacy)(batch), model(batch))


_REMOTE = textwrap.dedent(
    """
    import sys
    sys.modules["skeleton"] = None  # prove the export does not need Skeleton
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    for folder in sys.argv[1:]:
        try:
            AutoModel.from_pretrained(folder, trust_remote_code=False)
            raise SystemExit(f"{folder} loaded with stock classes")
        except ValueError:
            pass  # stock transformers cannot build layers of different widths
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        batch = load_file(f"{folder}/batch.safetensors")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        save_file({"hidden": hidden.contiguous()}, f"{folder}/remote.safetensors")
    """
)


def test_remote_code_loads_every_family_without_skeleton(exports, tmp_path):
    batch = make_batch(rows=2, length=6)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    for _, path in exports.values():
        save_file(inputs, path / "batch.safetensors")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    folders = [str(path) for _, path in exports.values()]
    run = subprocess.run(
        [sys.executable, "-c", _REMOTE, *folders], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for family, (model, path) in exports.items():
        remote = load_file(path / "remote.safetensors")["hidden"]
        assert torch.equal(remote, _hidden(model.backbone, batch)), family


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_without_heads_loads_natively_and_computes_its_bias_path(family, tmp_path):
    model = PromptTunedModel(
        backbone="tiny:bert", task="sst2", prompt={"num_tokens": 3}, backbone_module=tiny_backbone(family)
    ).eval()
    none = torch.tensor([], dtype=torch.long)
    prune_ffn(model.backbone, [none, torch.arange(0, 64, 2)])
    prune_heads(model.backbone, [none, KEEP_GROUPS[1] if family in GQA else KEEP_HEADS[1]])
    path = export_pruned(model, tmp_path / family)
    batch = make_batch(rows=3, length=7, num_labels=2)
    want = _hidden(model.backbone, batch)
    assert torch.equal(_hidden(AutoModel.from_pretrained(path).eval(), batch), want)
    assert torch.equal(_hidden(load_pruned(path).backbone, batch), want)
