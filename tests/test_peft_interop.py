"""Soft prompts travel to and from PEFT prompt-tuning adapters with the same predictions."""

import json

import pytest
import torch
from hydra.utils import instantiate
from peft import PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoModel

from skeleton.backbones import load_tokenizer
from skeleton.peft_interop import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PeftAdapterError,
    PeftTaskModel,
    load_peft_prompt,
    save_peft_adapter,
    save_peft_prompt,
)
from skeleton.prompt import PromptConfig, PromptTunedModel
from tests.helpers import compose_config
from tests.tiny_models import HIDDEN, make_batch, one_thread, tiny_backbone  # noqa: F401

CASES = [("bert", "mean"), ("bert", "first"), ("gpt2", "last"), ("llama", "last")]


def _dense(family, path):
    """A dense backbone folder: PEFT loads the adapter onto AutoModel.from_pretrained of it."""
    tiny_backbone(family).save_pretrained(path)
    load_tokenizer("tiny:bert").save_pretrained(path)  # exports copy the backbone's tokenizer
    return str(path)


def _model(backbone, pooling="mean", prompt=None):
    prompt = prompt or {"num_tokens": 4, "init": "random"}
    return PromptTunedModel(backbone=backbone, task="sst2", prompt=prompt, pooling=pooling, seed=3).eval()


@pytest.mark.parametrize(("family", "pooling"), CASES)
def test_peft_loads_the_exported_prompt_with_the_same_predictions(tmp_path, family, pooling):
    model = _model(_dense(family, tmp_path / "dense"), pooling)
    path = save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"]) == (
        "PROMPT_TUNING",
        "FEATURE_EXTRACTION",
        4,
    )
    peft = PeftTaskModel.from_pretrained(path)  # the dense backbone named in the adapter config
    batch = make_batch(rows=4, length=7, num_labels=2)  # right-padded rows of different lengths
    with torch.no_grad():
        hidden = peft.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(hidden.last_hidden_state, model.encode(batch), rtol=0, atol=1e-6)
        torch.testing.assert_close(peft(batch), model(batch), rtol=0, atol=1e-6)


def test_peft_drops_token_type_ids_so_bert_pairs_differ_only_there(tmp_path):
    model = _model(_dense("bert", tmp_path / "dense"))
    peft = PeftTaskModel.from_pretrained(save_peft_adapter(model, tmp_path / "adapter"))
    batch = make_batch(rows=3, length=8, lengths=[8, 8, 8], num_labels=2)
    pair = {**batch, "token_type_ids": (torch.arange(8) >= 4).long().expand(3, 8)}
    with torch.no_grad():
        ours_pair, ours_single, theirs = model(pair), model(batch), peft(pair)
    assert not torch.allclose(ours_pair, theirs, atol=1e-4)  # segment ids change BERT's output
    torch.testing.assert_close(theirs, ours_single, rtol=0, atol=1e-6)  # PEFT sees segment 0 everywhere


def _peft_trained(backbone_folder, path, num_tokens=6):
    """An adapter written by PEFT itself, with a prompt that is not its initialisation."""
    config = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=num_tokens)
    peft_model = get_peft_model(AutoModel.from_pretrained(backbone_folder), config)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.normal_(generator=torch.Generator().manual_seed(7))
    peft_model.save_pretrained(path)
    return weight.detach().clone()


def test_a_peft_adapter_starts_a_run_through_prompt_peft(tmp_path):
    backbone = _dense("bert", tmp_path / "dense")
    expected = _peft_trained(backbone, tmp_path / "adapter")
    model = _model(backbone, prompt={"init": "peft", "path": str(tmp_path / "adapter"), "num_tokens": None})
    assert model.prompt.num_tokens == 6 and torch.equal(model.prompt.embeddings.detach(), expected)
    assert model.hparams["prompt"]["num_tokens"] == 6  # resolved, so a checkpoint rebuilds the same shape

    overrides = ["prompt=peft", f"prompt.path={tmp_path / 'adapter'}", f"model.backbone={backbone}"]
    cfg = compose_config([*overrides, "prompt.num_tokens=null"])  # the tiny experiment sets 3
    built = instantiate(cfg.module)
    assert torch.equal(built.prompt.embeddings.detach(), expected)


def test_round_trip_through_peft_keeps_the_prompt(tmp_path):
    prompt = torch.randn(5, HIDDEN)
    path = save_peft_prompt(prompt, tmp_path / "a")
    assert torch.equal(load_peft_prompt(path, hidden_size=HIDDEN, num_tokens=5), prompt)


def test_adapters_that_do_not_fit_are_refused_naming_the_file(tmp_path):
    path = save_peft_prompt(torch.randn(5, 16), tmp_path / "a")
    with pytest.raises(PeftAdapterError, match=r"adapter_model\.safetensors.*hidden size is 32"):
        load_peft_prompt(path, hidden_size=32)
    with pytest.raises(PeftAdapterError, match=r"prompt\.num_tokens=5"):
        load_peft_prompt(path, num_tokens=20)
    with pytest.raises(ValueError, match=r"prompt\.path"):
        PromptConfig(init="peft")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(PeftAdapterError, match="LORA"):
        load_peft_prompt(lora)
    (path / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(PeftAdapterError, match="never unpickles"):
        load_peft_prompt(path)


def test_the_adapter_also_serves_the_pruned_export_through_peft(tmp_path):
    from skeleton.export import export_pruned
    from skeleton.localize import prune_ffn

    model = _model(_dense("llama", tmp_path / "dense"), "last")
    prune_ffn(model.backbone, [torch.arange(0, 64, 5), torch.arange(9)])
    export = export_pruned(model, tmp_path / "export")
    adapter = save_peft_adapter(model, tmp_path / "adapter")
    peft = PeftTaskModel.from_pretrained(adapter, backbone=AutoModel.from_pretrained(export))
    batch = make_batch(rows=3, length=6, num_labels=2)
    with torch.no_grad():
        torch.testing.assert_close(peft(batch), model(batch), rtol=0, atol=1e-6)
