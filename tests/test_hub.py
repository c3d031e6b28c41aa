"""push_to_hub and load-by-repo-id, through huggingface_hub's real client against a local Hub stand-in."""

import json

import pytest
import torch
import yaml
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModel

from skeleton.bench import synthetic_batch
from skeleton.export import export_pruned, load_pruned, load_skeleton, save_skeleton
from skeleton.hf_native import SkeletonForTask
from skeleton.hub import main as hub_main
from skeleton.hub import model_card, push_to_hub
from skeleton.localize import ffn_widths, prune_ffn
from skeleton.prompt import PromptTunedModel
from tests.hub_standin import HubStandIn
from tests.tiny_models import one_thread  # noqa: F401

TOKEN = "hf_standin_token"
COMMAND = "skeleton-train task=sst2 model=tiny-bert skeleton.psi=1.0"


KEEP_FFN = [torch.arange(0, 64, 3), torch.tensor([5, 1, 60, 7])]


def _pruned():
    """A pruned tiny-BERT prompt model, its dense identity, and a fixed batch."""
    model = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 4})
    identity = model.backbone_identity()
    prune_ffn(model.backbone, KEEP_FFN)
    return model.eval(), identity, synthetic_batch(model, 3, 9)


def _save(model, identity, path):
    extra = {"rate": 0.5, "psi": 1.0}
    return save_skeleton(model, path, keep_ffn=KEEP_FFN, dense_identity=identity, extra=extra)


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at the stand-in, online, with a cache of its own (this test only)."""
    with HubStandIn() as server:
        for var, value in (("HF_ENDPOINT", server.url), ("HF_HUB_OFFLINE", "0"), ("HF_HOME", str(tmp_path))):
            monkeypatch.setenv(var, value)
        # constants are read when huggingface_hub is imported: follow the environment set above
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        yield server


def _hidden(backbone, batch):
    with torch.no_grad():
        return backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


def _card(server, repo_id):
    text = server.repos[repo_id].commits[-1][1]["README.md"].decode()
    _, header, body = text.split("---", 2)
    return yaml.safe_load(header), body


def test_skeleton_round_trips_through_the_hub_with_a_model_card(hub, tmp_path):
    model, identity, batch = _pruned()
    path = _save(model, identity, tmp_path / "sk")
    info = push_to_hub(
        path, "alice/sst2-skeleton", token=TOKEN, command=COMMAND, scores={"dense": 0.85}, speedup=1.47
    )
    assert info.oid == hub.repos["alice/sst2-skeleton"].commits[-1][0]
    calls = [p for _, p in hub.requests]
    assert "/api/repos/create" in calls and any(p.endswith("/preupload/main") for p in calls)
    files = hub.repos["alice/sst2-skeleton"].commits[-1][1]
    assert sorted(files) == ["README.md", "skeleton.json", "skeleton.safetensors"]
    assert files["skeleton.safetensors"] == (path / "skeleton.safetensors").read_bytes()
    meta, body = _card(hub, "alice/sst2-skeleton")
    assert meta["library_name"] == "skeleton" and "sst2" in meta["tags"] and "base_model" not in meta
    for fact in ("sst2", identity["sha256"], "| psi (points) | 1 |", "| pruning rate | 50.0% |", "85.00"):
        assert fact in body, fact
    assert "x1.47" in body and COMMAND in body

    hub.requests.clear()
    loaded = load_skeleton("alice/sst2-skeleton")
    assert any("/resolve/" in p for _, p in hub.requests)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_export_loads_by_repo_id_and_a_second_push_is_a_new_commit(hub, tmp_path):
    model, _, batch = _pruned()
    path = export_pruned(model, tmp_path / "export", extra={"psi": 1.0, "rate": 0.5})
    first = push_to_hub(path, "alice/sst2-pruned", token=TOKEN)
    assert "skeleton_pruned.py" in hub.repos["alice/sst2-pruned"].commits[-1][1]
    for loaded in (load_pruned("alice/sst2-pruned"), SkeletonForTask.from_pretrained("alice/sst2-pruned")):
        assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    backbone = AutoModel.from_pretrained("alice/sst2-pruned").eval()  # transformers' own Hub download
    assert ffn_widths(backbone) == ffn_widths(model.backbone)
    assert torch.equal(_hidden(backbone, batch), _hidden(model.backbone, batch))
    second = push_to_hub(path, "alice/sst2-pruned", token=TOKEN, scores={"dense": 0.9, "pruned": 0.88})
    assert second.oid != first.oid and len(hub.repos["alice/sst2-pruned"].commits) == 2
    _, body = _card(hub, "alice/sst2-pruned")
    assert "90.00" in body and "88.00" in body and "trust_remote_code=True" in body


def test_a_run_folder_is_pushed_with_its_scores_speedup_and_command(hub, tmp_path, capsys, monkeypatch):
    model, identity, _ = _pruned()
    run = tmp_path / "run"
    _save(model, identity, run / "skeleton")
    summary = {"dense": {"dev": {"accuracy": 0.814}}, "pruned": {"dev": {"accuracy": 0.797}}, "speedup": 1.47}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=quickstart\n- skeleton.psi=1.0\n")
    extra = json.loads((run / "skeleton" / "skeleton.json").read_text())
    extra["extra"]["headline"] = "accuracy"  # as runs record it
    (run / "skeleton" / "skeleton.json").write_text(json.dumps(extra))
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the command line takes the token the way the hub client does
    assert hub_main([str(run), "carol/quickstart"]) == 0
    assert "pushed" in capsys.readouterr().out
    _, body = _card(hub, "carol/quickstart")
    assert "| dense score (accuracy) | 81.40 |" in body and "| pruned score (accuracy) | 79.70 |" in body
    assert "x1.47" in body and "`skeleton-train experiment=quickstart skeleton.psi=1.0`" in body


def test_a_local_folder_wins_over_a_repo_id(hub, tmp_path, monkeypatch):
    model, identity, batch = _pruned()
    monkeypatch.chdir(tmp_path)
    _save(model, identity, tmp_path / "alice" / "local-skeleton")
    loaded = load_skeleton("alice/local-skeleton")
    assert hub.requests == []
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_a_missing_repo_is_a_hub_error(hub):
    with pytest.raises(RepositoryNotFoundError):
        load_skeleton("alice/does-not-exist")


def test_card_names_a_hub_backbone_as_base_model():
    meta = {
        "kind": "export",
        "task": "rte",
        "backbone": {"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "sha256": "ab" * 32},
        "ffn_widths": [10, 20],
        "extra": {"headline": "accuracy", "dev": {"accuracy": 0.6}, "rate": 0.25, "psi": 2.0},
    }
    card = model_card(meta, "bob/rte")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert (
        "| pruned score (accuracy) | 60.00 |" in card.text
        and "| dense score (accuracy) | not recorded |" in card.text
    )
