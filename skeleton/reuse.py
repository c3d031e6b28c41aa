"""Reuse a converged prompt and its attribution scores across margins.

Prompt tuning and attribution do not depend on psi, so a margin sweep tunes each (task, model,
seed, ...) once. The prompt (and head) are stored under the hash of every config key that can
change them; scores under a hash that also covers the attribution settings. One more margin
then costs one search, not one training. An entry is a skeleton artifact without kept indices
(``export.save_trained``): safetensors + JSON only.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from skeleton import runs
from skeleton.export import META, load_trained, save_trained
from skeleton.localize import Scores

# Keys that never change the trained prompt: where things are written, how runs are named and
# logged, and everything the Skeleton step does after the prompt has converged.
NOT_PROMPT = (
    "run_dir",
    "sweep_name",
    "tags",
    "skip_completed",
    "save_artifact",
    "reuse",
    "paths.output_root",
    "paths.cache_dir",
    "logger",
    "callbacks.progress",
    "callbacks.lr_monitor",
    "skeleton",
    "data.attribution_size",
)
# Keys that never change attribution scores, given the prompt.
NOT_SCORES = (
    "skeleton.psi",
    "skeleton.search",
    "skeleton.pruning.min_per_layer",  # pruning.scope stays: iterative attribution masks by scope
    "skeleton.pruning.round_to",
    "skeleton.pruning.head_rate",
    "skeleton.recovery",
    "skeleton.benchmark",
    "skeleton.enabled",
    "skeleton.restore_best",
)

CACHE_FORMAT = 2  # entries are skeleton artifacts of kind "prompt" (format 1: prompt.safetensors)


class PromptCache:
    """One folder per converged prompt: ``<cache_dir>/prompts/<prompt hash>/``."""

    def __init__(self, cfg: DictConfig, root: str | Path):
        config = OmegaConf.to_container(cfg, resolve=True)
        self.prompt_key = runs.config_hash(config, NOT_PROMPT)
        score_exclude = tuple(k for k in NOT_PROMPT if k != "skeleton") + NOT_SCORES
        self.scores_key = runs.config_hash(config, score_exclude)
        self.folder = Path(root) / f"prompts-v{CACHE_FORMAT}" / self.prompt_key

    # ---- prompt + head ---------------------------------------------------------------------------
    def has_prompt(self) -> bool:
        return (self.folder / META).exists()

    def save_prompt(self, model: torch.nn.Module, meta: dict) -> None:
        save_trained(model, self.folder, extra=meta)

    def update_meta(self, extra: dict) -> None:
        meta = json.loads((self.folder / META).read_text())
        meta["extra"] = {**meta.get("extra", {}), **extra}
        runs.write_json_atomic(self.folder / META, meta)

    def load_prompt(self, model: torch.nn.Module) -> dict:
        """Load prompt + head into ``model`` (refused, naming the entry, if they do not fit); returns
        the metadata saved with them."""
        return load_trained(model, self.folder).get("extra", {})

    # ---- attribution scores ---------------------------------------------------------------------
    @property
    def scores_path(self) -> Path:
        return self.folder / f"scores-{self.scores_key}.safetensors"

    def load_scores(self) -> Scores | None:
        return Scores.load(str(self.scores_path)) if self.scores_path.exists() else None

    def save_scores(self, scores: Scores) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.scores_path.name}.tmp"
        scores.save(str(tmp))
        tmp.replace(self.scores_path)

    @contextmanager
    def lock(self):
        """Runs of one prompt in parallel (joblib, SLURM arrays) wait for the first to train it."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with open(self.folder.parent / f"{self.prompt_key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
