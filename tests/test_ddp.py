"""Under DDP the Skeleton callback reaches one pruning decision on every rank.

tests/ddp_worker.py runs a 2-process CPU DDP fit (gloo, Lightning's subprocess launcher) with the callback
and has each rank write its pruned module, its scores and what it would have scored alone. The run takes
about 20 s; it happens once per module and every test below reads its files.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from skeleton.localize import Scores, select_neurons

ROOT = Path(__file__).resolve().parents[1]
RANKS = (0, 1)
TIMEOUT_S = 180  # the run takes ~20 s; a hang (one rank died, the other waits in a collective) fails here

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)


def _run_worker(out: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)  # a fresh process group: Lightning picks a free port
    # A session of its own, so a timeout ends rank 0 and the rank 1 it launched together.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ddp_worker", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the DDP run did not finish in {TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"the DDP run failed (exit {proc.returncode}):\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ddp")
    output = _run_worker(out)
    found = {}
    for r in RANKS:
        files = out / f"rank{r}.safetensors", out / f"rank{r}.json"
        assert all(f.exists() for f in files), f"rank {r} wrote no results:\n{output[-4000:]}"
        tensors = load_file(str(files[0]))
        found[r] = {
            "report": json.loads(files[1].read_text()),
            "model": {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")},
            "scores": _scores(tensors, "scores."),
            "local": _scores(tensors, "local."),
            "first": _scores(tensors, "first."),
        }
    return found


def _scores(tensors: dict, prefix: str) -> Scores:
    return Scores.from_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def test_the_run_is_really_distributed_over_different_attribution_batches(ranks):
    for r in RANKS:
        report = ranks[r]["report"]
        assert report["rank"] == r and report["world_size"] == 2
        assert report["global_step"] == 2
    # rank r scores batches r, r + 2, ...: disjoint shards that together cover the sample (2+2+1 rows)
    sizes = ranks[0]["report"]["attribution_batch_sizes"]
    assert len(sizes) >= 2, "with one batch rank 1 would score nothing and the reduction would not matter"
    assert sum(sizes) == ranks[0]["report"]["attribution_size"] == 5
    assert [ranks[r]["report"]["local_num_instances"] for r in RANKS] == [sum(sizes[r::2]) for r in RANKS]


def test_both_ranks_prune_the_same_neurons(ranks):
    a, b = ranks[0]["report"], ranks[1]["report"]
    assert a["rate"] == b["rate"] > 0
    assert a["widths_before"] == b["widths_before"]
    assert a["widths_after"] == b["widths_after"]
    assert sum(a["widths_after"]) < sum(a["widths_before"])
    assert a["keep_ffn"] == b["keep_ffn"]


def test_pruned_weights_are_bit_identical_across_ranks(ranks):
    m0, m1 = ranks[0]["model"], ranks[1]["model"]
    assert m0.keys() == m1.keys()
    assert any(k.startswith("backbone.") for k in m0), "the backbone is missing from the saved state"
    widths = ranks[0]["report"]["widths_after"]
    for i, width in enumerate(widths):  # the backbone really is pruned (tiny BERT: intermediate -> output)
        assert m0[f"backbone.encoder.layer.{i}.intermediate.dense.weight"].shape[0] == width
        assert m0[f"backbone.encoder.layer.{i}.output.dense.weight"].shape[1] == width
    different = [k for k in m0 if m0[k].dtype != m1[k].dtype or not torch.equal(m0[k], m1[k])]
    assert not different, f"ranks differ in {different[:5]}"


def test_attribution_sums_are_reduced_across_ranks(ranks):
    s0, s1 = ranks[0]["scores"], ranks[1]["scores"]
    assert s0.num_instances == s1.num_instances == ranks[0]["report"]["attribution_size"]
    for x, y in zip(s0.ffn, s1.ffn):
        assert torch.equal(x, y), "ranks pruned by different scores"

    # every pass of the iterative scoring is reduced; the first (unmasked) one is the mean over both
    # shards' rows: sums added, then divided by the total count
    assert ranks[0]["report"]["passes"] == ranks[1]["report"]["passes"] > 1
    l0, l1 = ranks[0]["local"], ranks[1]["local"]
    n0, n1 = l0.num_instances, l1.num_instances
    for reduced, x, y in zip(ranks[0]["first"].ffn, l0.ffn, l1.ffn):
        expected = (x.double() * n0 + y.double() * n1) / (n0 + n1)
        torch.testing.assert_close(reduced.double(), expected, rtol=1e-5, atol=1e-9)


def test_without_the_reduction_the_ranks_would_disagree(ranks):
    rate = ranks[0]["report"]["rate"]
    for r in RANKS:
        local, reduced = ranks[r]["local"], ranks[r]["first"]
        assert not all(torch.allclose(x, y) for x, y in zip(local.ffn, reduced.ffn))
        alone = [sorted(k.tolist()) for k in select_neurons(local, rate)]
        together = [sorted(k.tolist()) for k in select_neurons(reduced, rate)]
        assert alone != together, f"rank {r} alone would rank the same neurons: the reduction is untested"
    assert not all(torch.allclose(x, y) for x, y in zip(ranks[0]["local"].ffn, ranks[1]["local"].ffn))


def test_search_evaluates_the_whole_split_on_every_rank(ranks):
    # the callback builds its own loaders; Lightning never sees them, so no DistributedSampler is injected
    for r in RANKS:
        report = ranks[r]["report"]
        assert report["search_sampler"] == "SequentialSampler"
        assert report["search_size"] == report["search_split_size"] == 3
    a, b = ranks[0]["report"], ranks[1]["report"]
    assert a["curve"] == b["curve"]
    assert a["dense"] == b["dense"] and a["pruned"] == b["pruned"]
