"""benchmarks/gpu.py runs end to end at tiny shapes on the CPU, so the GPU run only changes the shapes."""

import json

import pytest
import torch

from benchmarks import gpu
from skeleton.localize import ffn_widths, heads_per_layer
from tests.tiny_models import one_thread  # noqa: F401  (fixture)


def test_smoke_run_writes_every_row_and_the_tables(tmp_path, capsys):
    assert gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = result["rows"]
    grid = gpu.SMOKE_GRID
    assert len(rows) == len(gpu.PRUNINGS) * len(grid["dtypes"]) * 2 * len(grid["batch_sizes"]) * len(
        grid["tokens"]
    )
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16"} and {r["path"] for r in rows} == {
        "eager",
        "sdpa",
    }
    assert {r["tokens"] for r in rows} == set(grid["tokens"])  # prompt + text = what the backbone sees
    for r in rows:
        assert r["dense_ms"] > 0 and r["pruned_ms"] > 0 and r["ideal_speedup"] > 1
    ideal = {r["pruning"]: r["ideal_speedup"] for r in rows if r["tokens"] == 16}
    assert (
        ideal["ffn50"] < ideal["ffn70"] < ideal["ffn70+heads50"] and ideal["ffn50"] < ideal["ffn50+heads25"]
    )
    kept = result["prunings"]
    assert kept["ffn50"]["ffn_widths"] == [128, 128] and kept["ffn70"]["ffn_widths"] == [
        80,
        80,
    ]  # of 256, by 8
    assert kept["ffn50+heads25"]["heads"] == [3, 3] and kept["ffn70+heads50"]["heads"] == [2, 2]  # of 4
    table = (tmp_path / "gpu.md").read_text()
    for dtype in ("float16", "bfloat16"):
        for path in ("eager", "sdpa"):
            assert f"**{dtype}, {path}**: measured / FLOP-ideal speedup" in table
    assert table.count("| ffn70+heads50 | 2 | x") == 4  # one row per dtype and path
    assert "wrote" in capsys.readouterr().out


def test_bert_base_widths_round_to_whole_tiles():
    shape = {**gpu.TINY, "intermediate_size": 3072, "num_attention_heads": 4}
    dense = gpu.dense_model(shape)
    pruned = gpu.pruned_model(dense, 0.7, 0.5, round_to=64)
    assert ffn_widths(pruned.backbone) == [960, 960]  # 30% of 3072 = 921.6, up to 15 tiles of 64
    assert heads_per_layer(pruned.backbone) == [2, 2] and ffn_widths(dense.backbone) == [3072, 3072]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_full_run_is_refused_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--out", "unused"])
    assert exit_.value.code == 2 and "no CUDA device" in capsys.readouterr().err
