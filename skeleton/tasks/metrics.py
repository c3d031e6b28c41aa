"""Task metrics: torchmetrics where it has the metric, two small custom ones where it does not.

`TaskMetrics(spec)` turns model outputs into predictions once (argmax over classes or choices; the raw
score for regression) and feeds every metric the spec names. Scores are fractions in [0, 1]
(correlations in [-1, 1]); tables multiply by 100. Averages such as "acc_f1" are the leaderboard task
scores: the GLUE / SuperGLUE leaderboards average a task's two metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.utilities import dim_zero_cat

from skeleton.tasks.answers import answer_scores, normalize_answer, token_f1  # noqa: F401  (re-exported)
from skeleton.tasks.registry import COMPOSITES

AVERAGES = COMPOSITES  # derived score -> the two metrics it averages (declared torch-free in the registry)


# ---- custom metrics --------------------------------------------------------------------------------
class GroupExactMatch(Metric):
    """MultiRC EM: the fraction of questions whose answer options are *all* classified right.
    torchmetrics has no grouped metric, and one question's options may span batches, so we keep
    (group, correct) per option and group at compute time ("cat" states also sync across ranks)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, group: Tensor) -> None:
        self.group.append(group.long().reshape(-1))
        self.correct.append((preds == target).reshape(-1))

    def compute(self) -> Tensor:
        group, correct = dim_zero_cat(self.group), dim_zero_cat(self.correct)
        _, question = group.unique(return_inverse=True)
        wrong = torch.zeros(int(question.max()) + 1, device=group.device)
        wrong.index_add_(0, question, (~correct).float())
        return (wrong == 0).float().mean()


class CandidateScore(Metric):
    """ReCoRD EM and F1 of the chosen candidate. The converter precomputes every candidate's (EM, F1)
    against the gold answers (SQuAD normalisation), so scoring a prediction is a lookup: no strings at
    eval time, and it equals the official script since a prediction is always one of the candidates."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.zeros(2), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, candidate_scores: Tensor) -> None:
        rows = torch.arange(preds.shape[0], device=preds.device)
        self.total += candidate_scores[rows, preds].float().sum(0)
        self.count += preds.shape[0]

    def compute(self) -> dict[str, Tensor]:
        em, f1 = self.total / self.count.clamp(min=1)
        return {"em": em, "f1": f1}


class GlueMatthewsCorrCoef(BinaryMatthewsCorrCoef):
    """MCC as GLUE scores CoLA (sklearn's ``matthews_corrcoef``): 0 when a row or column of the
    confusion matrix is empty. torchmetrics 1.9 returns a non-zero value there (0.41 for constant
    predictions on a 6:2 split), which would reward a model that learned nothing."""

    def compute(self) -> Tensor:
        (tn, fp), (fn, tp) = self.confmat.double()
        if min(tp + fp, tp + fn, tn + fp, tn + fn) == 0:
            return torch.tensor(0.0)
        return super().compute()


# ---- the per-task bundle ---------------------------------------------------------------------------
def _make(name: str, num_classes: int) -> Metric:
    if name == "accuracy":
        return MulticlassAccuracy(num_classes, average="micro")
    if name in ("f1", "f1a"):  # binary F1 of the positive class; MultiRC's F1a is this over all options
        return BinaryF1Score()
    if name == "macro_f1":
        return MulticlassF1Score(num_classes, average="macro")
    if name == "mcc":
        return GlueMatthewsCorrCoef()
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    if name == "em":
        return GroupExactMatch()
    raise ValueError(f"unknown metric {name!r}")


class TaskMetrics(nn.Module):
    """All metrics of one task. update(logits, batch) takes (B, num_labels) logits for classification,
    (B,) scores for regression and (B, C) choice scores (-inf on padded choices) for multiple_choice;
    batch["labels"] is the gold, plus batch["group"] (MultiRC) / batch["candidate_scores"] (ReCoRD)."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        if spec.name == "record":
            metrics = {"record": CandidateScore()}
        else:
            n = spec.num_choices if spec.formulation == "multiple_choice" else spec.num_labels
            metrics = {m: _make(m, n) for m in spec.metrics if m not in AVERAGES}
        self.metrics = nn.ModuleDict(metrics)
        self.seen = 0

    @torch.no_grad()
    def update(self, logits: Tensor, batch: dict) -> None:
        device = next(iter(self.metrics.values())).device
        self.seen += len(batch["labels"])
        logits, labels = logits.detach().to(device), batch["labels"].to(device)
        if self.spec.formulation == "regression":
            preds, labels = logits.reshape(-1).float(), labels.float()
        else:
            preds, labels = logits.argmax(-1), labels.long()
        for metric in self.metrics.values():
            if isinstance(metric, GroupExactMatch):
                metric.update(preds, labels, batch["group"].to(device))
            elif isinstance(metric, CandidateScore):
                metric.update(preds, batch["candidate_scores"].to(device))
            else:
                metric.update(preds, labels)

    def compute(self) -> dict[str, float]:
        """Every metric as a plain float; NaN for all when nothing was seen (an empty loader)."""
        if not self.seen:
            return dict.fromkeys(self.spec.metrics, float("nan"))
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            value = metric.compute()
            if isinstance(value, dict):
                out.update({k: float(v) for k, v in value.items()})
            else:
                out[name] = float(value)
        for name, (a, b) in AVERAGES.items():
            if name in self.spec.metrics:
                out[name] = (out[a] + out[b]) / 2
        return out

    def reset(self) -> None:
        self.seen = 0
        for metric in self.metrics.values():
            metric.reset()
