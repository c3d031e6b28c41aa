"""SQuAD-style answer scoring (ReCoRD): plain strings, no torch.

The ReCoRD converter scores every candidate entity while reading the data, so this lives apart from the
torchmetrics code: building specs and reading files must not pull in torch.
"""

from __future__ import annotations

import re
import string
from collections import Counter


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and English articles, squeeze whitespace (the SQuAD/ReCoRD rule)."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(candidate: str, answers: list[str]) -> tuple[float, float]:
    """(EM, F1) of one candidate: the max over the gold answers, as the official ReCoRD script scores."""
    if not answers:
        return 0.0, 0.0
    em = max(float(normalize_answer(candidate) == normalize_answer(a)) for a in answers)
    return em, max(token_f1(candidate, a) for a in answers)
