"""skeleton-train: compose the Hydra config, run it, record a failure beside the run.

skeleton-train experiment=quickstart
skeleton-train task=rte model=minilm skeleton.psi=2 seed=1
skeleton-train -m task=sst2,rte skeleton.psi=1,2      # a sweep; reruns skip finished runs

``--help`` is answered before Hydra, torch or Lightning are imported, so it returns at once; the
training modules are imported only once a run starts.
"""

from __future__ import annotations

import sys
import textwrap

from skeleton.configs import CONFIG_DIR, groups, options
from skeleton.extras import MissingExtraError, check_launcher

HELP_FLAGS = ("-h", "--help")

COMMON = """\
  experiment=tiny                    a tiny random BERT on bundled samples: a whole run in seconds
  experiment=quickstart              MiniLM on SST-2 from ../shared/data (or $SKELETON_DATA)
  task=rte model=minilm seed=1       pick a task, a backbone and a seed
  skeleton.psi=2                     the accuracy margin (points) the pruned model may lose
  skeleton.enabled=false             prompt tuning only
  module.head=verbalizer             class scores from the LM's own label-word log-probs (decoders, MLMs)
  trainer.max_steps=300              train for a number of steps
  paths.data_dir=/data/glue          a local GLUE/SuperGLUE root (default: the hub)
  logger=csv | logger=none           no W&B
  +sweeps=quick                      a sweep definition (Hydra multirun)
  -m task=sst2,rte skeleton.psi=1,2  your own sweep; reruns skip finished runs"""

HYDRA_FLAGS = """\
  --cfg job                          print the composed config and exit (--resolve to resolve it)
  --config-dir DIR                   add your own config folder (its groups extend or override ours)
  --info                             where each config came from
  --hydra-help                       Hydra's own help"""


def usage() -> str:
    """Our help text: what the command does, the config groups and their options, common overrides."""
    listed = "\n".join(
        textwrap.fill(", ".join(options(group)), 100, break_on_hyphens=False, **_indents(group))
        for group in groups()
    )
    return (
        "usage: skeleton-train [OVERRIDE ...] [--cfg job] [-m]\n\n"
        "Prompt-tune a frozen transformer on a task, find the neurons the task uses, prune the rest in\n"
        "place, and write summary.json and the skeleton artifact into the run folder. Every setting is\n"
        "a Hydra override, key=value.\n\n"
        f"config groups (choose with group=option; files in {CONFIG_DIR}):\n{listed}\n\n"
        f"common overrides:\n{COMMON}\n\nflags:\n{HYDRA_FLAGS}\n"
    )


def _indents(group: str) -> dict:
    return {"initial_indent": f"  {group:<13}", "subsequent_indent": " " * 15}


def main() -> None:
    if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        print(usage())
        return
    try:
        check_launcher(sys.argv[1:])
    except MissingExtraError as err:
        sys.exit(f"skeleton-train: error: {err}")
    import hydra  # after the help: the run's imports take seconds

    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(run)()


def run(cfg) -> float | None:
    """One composed run. Returns the final dev score, for Hydra sweepers that optimise it."""
    from skeleton import runs
    from skeleton.loggers import finish_wandb
    from skeleton.train import run_dir_of, train

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
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        return False


if __name__ == "__main__":
    main()
