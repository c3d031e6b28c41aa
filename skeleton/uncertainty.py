"""How sure a score difference is: paired predictions, the metric on any subset, the paired bootstrap.

A margin search compares the pruned model with the dense one on the same examples, so the noise that
matters is that of the *difference*: resampling examples (the same resample for both models) gives its
standard error for any metric (accuracy, F1, Matthews, Pearson, group exact match) without a formula per
metric. ``split_loader`` carves a loader into two disjoint halves, for a search on one and a confirmation
on the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from skeleton.evaluate import to_device

FIELDS = ("labels", "group", "candidate_scores")  # what TaskMetrics.update reads from a batch


@dataclass
class Predictions:
    """Logits of every example of a loader, with the batch fields the task's metrics read."""

    logits: torch.Tensor
    fields: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, index: torch.Tensor) -> Predictions:
        return Predictions(self.logits[index], {k: v[index] for k, v in self.fields.items()})

    def cat(self, other: Predictions) -> Predictions:
        """These examples followed by ``other``'s: two parts of a split scored as one."""
        fields = {k: torch.cat([v, other.fields[k]]) for k, v in self.fields.items()}
        return Predictions(torch.cat([self.logits, other.logits]), fields)


@torch.inference_mode()
def collect(model: nn.Module, loader: Iterable[dict]) -> Predictions | list:
    """The model's logits on ``loader`` as one ``Predictions``; a list of per-batch logits when the
    batches cannot be stacked (ReCoRD's varying candidates): then only whole-split metrics exist."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, fields = [], {k: [] for k in FIELDS}
    try:
        for batch in loader:
            logits.append(model(to_device(batch, device)).float().cpu())
            for k in FIELDS:
                if k in batch:
                    fields[k].append(batch[k].cpu())
    finally:
        model.train(was_training)
    try:
        return Predictions(torch.cat(logits), {k: torch.cat(v) for k, v in fields.items() if v})
    except RuntimeError:
        return logits


def score(task, predictions: Predictions) -> dict[str, float]:
    metrics = task.build_metrics()
    metrics.update(predictions.logits, predictions.fields)
    return metrics.compute()


def constant_baseline(task, predictions: Predictions, headline: str) -> tuple[int, float] | None:
    """(class, headline score) of the best answer given to every example alike (classification only):
    a dense model within psi of it has learned too little for a pruning margin to say anything."""
    if task.formulation != "classification" or predictions.logits.dim() != 2:
        return None
    best = None
    for label in range(predictions.logits.shape[1]):
        logits = torch.zeros_like(predictions.logits)
        logits[:, label] = 1.0
        value = float(score(task, Predictions(logits, predictions.fields))[headline])
        if not math.isnan(value) and (best is None or value > best[1]):
            best = (label, value)
    return best


@dataclass
class Drop:
    """dense - pruned on the same examples, in the metric's units, with its paired standard error."""

    value: float
    se: float | None
    n: int

    def to_dict(self, scale: float = 100.0) -> dict:
        """In points (scale 100), as psi is."""
        return {
            "drop": round(self.value * scale, 3),
            "se": None if self.se is None else round(self.se * scale, 3),
            "n": self.n,
        }


def paired_drop(
    task, headline: str, dense: Predictions, pruned: Predictions, *, resamples: int = 200, seed: int = 0
) -> Drop:
    """The headline's drop and its paired bootstrap standard error (the same resampled examples for both
    models). Group metrics (MultiRC) resample questions, not answers, so groups stay whole."""
    value = score(task, dense)[headline] - score(task, pruned)[headline]
    if resamples < 2 or not isinstance(dense, Predictions) or not isinstance(pruned, Predictions):
        return Drop(value, None, len(dense))
    gen = torch.Generator().manual_seed(seed)
    units = _resampling_units(dense)
    diffs = []
    for _ in range(resamples):
        picked = units[torch.randint(len(units), (len(units),), generator=gen)]
        index = torch.cat(list(picked)) if isinstance(picked, tuple) else picked
        d = score(task, dense.take(index))[headline] - score(task, pruned.take(index))[headline]
        if math.isfinite(d):
            diffs.append(d)
    se = float(torch.tensor(diffs, dtype=torch.float64).std()) if len(diffs) > 1 else None
    return Drop(value, se, len(dense))


def _resampling_units(predictions: Predictions):
    """Example indices, or (for grouped metrics) one index block per question, as an indexable list."""
    if "group" not in predictions.fields:
        return torch.arange(len(predictions))
    group = predictions.fields["group"].view(-1)
    blocks = [torch.nonzero(group == g).view(-1) for g in group.unique()]
    return _Blocks(blocks)


class _Blocks:
    """Index blocks that a bootstrap resamples whole; ``blocks[idx]`` is a tuple of blocks."""

    def __init__(self, blocks: list[torch.Tensor]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: torch.Tensor) -> tuple:
        return tuple(self.blocks[i] for i in index.tolist())


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``fraction`` / rest of ``range(n)``, disjoint, each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(max(round(n * fraction), 1), n - 1) if n > 1 else n
    return perm[:cut].sort().values, perm[cut:].sort().values


def subset_loader(loader: DataLoader, indices: torch.Tensor) -> DataLoader:
    """``loader``'s examples at ``indices``, in that order, batched and collated as ``loader`` does."""
    return DataLoader(
        Subset(loader.dataset, indices.tolist()),
        batch_size=loader.batch_size,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )


def split_loader(loader: DataLoader, fraction: float, seed: int) -> tuple[DataLoader, DataLoader]:
    """Two disjoint loaders over a seeded ``fraction`` / rest of ``loader``'s examples (``split_indices``),
    each in the original order (length-sorted evaluation batches stay length-sorted)."""
    first, rest = split_indices(len(loader.dataset), fraction, seed)
    return subset_loader(loader, first), subset_loader(loader, rest)
