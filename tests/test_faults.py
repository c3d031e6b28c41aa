"""Faults injected by hand: concurrent runs, edited data, swapped weights, W&B that hangs, kill -9,
corrupt files. Each test asserts the exact outcome: nothing lost, nothing stale, a named error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from skeleton import runs
from skeleton.export import ArtifactError, load_skeleton
from skeleton.loggers import LoggerConfigError
from skeleton.reuse import CacheError
from skeleton.train import train
from tests.helpers import FIXTURES, TINY, compose_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path: Path, name: str, *overrides: str, data: Path | None = None):
    extra = [f"paths.data_dir={data}"] if data is not None else []
    return compose_config(["skeleton.psi=100", *extra, *overrides], run_dir=tmp_path / name)


def flip_labels(tsv: Path) -> None:
    lines = tsv.read_text().splitlines()
    flipped = [lines[0]] + [
        f"{row.rsplit(chr(9), 1)[0]}\t{1 - int(row.rsplit(chr(9), 1)[1])}" for row in lines[1:]
    ]
    tsv.write_text("\n".join(flipped) + "\n")


@pytest.fixture
def data(tmp_path) -> Path:
    """A private copy of the fixtures, to edit in place."""
    target = tmp_path / "data"
    shutil.copytree(FIXTURES, target)
    return target


# ---- concurrent runs ---------------------------------------------------------------------------------
def test_two_runs_started_together_get_their_own_folders(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "skeleton.cli.train",
        *TINY,
        "logger=csv",
        f"paths.output_root={tmp_path}",
    ]
    command += [f"paths.cache_dir={tmp_path / 'cache'}"]
    procs = [
        subprocess.Popen(
            [*command, f"skeleton.psi={psi}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for psi in (1, 100)
    ]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted(p.parent for p in tmp_path.glob("runs/*/*/*/summary.json"))
    assert len(folders) == 2, outputs
    assert sorted(runs.read_summary(f).skeleton.psi for f in folders) == [1, 100]


def test_a_run_folder_held_by_another_process_is_skipped_not_shared(tmp_path, capsys):
    cfg = tiny_run(tmp_path, "run")
    with runs.run_lock(tmp_path / "run"):
        assert train(cfg) is None
    assert "is in use by pid" in capsys.readouterr().out
    assert not (tmp_path / "run" / runs.SUMMARY).exists()


# ---- nothing stale ------------------------------------------------------------------------------------
def test_edited_data_is_not_served_from_the_prompt_cache(tmp_path, data):
    first = train(tiny_run(tmp_path, "a", data=data))
    assert "reused_prompt" not in first.train
    again = train(tiny_run(tmp_path, "b", data=data))
    assert again.train.get("reused_prompt")  # same data: reused
    flip_labels(data / "glue" / "SST-2" / "train.tsv")
    edited = train(tiny_run(tmp_path, "c", data=data))
    assert "reused_prompt" not in edited.train
    assert edited.fingerprints["data"] != first.fingerprints["data"]


def test_a_moved_data_folder_or_cache_still_hits(tmp_path, data):
    train(tiny_run(tmp_path, "a", data=data))
    moved = tmp_path / "moved-data"
    shutil.move(data, moved)
    shutil.move(tmp_path / "cache", tmp_path / "moved-cache")
    cfg = tiny_run(tmp_path, "b", data=moved)
    cfg.paths.cache_dir = str(tmp_path / "moved-cache")
    assert train(cfg).train.get("reused_prompt")


def test_swapped_backbone_weights_are_not_served_from_the_prompt_cache(tmp_path):
    from skeleton.backbones import load_backbone, load_tokenizer

    folder = tmp_path / "backbone"
    load_backbone("tiny:bert", seed=0).save_pretrained(folder)
    load_tokenizer("tiny:bert").save_pretrained(folder)  # a local folder carries its tokenizer
    overrides = ["model=local", f"model.backbone={folder}", "model.name=local-bert"]
    first = train(tiny_run(tmp_path, "a", *overrides))
    load_backbone("tiny:bert", seed=1).save_pretrained(folder)  # same shapes, other weights
    second = train(tiny_run(tmp_path, "b", *overrides))
    assert "reused_prompt" not in second.train and "reused_prompt" not in first.train
    assert second.fingerprints["backbone"] != first.fingerprints["backbone"]


def test_a_finished_run_with_other_data_is_rerun_and_its_old_summary_kept(tmp_path, data, capsys):
    cfg = tiny_run(tmp_path, "run", data=data)
    first = train(cfg)
    flip_labels(data / "glue" / "SST-2" / "train.tsv")
    second = train(tiny_run(tmp_path, "run", data=data))
    assert "another data" in capsys.readouterr().out
    assert second.fingerprints["data"] != first.fingerprints["data"]
    (kept,) = (tmp_path / "run").glob("summary.replaced-*.json")
    assert json.loads(kept.read_text())["fingerprints"] == first.fingerprints  # nothing lost


# ---- logging never loses a result -----------------------------------------------------------------------
@pytest.fixture
def silent_server():
    """A W&B stand-in that accepts connections and never answers: a network that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=2)
    for conn in held:
        conn.close()
    server.close()


def test_a_hanging_wandb_falls_back_to_offline_before_training(tmp_path, monkeypatch, silent_server, capsys):
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    started = time.perf_counter()
    summary = train(tiny_run(tmp_path, "run", "logger=wandb", "logger.wandb.init_timeout=3"))
    assert summary.complete and (tmp_path / "run" / runs.SUMMARY).exists()
    assert list((tmp_path / "run").glob("wandb/offline-run-*"))
    assert "wandb sync" in capsys.readouterr().out
    assert time.perf_counter() - started < 300


def test_online_wandb_without_credentials_fails_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr("lightning.Trainer.fit", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(LoggerConfigError, match=r"WANDB_MODE=online but no W&B credentials.*WANDB_API_KEY"):
        train(tiny_run(tmp_path, "run", "logger=wandb"))


def test_a_wandb_upload_that_fails_after_training_loses_nothing(tmp_path, monkeypatch, capsys):
    import skeleton.loggers

    def refuse(*args, **kwargs):
        raise RuntimeError("upload refused")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(skeleton.loggers, "log_to_wandb", refuse)
    summary = train(tiny_run(tmp_path, "run", "logger=wandb"))
    assert runs.is_complete(tmp_path / "run") and Path(summary.skeleton.artifact).is_dir()
    assert "upload refused" in capsys.readouterr().out


# ---- kill -9 ------------------------------------------------------------------------------------------
def test_kill_9_mid_run_leaves_no_complete_summary_and_a_rerun_finishes(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "skeleton.cli.train", *TINY, f"run_dir={run_dir}", "logger=csv"]
    command += [f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=400", "trainer.max_epochs=400"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not runs.is_complete(run_dir)
    summary = train(compose_config(["skeleton.psi=100"], run_dir=run_dir))  # the lock died with it
    assert summary.complete and runs.is_complete(run_dir)


KILLED_WRITER = """
import sys, time
from skeleton import runs
class Slow:
    def tolist(self):
        time.sleep(60)
runs.write_json_atomic(sys.argv[1], {"status": "complete", "big": ["x" * 1000] * 1000, "slow": Slow()})
"""


def test_kill_9_mid_write_keeps_the_previous_summary_whole(tmp_path):
    path = tmp_path / runs.SUMMARY
    runs.write_json_atomic(path, {"status": "complete", "version": "previous"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], env=env)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".summary.json.*.tmp")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(path.read_text()) == {"status": "complete", "version": "previous"}


# ---- corrupt files ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    train(compose_config(["skeleton.psi=100"], run_dir=tmp / "run"))
    return tmp


@pytest.mark.parametrize(("name", "keep"), [("skeleton.safetensors", 100), ("skeleton.json", 40)])
def test_a_truncated_artifact_file_is_named_with_the_fix(finished, tmp_path, name, keep):
    artifact = tmp_path / "skeleton"
    shutil.copytree(finished / "run" / "skeleton", artifact)
    target = artifact / name
    target.write_bytes(target.read_bytes()[:keep])
    with pytest.raises(
        ArtifactError, match=rf"{target} is unreadable.*truncated or corrupt.*re-export the skeleton"
    ):
        load_skeleton(artifact)


@pytest.mark.parametrize("entry", ["skeleton.safetensors", "scores"])
def test_a_corrupt_cache_entry_is_named_with_the_entry_to_delete(finished, tmp_path, entry):
    cache = tmp_path / "cache"
    shutil.copytree(finished / "cache", cache)
    (folder,) = cache.glob("prompts-v*/*/")
    target = folder / entry if entry != "scores" else next(folder.glob("scores-*.safetensors"))
    target.write_bytes(b"\x00" * 12)
    cfg = compose_config(["skeleton.psi=50"], run_dir=tmp_path / "run")
    cfg.paths.cache_dir = str(cache)
    with pytest.raises(CacheError, match=rf"delete {folder.as_posix().rstrip('/')}.*reuse=false"):
        train(cfg)


def test_an_empty_dev_file_fails_before_training(tmp_path, data, monkeypatch):
    (data / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n")
    monkeypatch.setattr("lightning.Trainer.fit", lambda *a, **k: pytest.fail("trained first"))
    with pytest.raises(Exception, match=r"dev\.tsv"):
        train(tiny_run(tmp_path, "run", data=data))


def test_checks_that_fail_are_recorded_beside_the_run(tmp_path):
    """A failed run writes error.json, so a sweep's report finds it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "skeleton.cli.train", *TINY, f"run_dir={run_dir}", "skeleton.attribution.criterion=foo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "criterion='foo' is unknown" in done.stderr + done.stdout
    assert "criterion='foo'" in json.loads((run_dir / runs.ERROR).read_text())["message"]


def test_an_unknown_wandb_mode_is_named_before_anything_runs():
    from skeleton.loggers import wandb_mode

    with pytest.raises(
        LoggerConfigError, match=r"logger\.wandb\.mode='onlin' is unknown; choose one of: auto, online"
    ):
        wandb_mode("onlin")


def test_a_missing_artifact_tensor_file_is_named_with_the_fix(finished, tmp_path):
    artifact = tmp_path / "skeleton"
    shutil.copytree(finished / "run" / "skeleton", artifact)
    (artifact / "skeleton.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"skeleton\.safetensors is missing.*re-export the skeleton"):
        load_skeleton(artifact)


def test_head_pruning_on_scores_without_heads_names_the_fix():
    """Scores handed to the pipeline (a cache, a notebook) may lack heads even when the config asks."""
    from skeleton.localize import Scores
    from skeleton.localize.config import SkeletonConfig
    from skeleton.pipeline import heads_to_keep

    cfg = SkeletonConfig.from_dict(
        {"attribution": {"heads": True}, "pruning": {"units": "ffn", "head_rate": 0.25}}
    )
    scores = Scores(ffn=[torch.rand(8)], heads=None, num_instances=1, meta={})
    with pytest.raises(ValueError, match=r"needs head scores: set skeleton\.attribution\.heads=true"):
        heads_to_keep(scores, cfg)
