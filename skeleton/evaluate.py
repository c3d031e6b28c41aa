"""Plain evaluation loops outside the Trainer: the search calls them dozens of times per run."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def on_device(batches: Iterable[dict], device: torch.device | str) -> Iterator[dict]:
    for batch in batches:
        yield to_device(batch, device)


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: Iterable[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return [model(batch).float().cpu() for batch in on_device(loader, device)]
    finally:
        model.train(was_training)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[dict], predictions: list | None = None) -> dict[str, float]:
    """All of the task's metrics for ``model`` on ``loader`` (fractions, as the metrics return them).
    Pass a list as ``predictions`` to also collect the logits of every batch."""
    device = next(model.parameters()).device
    metrics = model.task.build_metrics()
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            logits = model(to_device(batch, device)).float().cpu()
            metrics.update(logits, batch)
            if predictions is not None:
                predictions.append(logits)
    finally:
        model.train(was_training)
    return {k: float(v) for k, v in metrics.compute().items()}


def is_degenerate(logits: list[torch.Tensor], formulation: str) -> bool:
    """True when a model gives every example the same answer: it has not learned the task."""
    if not logits:
        return False
    if formulation == "regression":
        return float(torch.cat(logits).std()) < 1e-6
    return torch.cat([x.argmax(dim=-1) for x in logits]).unique().numel() == 1
