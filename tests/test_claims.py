"""benchmarks/claims.py end to end on a tiny finished run: table, JSON, plot."""

import json

from benchmarks import claims
from skeleton.train import train
from tests.helpers import compose_config


def test_claims_report_on_a_tiny_run(tmp_path):
    run = tmp_path / "run"
    summary = train(compose_config(["skeleton.psi=100", "skeleton.recovery.steps=2"], run_dir=run))
    out = tmp_path / "claims"
    claims.main([str(run), "--out", str(out), "--repeats", "1"])
    table = (out / "claims.md").read_text()
    assert "| sst2 | 100 |" in table and "(2 steps)" in table
    report = json.loads((out / "claims.json").read_text())
    row = report["rows"][0]
    assert row["dense_dev"] == 100 * summary["dense"]["dev"]["accuracy"]
    assert row["drop"] == 100 * (
        summary["dense"]["dev"]["accuracy"] - summary["recovered"]["dev"]["accuracy"]
    )
    assert 0 <= row["noise"]["disagree"] <= 1 and row["noise"]["se_points"] >= 0
    curves = report["curves"]["sst2"]
    assert set(curves) == set(claims.CRITERIA)
    for points in curves.values():
        assert [p[0] for p in points] == list(claims.RATES)
        assert points[0][1] == summary["dense"]["dev"]["accuracy"]  # rate 0 is the dense model
    assert (out / "curves.png").stat().st_size > 0
