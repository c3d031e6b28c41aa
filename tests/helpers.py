"""Compose the real Hydra configs in tests, with the overrides that make a run tiny and offline."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from skeleton.configs import CONFIG_DIR, FIXTURES_DIR

FIXTURES = Path(FIXTURES_DIR)

TINY = ["experiment=tiny"]  # skeleton/conf/experiment/tiny.yaml: tiny BERT, fixtures, few steps


def compose_config(overrides: list[str] = (), run_dir: Path | None = None, tiny: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*(TINY if tiny else []), *overrides])
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
            cfg.paths.cache_dir = str(run_dir.parent / "cache")
    return cfg
