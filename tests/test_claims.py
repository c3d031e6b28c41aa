"""benchmarks/claims.py end to end on a tiny finished run: table, JSON, plot."""

import json

import pytest
import torch

from benchmarks import claims
from skeleton.train import train
from tests.helpers import compose_config


def test_claims_report_on_a_tiny_run(tmp_path):
    run = tmp_path / "run"
    cfg = compose_config(
        ["skeleton.psi=100", "skeleton.recovery.steps=3", "skeleton.recovery.lr=0.1"], run_dir=run
    )
    summary = train(cfg)
    out = tmp_path / "claims"
    claims.main([str(run), "--out", str(out), "--repeats", "1"])
    table = (out / "claims.md").read_text()
    assert "| sst2 | 100 |" in table and "(3 steps)" in table
    report = json.loads((out / "claims.json").read_text())
    row = report["rows"][0]
    assert row["dense_dev"] == 100 * summary.score("dense")
    assert row["drop"] == 100 * (summary.score("dense") - summary.score("recovered"))
    assert row["noise"] == pytest.approx(expected_noise(run), rel=1e-6)
    curves = report["curves"]["sst2"]
    assert set(curves) == set(claims.CRITERIA)
    for points in curves.values():
        assert [p[0] for p in points] == list(claims.RATES)
        assert points[0][1] == summary.score("dense")  # rate 0 is the dense model
    assert (out / "curves.png").stat().st_size > 0


def expected_noise(run) -> dict:
    """The paired noise of the drop, computed here independently from each example's correctness."""
    from skeleton.evaluate import evaluate
    from skeleton.export import load_skeleton

    datamodule, cfg = claims.datamodule_of(run)
    dev = datamodule.dev_dataloader()
    labels = torch.cat([b["labels"] for b in dev])
    correct = []
    for model in (claims.dense_model(run, cfg), load_skeleton(run / "skeleton")):
        logits: list = []
        evaluate(model, dev, logits)
        correct.append((torch.cat(logits).argmax(-1) == labels).float())
    diff = correct[1] - correct[0]
    n = len(diff)
    return {
        "examples": n,
        "disagree": float((diff != 0).sum()) / n,
        "se_points": 100 * float(diff.std()) / n**0.5,
    }


def test_curves_start_from_the_prompt_before_recovery(tmp_path):
    """The artifact holds the recovered prompt; the dense reference is the converged one (prompt cache)."""
    from omegaconf import OmegaConf

    from skeleton.export import build_dense

    run = tmp_path / "run"
    train(
        compose_config(
            ["skeleton.psi=100", "skeleton.recovery.steps=3", "skeleton.recovery.lr=0.1"], run_dir=run
        )
    )
    cfg = OmegaConf.load(run / "config.yaml")
    before, after = claims.dense_model(run, cfg), build_dense(run / "skeleton")
    prompt = [n for n, _ in before.named_parameters() if n.startswith("prompt.")]
    assert prompt
    state_before, state_after = before.state_dict(), after.state_dict()
    assert all(not torch.equal(state_before[n], state_after[n]) for n in prompt)
    for name, value in state_before.items():
        if name.startswith("backbone."):
            assert torch.equal(value, state_after[name])  # the same dense backbone


def test_runs_without_their_dense_prompt_are_refused(tmp_path):
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    train(compose_config(["skeleton.psi=100", "skeleton.recovery.steps=2"], run_dir=run))
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.paths.cache_dir = str(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="not in the prompt cache"):
        claims.dense_model(run, cfg)
