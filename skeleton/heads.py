"""Small task heads on top of the pooled backbone output, one per task formulation."""

from __future__ import annotations

import torch
from torch import nn

FORMULATIONS = ("classification", "regression", "multiple_choice")


class TaskHead(nn.Module):
    """Linear (or one-hidden-layer) head.

    classification -> (B, num_labels); regression -> (B,); multiple_choice -> (B, C): every
    choice row gets one score and padded choices (``choice_mask`` False) get -inf.
    """

    def __init__(
        self,
        formulation: str,
        hidden_size: int,
        num_labels: int = 2,
        hidden_dim: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if formulation not in FORMULATIONS:
            raise ValueError(f"unknown formulation {formulation!r}; known: {', '.join(FORMULATIONS)}")
        self.formulation = formulation
        out = num_labels if formulation == "classification" else 1
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_dim:
            layers += [nn.Linear(hidden_size, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            hidden_size = hidden_dim
        layers.append(nn.Linear(hidden_size, out))
        self.net = nn.Sequential(*layers)

    def forward(
        self, pooled: torch.Tensor, num_choices: int = 1, choice_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = self.net(pooled)
        if self.formulation == "classification":
            return out
        scores = out.squeeze(-1)
        if self.formulation == "regression":
            return scores
        scores = scores.view(-1, num_choices)
        if choice_mask is not None:
            scores = scores.masked_fill(~choice_mask.bool(), float("-inf"))
        return scores


def task_loss(formulation: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if formulation == "regression":
        return nn.functional.mse_loss(logits, labels.float())
    return nn.functional.cross_entropy(logits, labels.long())
