"""Latency is measured interleaved with sane statistics; benchmark rows carry the FLOP-ideal speedup."""

import json

import pytest
import torch
from torch import nn

from skeleton.bench import benchmark, load_pair, measure_latency, synthetic_batch
from skeleton.cli.bench import main
from skeleton.export import export_pruned, save_skeleton
from skeleton.localize import ffn_widths, prune_ffn
from skeleton.prompt import PromptTunedModel

KEEP = [torch.arange(16), torch.arange(0, 64, 4)]


class Counting(nn.Module):
    """Records the order in which the wrapped models are called."""

    def __init__(self, name: str, model: nn.Module, calls: list):
        super().__init__()
        self.name, self.model, self.calls = name, model, calls

    def forward(self, batch):
        self.calls.append(self.name)
        return self.model(batch)


def _pair():
    dense = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 4})
    pruned = PromptTunedModel(backbone="tiny:bert", task="sst2", prompt={"num_tokens": 4})
    identity = pruned.backbone_identity()
    prune_ffn(pruned.backbone, KEEP)
    return dense, pruned, identity


def test_measure_latency_interleaves_and_reports_positive_medians():
    dense, pruned, _ = _pair()
    calls = []
    models = {"dense": Counting("dense", dense, calls), "pruned": Counting("pruned", pruned, calls)}
    batch = synthetic_batch(dense, 4, 8)
    timings = measure_latency(models, batch, repeats=5, warmup=2)
    assert calls == ["dense", "pruned"] * 7
    for t in timings.values():
        assert t["median_ms"] > 0 and t["p90_ms"] >= t["median_ms"] and t["throughput"] > 0
        assert t["batch_size"] == 4 and t["repeats"] == 5
    assert models["dense"].training and models["pruned"].training  # modes given back


def test_synthetic_batch_is_a_full_single_choice_batch():
    dense, _, _ = _pair()
    batch = synthetic_batch(dense, 3, 11)
    assert batch["input_ids"].shape == (3, 11) and batch["attention_mask"].all() and batch["num_choices"] == 1
    assert dense.eval()(batch).shape == (3, 2)


def test_benchmark_rows_show_ideal_speedup_and_layer_params():
    dense, pruned, _ = _pair()
    rows = benchmark(dense, pruned, batch_sizes=(1, 2), seq_lens=(8,), devices=("cpu",), repeats=2, warmup=0,
                     show=False)  # fmt: skip
    assert len(rows) == 2
    for row in rows:
        assert row["ideal_speedup"] > 1 and row["speedup"] > 0 and row["dense_ms"] > 0
        assert row["pruned_layer_params"] < row["dense_layer_params"]
        assert (
            row["dense_params"] - row["pruned_params"]
            == row["dense_layer_params"] - row["pruned_layer_params"]
        )


def test_cli_on_skeleton_and_dense_twin_of_an_export(tmp_path, capsys):
    _, pruned, identity = _pair()
    path = save_skeleton(pruned, tmp_path / "sk", keep_ffn=KEEP, dense_identity=identity)
    out = tmp_path / "bench.json"
    argv = [str(path), "--batch-sizes", "1", "--seq-lens", "8", "--repeats", "2", "--device", "cpu"]
    assert main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 1 and result["rows"][0]["ideal_speedup"] > 1
    assert "ideal" in capsys.readouterr().out

    dense, again = load_pair(export_pruned(pruned, tmp_path / "export"))
    assert ffn_widths(dense.backbone) == [64, 64] and ffn_widths(again.backbone) == [16, 16]


def test_other_processes_cpu_share_leaves_out_this_process_own_threads(monkeypatch):
    """A lone run that keeps every core busy itself reads as idle; CPU time used elsewhere counts."""
    from skeleton import timing

    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    samples = iter([(10.0, 2.0, 0.0), (14.0, 6.0, 2.0)])  # all 4 busy CPU-seconds were this process's
    monkeypatch.setattr(timing, "_cpu_sample", lambda: next(samples))
    with timing.OtherLoad() as alone:
        pass
    assert alone.value == 0.0
    samples = iter([(10.0, 2.0, 0.0), (13.0, 3.0, 1.0)])  # 2 of the 3 busy CPU-seconds were elsewhere
    monkeypatch.setattr(timing, "_cpu_sample", lambda: next(samples))
    with timing.OtherLoad() as shared:
        pass
    assert shared.value == pytest.approx(1.0)
    monkeypatch.setattr(timing, "_cpu_sample", lambda: None)  # no /proc/stat: unknown, not idle
    with timing.OtherLoad() as unknown:
        pass
    assert unknown.value is None


def test_a_timing_is_distrusted_on_others_share_where_known_else_on_the_load_average():
    from skeleton.timing import shared_cpu

    assert not shared_cpu(0.05, 1.9)  # the load average counts this run's own threads: not shared
    assert shared_cpu(0.6, 0.1)
    assert shared_cpu(None, 1.5) and not shared_cpu(None, 0.5) and not shared_cpu(None, None)


def test_the_cpu_sampler_reads_this_machine():
    import sys

    from skeleton import timing

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/stat is Linux's")
    with timing.OtherLoad() as load:
        sum(i * i for i in range(200_000))
    assert load.value is not None and 0.0 <= load.value <= 1.0
