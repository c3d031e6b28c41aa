"""The commands' own behaviour: skeleton-train's help before any heavy import, a config folder of the
user's own, and a missing extra named instead of an ImportError."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skeleton import extras
from skeleton.cli import tables as tables_cli
from skeleton.cli.train import usage
from skeleton.configs import groups, options

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_group_and_option():
    text = usage()
    assert "sweeps" in groups() and "hydra" not in groups()
    for group in groups():
        assert f"  {group} " in text
        assert all(option in text for option in options(group))
    assert "wandb_main" not in text  # a W&B sweep file, not a Hydra config
    assert "--hydra-help" in text and "--config-dir" in text


def test_help_returns_before_torch_lightning_or_hydra_are_imported(tmp_path):
    code = (
        "import sys; sys.argv = ['skeleton-train', '--help']\n"
        "from skeleton.cli.train import main; main()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'hydra', 'transformers'})\n"
        "print('heavy:', heavy)"
    )
    done = _python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "config groups" in done.stdout and done.stdout.strip().endswith("heavy: []")


def test_a_config_dir_of_ones_own_adds_options(tmp_path):
    (tmp_path / "mine" / "task").mkdir(parents=True)
    (tmp_path / "mine" / "task" / "mytask.yaml").write_text("name: rte\nbatch_size: 7\nmax_epochs: 2\n")
    code = "import sys; sys.argv = ['skeleton-train', *sys.argv[1:]]\nfrom skeleton.cli.train import main; main()"
    done = _python(code, "--config-dir", str(tmp_path / "mine"), "task=mytask", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "batch_size: 7" in done.stdout and "name: rte" in done.stdout


def _without(monkeypatch, *missing: str):
    real = extras.installed
    monkeypatch.setattr(extras, "installed", lambda module: module not in missing and real(module))


def test_a_launcher_without_its_plugin_names_the_extra(monkeypatch):
    _without(monkeypatch, "hydra_plugins.hydra_joblib_launcher")
    with pytest.raises(extras.MissingExtraError, match=r"pip install 'skeleton\[launchers\]'"):
        extras.check_launcher(["+sweeps=quick", "+launcher=parallel"])
    extras.check_launcher(["+launcher=local", "task=rte"])  # the basic launcher needs nothing


def test_tables_without_pandas_names_the_analysis_extra(monkeypatch, tmp_path, capsys):
    _without(monkeypatch, "pandas")
    with pytest.raises(SystemExit) as exit_:
        tables_cli.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert "pip install 'skeleton[analysis]'" in capsys.readouterr().err
