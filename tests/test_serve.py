"""Serving: one dense backbone shared by every task's skeleton, in the library and over real HTTP.

A real `skeleton-serve` process on a free loopback port, driven by httpx; tiny random BERT skeletons.
"""

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from skeleton.backbones import load_tokenizer, weights_hash
from skeleton.bench import synthetic_batch
from skeleton.data import TokenizedSplit, collator_for, tokenize
from skeleton.export import BackboneMismatchError, load_skeleton, save_skeleton
from skeleton.localize import layer_parts, prune_ffn, prune_heads
from skeleton.localize.reconstruct import collect_statistics, compensate, fit_compensation
from skeleton.prompt import PromptTunedModel
from skeleton.serve import InputError, MultiTaskModel, UnknownTaskError
from skeleton.serve.multitask import input_fields

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 24
INPUTS = {
    "sst2": ["a gripping, funny film", {"sentence": "dull and far too long"}, "ok"],
    "mrpc": [{"sentence1": "He left at noon.", "sentence2": "He went away at midday."}],
    "stsb": [{"sentence1": "A cat sits.", "sentence2": "A dog runs."}, {"sentence1": "x", "sentence2": "x"}],
}
KEEP = {  # kept FFN neurons of the two 64-wide layers (and heads for mrpc), different per task
    "sst2": ([torch.arange(0, 64, 3), torch.tensor([5, 1, 60, 7])], None),
    "mrpc": ([torch.arange(40), torch.arange(10, 30)], [torch.tensor([0, 2]), None]),
    "stsb": ([torch.arange(8, 64), torch.arange(64)], None),
}


COMPENSATED = "mrpc"  # its skeleton carries least-squares scales and shifts (skeleton.reconstruct)


def make_skeleton(task, path, keep_ffn, keep_heads=None, seed=0):
    """A tiny BERT prompt model with a random head, pruned and saved as a skeleton."""
    model = PromptTunedModel(backbone="tiny:bert", task=task, prompt={"num_tokens": 4}, seed=seed)
    with torch.no_grad():
        torch.manual_seed(len(task))
        for p in [*model.head.parameters(), model.prompt.embeddings]:
            p.normal_()
    identity = model.backbone_identity()
    comp = None
    if task == COMPENSATED:
        calibration = [synthetic_batch(model, 8, 9, seed=s) for s in (1, 2)]
        stats = collect_statistics(model, calibration, max_instances=16)
        comp = fit_compensation(stats, keep_ffn, keep_heads)
    prune_ffn(model.backbone, keep_ffn)
    if keep_heads is not None:
        prune_heads(model.backbone, keep_heads)
    if comp is not None:
        compensate(model.backbone, comp)
    return save_skeleton(
        model, path, keep_ffn=keep_ffn, keep_heads=keep_heads, dense_identity=identity,
        extra={"rate": 0.5}, compensation=comp,
    )  # fmt: skip


@pytest.fixture(scope="module")
def skeletons(tmp_path_factory):
    root = tmp_path_factory.mktemp("skeletons")
    paths = {task: make_skeleton(task, root / task / "skeleton", *KEEP[task]) for task in KEEP}
    paths["rte"] = make_skeleton("rte", root / "rte", [torch.arange(16), torch.arange(16)])
    paths["other"] = make_skeleton("sst2", root / "other", *KEEP["sst2"], seed=1)  # another backbone
    corrupt = make_skeleton("cola", root / "corrupt", *KEEP["sst2"])
    (corrupt / "skeleton.safetensors").write_bytes(b"not a safetensors file")
    paths["corrupt"] = corrupt
    return paths


def reference_logits(path, task, inputs):
    """What load_skeleton's model answers on the same inputs, batched the same way."""
    model = load_skeleton(path)
    tokenizer = load_tokenizer("tiny:bert")
    fields = input_fields(model.task)
    rows = [{fields[0]: x} if isinstance(x, str) else x for x in inputs]
    examples = [model.task.convert({**r, "label": 0}) for r in rows]
    data = TokenizedSplit(tokenize(examples, tokenizer, MAX_LENGTH))
    batch = collator_for(tokenizer, model.task)([data[i] for i in range(len(data))])
    with torch.no_grad():
        return model(batch).float().reshape(len(inputs), -1)


@pytest.fixture(scope="module")
def multitask(skeletons):
    return MultiTaskModel.from_artifacts([skeletons[t] for t in KEEP], max_length=MAX_LENGTH)


# ---- the library -----------------------------------------------------------------------------------
def _ptr(t):
    return t.untyped_storage().data_ptr()


def test_tasks_share_one_storage_for_everything_they_do_not_prune(multitask):
    dense = multitask.dense
    for name, entry in multitask.tasks.items():
        view = entry.model.backbone
        assert view is not dense
        for (key, mine), (_, shared) in zip(view.named_parameters(), dense.named_parameters()):
            if ".intermediate." in key or (".output.dense." in key and ".attention." not in key):
                continue  # the FFN: sliced per task (checked below)
            if mine.shape != shared.shape:  # only mrpc prunes heads, in layer 0: its own q/k/v/out
                assert name == "mrpc" and "layer.0.attention" in key, key
                assert _ptr(mine) != _ptr(shared)
                continue
            if name == COMPENSATED and "layer.0.attention.output.dense.bias" in key:
                assert _ptr(mine) != _ptr(shared)  # its shift lives in a bias of its own
                continue
            assert _ptr(mine) == _ptr(shared), f"{name}: {key} is a copy"
        for i, (mine, shared) in enumerate(zip(layer_parts(view), layer_parts(dense))):
            width = len(KEEP[name][0][i])
            assert mine.up.weight.shape[0] == width and mine.down.weight.shape[1] == width
            if width < shared.ffn_width:
                assert _ptr(mine.up.weight) != _ptr(shared.up.weight)
    assert [p.ffn_width for p in layer_parts(dense)] == [64, 64]  # the dense backbone stays dense
    assert weights_hash(dense) == multitask.sha256  # and no task's compensation wrote into it


def test_library_predictions_equal_load_skeleton_bit_for_bit(multitask, skeletons):
    for task, inputs in INPUTS.items():
        records = multitask.predict(task, inputs)
        expected = reference_logits(skeletons[task], task, inputs)
        assert [r["scores"] for r in records] == expected.tolist()
    spec = multitask.tasks["sst2"].spec
    assert {r["label"] for r in multitask.predict("sst2", INPUTS["sst2"])} <= set(spec.labels)
    assert all(isinstance(r["value"], float) for r in multitask.predict("stsb", INPUTS["stsb"]))


def test_register_and_unregister_leave_other_tasks_alone(multitask, skeletons):
    before = multitask.predict("sst2", INPUTS["sst2"])
    multitask.register(skeletons["rte"])
    assert multitask.predict("sst2", INPUTS["sst2"]) == before
    assert multitask.predict("rte", [{"sentence1": "a", "sentence2": "b"}])[0]["label"] in (
        "entailment",
        "not_entailment",
    )
    multitask.unregister("rte")
    assert multitask.predict("sst2", INPUTS["sst2"]) == before
    with pytest.raises(UnknownTaskError, match="loaded tasks: mrpc, sst2, stsb"):
        multitask.predict("rte", ["x"])


def test_other_backbone_refused_naming_both_hashes(multitask, skeletons):
    other = json.loads((skeletons["other"] / "skeleton.json").read_text())["backbone"]["sha256"]
    with pytest.raises(BackboneMismatchError) as err:
        multitask.register(skeletons["other"], name="other")
    assert other in str(err.value) and multitask.sha256 in str(err.value)
    assert "other" not in multitask.tasks


def test_memory_counts_shared_weights_once(multitask):
    mem = multitask.memory()
    dense = sum(p.numel() * p.element_size() for p in multitask.dense.parameters())
    assert mem["shared_bytes"] >= dense
    assert set(mem["task_bytes"]) == {"sst2", "mrpc", "stsb"}
    assert 0 < max(mem["task_bytes"].values()) < dense / 10  # a task owns slices, never a copy
    assert mem["total_bytes"] < mem["separate_pruned_bytes"] < mem["separate_dense_bytes"]


# ---- the HTTP server -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(skeletons, tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)  # the server's own default must apply
    cmd = [sys.executable, "-m", "skeleton.serve.server", *(str(skeletons[t].parent) for t in KEEP)]
    cmd += ["--port", str(port), "--max-length", str(MAX_LENGTH), "--max-batch-size", "8",
            "--max-wait-ms", "20", "--threads", "1"]  # fmt: skip
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 90
    while True:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=20)


def _predict(client, task, inputs):
    return client.post("/predict", json={"task": task, "inputs": inputs})


def _alive(client):
    r = _predict(client, "sst2", ["still here"])
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("negative", "positive")


def test_http_predictions_equal_load_skeleton_bit_for_bit(server, skeletons):
    for task, inputs in INPUTS.items():
        r = _predict(server, task, inputs)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and "truncated" not in body
        expected = reference_logits(skeletons[task], task, inputs)
        assert [p["scores"] for p in body["predictions"]] == expected.tolist()
        key = "value" if task == "stsb" else "label"
        assert all(key in p for p in body["predictions"])


def test_interleaved_requests_for_three_tasks_get_their_own_answers(server, skeletons):
    jobs = [(t, [x]) for _ in range(6) for t, xs in INPUTS.items() for x in xs]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: _predict(server, *job), jobs))
    for (task, inputs), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["task"] == task
        expected = reference_logits(skeletons[task], task, inputs)[0]
        got = torch.tensor(r.json()["predictions"][0]["scores"])
        assert torch.allclose(got, expected.reshape(-1), atol=1e-5), (task, got, expected)
    stats = server.get("/stats").json()
    assert set(stats) >= set(INPUTS) and all(s["largest_batch"] <= 8 for s in stats.values())


def test_task_list_and_health(server, skeletons):
    body = server.get("/tasks").json()
    assert [t["name"] for t in body["tasks"]] == list(KEEP)
    sha = json.loads((skeletons["sst2"] / "skeleton.json").read_text())["backbone"]["sha256"]
    assert body["backbone"]["sha256"] == sha
    sst2 = body["tasks"][0]
    assert sst2["rate"] == 0.5 and sst2["fields"] == ["sentence"] and sst2["backbone"]["sha256"] == sha
    assert sst2["ffn_widths"] == [22, 4] and sst2["flop_speedup_128"] > 1
    assert server.get("/health").json() == {"status": "ok", "tasks": ["mrpc", "sst2", "stsb"]}
    mem = server.get("/memory").json()
    assert mem["rss_bytes"] > mem["total_bytes"] > mem["shared_bytes"]
    assert mem["peak_rss_bytes"] >= mem["rss_bytes"]
    assert mem["kernel_cache"] == "0"  # set before the first forward pass (README, Serving)


def test_hot_registration_and_removal(server, skeletons):
    r = server.post("/tasks", json={"path": str(skeletons["rte"])})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "rte"
    pair = [{"sentence1": "It rains.", "sentence2": "The ground is wet."}]
    r = _predict(server, "rte", pair)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("entailment", "not_entailment")
    assert r.json()["predictions"][0]["scores"] == reference_logits(skeletons["rte"], "rte", pair)[0].tolist()
    assert server.post("/tasks", json={"path": str(skeletons["rte"])}).status_code == 409  # already loaded
    assert server.delete("/tasks/rte").json()["loaded_tasks"] == ["mrpc", "sst2", "stsb"]
    r = _predict(server, "rte", pair)
    assert r.status_code == 404
    assert server.delete("/tasks/rte").status_code == 404
    _alive(server)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"task": "qqp", "inputs": ["x"]}, 404, "unknown task 'qqp'; loaded tasks: mrpc, sst2, stsb"),
        ({"task": "mrpc", "inputs": [{"sentence1": "a"}]}, 422, "missing ['sentence2']"),
        ({"task": "sst2", "inputs": [{"sentence": "a", "label": 1}]}, 422, "unexpected ['label']"),
        ({"task": "mrpc", "inputs": ["a bare string"]}, 422, "must be an object"),
        ({"task": "sst2", "inputs": [{"sentence": 3}]}, 422, "must be strings"),
        ({"task": "sst2", "inputs": []}, 422, "non-empty list"),
        ({"task": "sst2", "inputs": "x"}, 422, "non-empty list"),
        ({"task": "sst2"}, 422, "missing ['inputs']"),
        ({"task": "sst2", "inputs": ["x"], "top_k": 2}, 422, "unexpected ['top_k']"),
        ({"task": "sst2", "inputs": ["x"] * 9}, 413, "the limit is 8"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, body, status, needle):
    r = server.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    if status == 404:
        assert r.json()["loaded_tasks"] == ["mrpc", "sst2", "stsb"]
    _alive(server)


def test_non_json_body_is_a_400(server):
    r = server.post("/predict", content=b"{task: sst2", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    _alive(server)


def test_too_long_text_is_truncated_and_said_so(server, skeletons):
    long = " ".join(["word"] * 200)
    r = _predict(server, "sst2", ["short", long])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] == [1] and f"cut to {MAX_LENGTH} tokens" in body["warning"]
    expected = reference_logits(skeletons["sst2"], "sst2", ["short", long])
    assert [p["scores"] for p in body["predictions"]] == expected.tolist()


@pytest.mark.parametrize(
    "which, status, needle",
    [
        ("corrupt", 422, "is unreadable"),
        ("other", 409, "sha256"),
        ("missing", 422, "does not exist"),
    ],
)
def test_bad_skeleton_folders_are_refused_at_registration(server, skeletons, which, status, needle):
    path = skeletons[which] if which in skeletons else skeletons["sst2"].parent / "nowhere"
    r = server.post("/tasks", json={"path": str(path)})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    if which == "other":  # both hashes named
        other = json.loads((skeletons["other"] / "skeleton.json").read_text())["backbone"]["sha256"]
        assert (
            other in r.json()["error"]
            and server.get("/tasks").json()["backbone"]["sha256"] in r.json()["error"]
        )
    assert server.get("/health").json()["tasks"] == ["mrpc", "sst2", "stsb"]
    _alive(server)


def test_reject_policy_refuses_long_inputs(multitask):
    long = " ".join(["word"] * 200)
    multitask.truncation = "reject"
    try:
        with pytest.raises(InputError, match=rf"inputs \[1\] are longer than {MAX_LENGTH} tokens"):
            multitask.encode("sst2", ["short", long])
    finally:
        multitask.truncation = "truncate"
    assert multitask.encode("sst2", ["short", long]).truncated == [1]


def test_cli_refuses_a_bad_folder_before_serving(tmp_path, capsys):
    from skeleton.serve.server import main

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_released_dense_ffn_is_read_again_for_a_new_task(skeletons, multitask):
    lean = MultiTaskModel.from_artifacts(
        [skeletons[t] for t in KEEP], max_length=MAX_LENGTH, release_dense_ffn=True
    )
    for task, inputs in INPUTS.items():
        assert lean.predict(task, inputs) == multitask.predict(task, inputs)
    mem, full = lean.memory(), multitask.memory()
    assert mem["dense_ffn_released"] and mem["total_bytes"] < full["total_bytes"]
    assert mem["shared_bytes"] < full["shared_bytes"] - 4 * 2 * 64 * 32 * 2  # 2 layers' up + down gone
    pair = [{"sentence1": "It rains.", "sentence2": "The ground is wet."}]
    lean.register(skeletons["rte"])  # cut from dense weights read again and checked by hash
    assert (
        lean.predict("rte", pair)[0]["scores"] == reference_logits(skeletons["rte"], "rte", pair)[0].tolist()
    )
    assert lean.memory()["dense_ffn_released"]


def test_cli_refuses_a_negative_kernel_cache(skeletons, capsys):
    from skeleton.serve.server import main

    with pytest.raises(SystemExit) as exit_:
        main([str(skeletons["sst2"].parent), "--kernel-cache", "-1"])
    assert exit_.value.code == 2 and "--kernel-cache -1: a number of kernels" in capsys.readouterr().err


def test_cli_refuses_two_artifacts_of_one_task(skeletons, capsys):
    from skeleton.serve.server import main

    assert main([str(skeletons["sst2"]), str(skeletons["other"])]) == 2
    assert "two artifacts for task 'sst2'" in capsys.readouterr().err
