"""Compose the real Hydra configs in tests, with the overrides that make a run tiny and offline."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from skeleton.train import CONFIG_DIR

FIXTURES = Path(__file__).resolve().parent / "fixtures"

TINY = [
    "model=tiny-bert",
    f"paths.data_dir={FIXTURES}",
    "logger=csv",
    "callbacks=minimal",
    "trainer.max_steps=4",
    "trainer.max_epochs=10",
    "trainer.val_check_interval=1.0",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "data.search_size=3",
    "prompt.num_tokens=3",
    "skeleton.attribution.max_instances=8",
    "skeleton.search.granularity=0.25",
    "skeleton.benchmark.repeats=2",
    "skeleton.benchmark.batch_size=4",
]


def compose_config(overrides: list[str] = (), run_dir: Path | None = None, tiny: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*(TINY if tiny else []), *overrides])
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
            cfg.paths.cache_dir = str(run_dir.parent / "cache")
    return cfg
