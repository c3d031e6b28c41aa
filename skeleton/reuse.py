"""Reuse a converged prompt and its attribution scores across margins.

Prompt tuning and attribution do not depend on psi, so a margin sweep tunes each (task, model,
seed, ...) once. The prompt (and head) are stored under a hash of every config key that can change
them, the data's contents and the backbone's weights hash; scores under a hash that also covers the
attribution settings. One more margin then costs one search, not one training. Keys never hold a
path, so a moved cache or data folder still hits. An entry is a skeleton artifact without kept
indices (``export.save_trained``): safetensors + JSON only.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from skeleton import runs
from skeleton.export import META, ArtifactError, load_trained, save_trained
from skeleton.fingerprints import NOT_RESULT, data_fingerprint
from skeleton.localize import Scores

# Keys that never change the trained prompt: those that change no result at all, and everything
# the Skeleton step does after the prompt has converged.
NOT_PROMPT = (*NOT_RESULT, "skeleton", "data.attribution_size")
# Keys that never change attribution scores, given the prompt.
NOT_SCORES = (
    "skeleton.psi",
    "skeleton.search",
    "skeleton.pruning.min_per_layer",  # pruning.scope stays: iterative attribution masks by scope
    "skeleton.pruning.round_to",
    "skeleton.pruning.head_rate",
    "skeleton.reconstruct",
    "skeleton.recovery",
    "skeleton.benchmark",
    "skeleton.enabled",
    "skeleton.restore_best",
)

CACHE_FORMAT = 3  # 3: keys cover data contents and backbone weights; entries are "prompt" artifacts


class CacheError(RuntimeError):
    """A cache entry that cannot be read: the message names the entry to delete."""


class PromptCache:
    """One folder per converged prompt: ``<cache_dir>/prompts-v3/<prompt hash>/``."""

    def __init__(
        self,
        cfg: DictConfig,
        root: str | Path,
        *,
        data: str,
        backbone_sha256: str,
        skeleton: dict | None = None,
    ):
        config = OmegaConf.to_container(cfg, resolve=True)
        if skeleton is not None:  # the validated settings, defaults filled in: a new default is a new key
            config["skeleton"] = skeleton
        identity = {"data": data, "backbone": backbone_sha256, "format": CACHE_FORMAT}
        self.prompt_key = runs.config_hash({**config, "_identity": identity}, NOT_PROMPT)
        score_exclude = tuple(k for k in NOT_PROMPT if k != "skeleton") + NOT_SCORES
        self.scores_key = runs.config_hash({**config, "_identity": identity}, score_exclude)
        self.folder = Path(root).expanduser() / f"prompts-v{CACHE_FORMAT}" / self.prompt_key

    @classmethod
    def of_run(cls, cfg: DictConfig, backbone_sha256: str) -> PromptCache:
        """The entry a run with this (resolved) config and dense backbone used."""
        from skeleton.localize.config import SkeletonConfig

        settings = SkeletonConfig.from_dict(OmegaConf.to_container(cfg.skeleton, resolve=True)).to_dict()
        return cls(
            cfg,
            cfg.paths.cache_dir,
            data=data_fingerprint(cfg),
            backbone_sha256=backbone_sha256,
            skeleton=settings,
        )

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
        try:
            return load_trained(model, self.folder).get("extra", {})
        except ArtifactError as err:
            raise CacheError(f"{err}. It is a cache entry: {self._fix}") from None

    # ---- attribution scores ---------------------------------------------------------------------
    @property
    def scores_path(self) -> Path:
        return self.folder / f"scores-{self.scores_key}.safetensors"

    def load_scores(self) -> Scores | None:
        if not self.scores_path.exists():
            return None
        try:
            return Scores.load(str(self.scores_path))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise CacheError(
                f"cached scores {self.scores_path} are unreadable ({err}); {self._fix}"
            ) from None

    def save_scores(self, scores: Scores) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{self.scores_path.name}.tmp"
        scores.save(str(tmp))
        tmp.replace(self.scores_path)

    @property
    def _fix(self) -> str:
        return f"delete {self.folder} (rm -r) to rebuild it, or run with reuse=false"

    @contextmanager
    def lock(self, report=print):
        """Runs of one prompt in parallel (joblib, SLURM arrays) wait for the first to train it, and
        say so while they wait."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        path = self.folder.parent / f"{self.prompt_key}.lock"
        with open(path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                report(f"waiting for another run that is training the same prompt (lock {path})")
                fcntl.flock(handle, fcntl.LOCK_EX)
                report("the other run finished; reusing its prompt if it saved one")
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
