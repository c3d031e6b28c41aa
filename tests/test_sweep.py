"""A real Hydra multirun (2 tasks x 2 margins, tiny model), the tables command on it, and resume."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def run_sweep(output_root: Path, *grid: str, expect: int = 0, name: str = "tiny") -> str:
    command = [
        sys.executable,
        "-m",
        "skeleton.cli.train",
        "-m",
        *(grid or ("task=sst2,rte", "skeleton.psi=1,100")),
        f"sweep_name={name}",
        f"paths.output_root={output_root}",
        f"paths.cache_dir={output_root / 'cache'}",
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return root / "multirun" / "tiny", run_sweep(root)


def summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}


def test_multirun_writes_one_complete_summary_per_run(sweep):
    sweep_dir, _ = sweep
    found = summaries(sweep_dir)
    assert sorted(found) == sorted(
        f"experiment=tiny,skeleton.psi={psi},task={task}" for task in ("rte", "sst2") for psi in (1, 100)
    )
    assert all(s["status"] == "complete" and "rate" in s for s in found.values())
    # psi varies fastest: the second margin of each task reuses the first one's prompt
    assert sum("reused_prompt" in s["train"] for s in found.values()) == 2


def test_tables_numbers_equal_the_run_summaries(sweep, tmp_path):
    sweep_dir, _ = sweep
    out = tmp_path / "tables"
    done = subprocess.run(
        [sys.executable, "-m", "skeleton.cli.tables", str(sweep_dir), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} >= {"table.md", "table.tex", "table.csv", "runs.csv", "plots"}
    rows = {(r["task"], float(r["psi"])): r for r in csv.DictReader((out / "table.csv").open())}
    for s in summaries(sweep_dir).values():
        row = rows[(s["task"], float(s["psi"]))]
        headline = s["headline_metric"]
        assert float(row["dense_dev"]) == pytest.approx(100 * s["dense"]["dev"][headline], abs=1e-6)
        assert float(row["pruned_dev"]) == pytest.approx(100 * s["pruned"]["dev"][headline], abs=1e-6)
        assert float(row["rate"]) == pytest.approx(100 * s["rate"], abs=1e-6)
        assert float(row["speedup"]) == pytest.approx(s["speedup"], rel=1e-6)
    assert list((out / "plots").glob("*.png"))


def test_rerun_redoes_only_the_run_without_summary(sweep):
    sweep_dir, _ = sweep
    before = summaries(sweep_dir)
    victim = "experiment=tiny,skeleton.psi=1,task=rte"
    (sweep_dir / victim / "summary.json").unlink()
    log = run_sweep(sweep_dir.parent.parent)
    assert log.count("skipping:") == 3
    assert f"sweep {sweep_dir}: 1 completed, 3 skipped, 0 failed" in log
    after = summaries(sweep_dir)
    assert sorted(after) == sorted(before)
    for name in before:
        if name != victim:
            assert after[name] == before[name]


def test_a_sweep_with_a_failed_run_says_so_and_exits_nonzero(tmp_path):
    log = run_sweep(
        tmp_path, "task=sst2", "skeleton.attribution.criterion=attribution,foo", expect=1, name="bad"
    )
    sweep_dir = tmp_path / "multirun" / "bad"
    assert f"sweep {sweep_dir}: 1 completed, 0 skipped, 1 failed" in log
    assert "failed: " in log and "criterion=foo" in log
