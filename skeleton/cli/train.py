"""skeleton-train: compose the Hydra config, run it, record a failure beside the run.

skeleton-train experiment=quickstart
skeleton-train task=rte model=minilm skeleton.psi=2 seed=1
skeleton-train -m task=sst2,rte skeleton.psi=1,2      # a sweep; reruns skip finished runs
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from skeleton import runs
from skeleton.loggers import finish_wandb
from skeleton.train import CONFIG_DIR, run_dir_of, train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the final dev score, for Hydra sweepers that optimise it."""
    run_dir = run_dir_of(cfg)
    try:
        summary = train(cfg)
    except Exception as error:
        finish_wandb(exit_code=1)
        path = runs.record_failure(run_dir, error)
        print(f"run failed; the error is recorded in {path}")
        if not _in_multirun():
            raise
        return None
    if summary is None:  # another process holds the folder; it was skipped, saying so
        return None
    print(f"run folder: {run_dir}")
    print(f"summary:    {run_dir / runs.SUMMARY}")
    return summary.score("pruned" if summary.skeleton is not None else "dense")


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


if __name__ == "__main__":
    main()
