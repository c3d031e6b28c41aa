"""The adapter a model uses is named in the config and recorded in every artifact: a user adapter
(model.adapter=package.module:function) is resolved by train, bench, predict and artifact reloads in fresh
processes without wrapper scripts; inferred and registered ones are recorded by name."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skeleton.bench import synthetic_batch
from skeleton.export import export_pruned, load_model, load_pruned, load_skeleton, save_skeleton
from skeleton.localize import UnsupportedArchitectureError, get_adapter, prune_ffn, prune_heads
from skeleton.localize.infer import check_adapter
from skeleton.prompt import PromptTunedModel

ROOT = Path(__file__).resolve().parents[1]
SPEC = "tests.user_adapter:deberta_v1"


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch)


def test_user_adapter_is_resolved_checked_and_recorded():
    model = PromptTunedModel(backbone="tiny:deberta", task="sst2", prompt={"num_tokens": 2}, adapter=SPEC)
    assert model.hparams.adapter == SPEC == model.backbone.config.skeleton_adapter
    adapter = check_adapter(model.backbone)  # its head slicing of the fused in_proj passes the check too
    assert adapter is get_adapter(model.backbone) and adapter.prune_heads is not None


def test_without_the_user_adapter_the_fused_family_prunes_ffn_only():
    model = PromptTunedModel(backbone="tiny:deberta", task="sst2", prompt={"num_tokens": 2})
    assert model.hparams.adapter == "inferred"
    assert check_adapter(model.backbone).prune_heads is None


def test_a_function_that_registers_an_adapter_is_used():
    from skeleton.backbones import load_backbone
    from skeleton.localize import arch

    backbone = load_backbone("tiny:bert")
    backbone.config.model_type = "bert-user"
    try:
        assert (
            arch.adopt_adapter(backbone, "tests.user_adapter:register_bert_like")
            == "tests.user_adapter:register_bert_like"
        )
        assert get_adapter(backbone) is arch._ADAPTERS["bert-user"]
        assert check_adapter(backbone).prune_heads is not None
    finally:
        arch._ADAPTERS.pop("bert-user", None)


@pytest.mark.parametrize(
    "spec,what", [("no_such_pkg.mod:fn", "cannot be imported"), ("bare", "not 'package")]
)
def test_a_bad_spec_fails_when_the_model_is_built(spec, what):
    started = time.perf_counter()
    with pytest.raises(UnsupportedArchitectureError, match=what):
        PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 2}, adapter=spec)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("backbone,name", [("tiny:bert", "registered"), ("tiny:ernie", "inferred")])
def test_artifacts_record_the_adapter_and_reload_with_it(backbone, name, tmp_path):
    model = PromptTunedModel(backbone=backbone, task="sst2", prompt={"num_tokens": 4})
    assert model.hparams.adapter == name
    check_adapter(model.backbone)
    batch, identity = synthetic_batch(model, 3, 9), model.backbone_identity()
    keep_ffn, keep_heads = (
        [torch.arange(0, 64, 3), torch.zeros(0, dtype=torch.long)],
        [None, torch.tensor([1, 3])],
    )
    prune_ffn(model.backbone, keep_ffn)
    prune_heads(model.backbone, keep_heads)
    want = _logits(model, batch)
    path = save_skeleton(
        model, tmp_path / "sk", keep_ffn=keep_ffn, keep_heads=keep_heads, dense_identity=identity
    )
    assert json.loads((path / "skeleton.json").read_text())["model"]["adapter"] == name
    assert torch.equal(_logits(load_skeleton(path), batch), want)
    export = export_pruned(model, tmp_path / "export")
    assert json.loads((export / "config.json").read_text())["skeleton_adapter"] == name
    assert torch.equal(_logits(load_pruned(export), batch), want)


# ---------------------------------------------------------------------------------------------------------
# fresh processes


def _run(args: list[str], log: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "SKELETON_ADAPTER_LOG": str(log),
        "WANDB_MODE": "offline",
    }
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


_RELOAD = """
import json, sys, torch
from skeleton.bench import synthetic_batch
from skeleton.export import load_model
out = {}
for path in sys.argv[1:]:
    model = load_model(path).eval()
    with torch.no_grad():
        out[path] = model(synthetic_batch(model, 2, 5)).tolist()
print(json.dumps(out))
"""


def test_config_named_adapter_serves_train_bench_predict_and_reload_in_fresh_processes(tmp_path):
    log, run = tmp_path / "adapter.log", tmp_path / "run"
    overrides = [
        "experiment=tiny",
        "model.backbone=tiny:deberta",
        f"model.adapter={SPEC}",
        "skeleton.psi=100",
    ]
    paths = [f"run_dir={run}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    _run(["-m", "skeleton.cli.train", *overrides, *paths, "reuse=false"], log)
    meta = json.loads((run / "skeleton" / "skeleton.json").read_text())
    assert meta["model"]["adapter"] == SPEC and meta["ffn_widths"] != [64, 64]
    assert len(_calls(log)) == 1

    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\na good film\t1\na bad film\t0\n")
    preds = tmp_path / "preds.jsonl"
    _run(
        [
            "-m",
            "skeleton.cli.predict",
            str(run),
            "--input",
            str(tsv),
            "--output",
            str(preds),
            "--device",
            "cpu",
        ],
        log,
    )
    assert len(preds.read_text().splitlines()) == 2

    out = tmp_path / "bench.json"
    args = ["--batch-sizes", "1", "--seq-lens", "8", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
    _run(["-m", "skeleton.cli.bench", str(run), *args, "--output", str(out)], log)
    assert (
        json.loads(out.read_text())["params"]["pruned"]["ffn"]
        < json.loads(out.read_text())["params"]["dense"]["ffn"]
    )

    model = load_model(run)  # in this process: the reference logits, and an export to reload elsewhere
    export = export_pruned(model, tmp_path / "export")
    printed = _run(["-c", _RELOAD, str(run), str(export)], log)
    got = json.loads(printed.strip().splitlines()[-1])
    with torch.no_grad():
        want = model(synthetic_batch(model, 2, 5))
    for path in (str(run), str(export)):
        torch.testing.assert_close(torch.tensor(got[path]), want, atol=1e-5, rtol=1e-5)
    calls = _calls(log)
    assert len(calls) == 4 and len(set(calls)) == 4  # train, predict, bench, reload: each resolved it itself
