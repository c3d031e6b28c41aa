"""Where the package's Hydra configs and demo fixtures live, and the resolvers the configs use.

Torch- and Lightning-free, so ``skeleton-train --help`` can list the config groups in a blink. The
configs are package data: a wheel installed anywhere composes the same configs as a checkout.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from skeleton import runs

PACKAGE = Path(__file__).resolve().parent
CONFIG_DIR = str(PACKAGE / "conf")
# Small official-format GLUE/SuperGLUE samples: `experiment=tiny` runs on them from any folder.
FIXTURES_DIR = str(PACKAGE / "fixtures")
# W&B sweep files (`wandb sweep ...`) sit beside the Hydra sweeps but are not Hydra configs.
NOT_HYDRA = {("sweeps", "wandb_main")}


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("skeleton_fixtures", lambda: FIXTURES_DIR, replace=True)
    OmegaConf.register_new_resolver("short_dirname", runs.short_dirname, replace=True)
    OmegaConf.register_new_resolver("unique_suffix", runs.unique_suffix, replace=True)
    OmegaConf.register_new_resolver("backbone_name", _backbone_name, replace=True)


def _backbone_name(name_or_path: str) -> str:
    from skeleton.backbones import name_of  # torch and transformers: only once a config resolves it

    return name_of(name_or_path)


def groups() -> list[str]:
    """The config groups (folders of ``skeleton/conf/``), ``hydra`` excluded."""
    return sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str, hydra_only: bool = True) -> list[str]:
    """The options of one config group, e.g. ``options("task") == ["boolq", "cb", ...]``."""
    names = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    return [n for n in names if not (hydra_only and (group, n) in NOT_HYDRA)]


register_resolvers()
