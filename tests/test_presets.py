"""Stock configs never crash or lose a run: every sweep's first job composes and validates, and the
cheap presets (callbacks x loggers, a run shorter than one validation interval, a sweep's first job
on the tiny model) run end to end."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from skeleton import runs
from skeleton.configs import CONFIG_DIR, options
from skeleton.loggers import build_loggers
from skeleton.progress import StepsRichProgressBar
from skeleton.summary import COMPLETE
from skeleton.train import CHECKPOINTS, skeleton_config, train
from tests.helpers import compose_config

SWEEPS = options("sweeps")
# What makes a preset tiny: the tiny model on the bundled samples, a few steps.
ON_TINY = ["model=tiny-bert", "paths.data_dir=${skeleton_fixtures:}", "trainer.max_steps=2"]


def first_job(sweep: str) -> list[str]:
    """The overrides of a sweep's first job: the first value of each swept parameter."""
    raw = yaml.safe_load((Path(CONFIG_DIR) / "sweeps" / f"{sweep}.yaml").read_text())
    params = raw["hydra"]["sweeper"]["params"]
    return [f"{key}={str(value).split(',')[0]}" for key, value in params.items()]


def test_every_hydra_sweep_is_listed():
    assert {"quick", "main", "claims"} <= set(SWEEPS) and "wandb_main" not in SWEEPS


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_first_job_composes_and_validates(sweep):
    job = first_job(sweep)
    cfg = compose_config([f"+sweeps={sweep}", *job], tiny=False)
    for override in job:
        key, value = override.split("=", 1)
        chosen = OmegaConf.select(cfg, key)
        assert str(chosen.name if key == "task" else chosen) == value, override  # task is a config group
    assert cfg.sweep_name == sweep
    skeleton_config(cfg)


def _run(tmp_path, overrides):
    run_dir = tmp_path / "run"
    summary = train(compose_config(overrides, run_dir=run_dir))
    assert runs.read_summary(run_dir).status == COMPLETE
    return run_dir, summary


@pytest.mark.parametrize("logger", ["none", "wandb"])
def test_default_callbacks_run_with_any_logger_and_keep_checkpoints_apart(logger, tmp_path, monkeypatch):
    """LearningRateMonitor raises without a logger; W&B's project folder used to receive best.ckpt."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, _ = _run(tmp_path, ["callbacks=default", f"logger={logger}", "trainer.max_steps=4"])
    assert [p.relative_to(run_dir).parts[0] for p in run_dir.rglob("*.ckpt")] == [CHECKPOINTS]
    assert sorted(p.name for p in (run_dir / "skeleton").iterdir()) == [
        "skeleton.json",
        "skeleton.safetensors",
    ]


def test_a_run_shorter_than_one_validation_interval_completes(tmp_path):
    """One step of a longer epoch: no validation ran, so EarlyStopping has nothing to check."""
    _, summary = _run(tmp_path, ["callbacks=default", "logger=csv", "trainer.max_steps=1"])
    assert summary.train["steps"] == 1 and summary.dense.dev


def test_a_sweep_first_job_runs_on_the_tiny_model(tmp_path):
    _, summary = _run(tmp_path, ["+sweeps=quick", *first_job("quick"), *ON_TINY])
    assert (summary.task, summary.sweep, summary.model) == ("sst2", "quick", "tiny-bert")


def test_a_run_is_quiet_and_reports_progress_with_an_eta(tmp_path, caplog):
    """No Lightning tips, no default-valued flags said back; the pipeline's warnings at WARNING level
    (a tiny run is degenerate: it answers every example alike) and its progress lines with an ETA."""
    with caplog.at_level(logging.INFO):
        _run(tmp_path, ["callbacks=default", "logger=csv"])
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "💡 Tip" in m or "was configured so" in m]
    warned = [r for r in caplog.records if "same answer" in r.getMessage()]
    assert warned and all(
        r.levelno == logging.WARNING and not r.getMessage().startswith("WARNING") for r in warned
    )
    rounds = [m for m in messages if "attribution re-scored" in m]
    rates = [m for m in messages if m.lstrip().startswith("rate ")]
    assert rounds and rates and all(", eta " in m for m in rounds + rates)


def test_wandb_gets_no_anonymous_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (logger, _) = build_loggers(compose_config(["logger=wandb"]), tmp_path)
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "skeleton"


@pytest.mark.parametrize(("max_steps", "done", "shown"), [(600, 0, 600), (600, 590, 10), (-1, 0, 2073)])
def test_the_rich_bar_counts_the_steps_a_run_will_take(max_steps, done, shown):
    bar = StepsRichProgressBar()
    bar._trainer = SimpleNamespace(
        num_training_batches=2073,
        max_steps=max_steps,
        max_epochs=3,
        global_step=done,
        accumulate_grad_batches=1,
    )
    assert bar.total_train_batches == shown


def test_two_runs_in_one_process_get_two_wandb_runs(tmp_path, monkeypatch):
    """A sweep's jobs run in one process (Hydra's basic launcher): each must log into its own W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("first", "second"):
        train(compose_config(["logger=wandb", "skeleton=off"], run_dir=tmp_path / name))
    assert [len(list((tmp_path / name).glob("wandb/offline-run-*"))) for name in ("first", "second")] == [
        1,
        1,
    ]
