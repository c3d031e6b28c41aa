"""SuperGLUE task specs (official JSONL layout, hub mirror "aps/super_glue") and their input renderings.

Renderings, chosen so a frozen encoder sees plain text with the task's structure made visible:
- pairs put the short text first (question, answer, hypothesis) and the passage second, so truncation
  only ever cuts the passage's tail;
- COPA: (premise, "What was the cause? <choice>") per choice ("effect" likewise);
- MultiRC: (question + " " + answer, paragraph) with the paragraph's HTML markup dropped;
- ReCoRD: one choice per candidate entity, (query with @placeholder replaced by the entity, passage);
  "@highlight" bullets become "- " lines;
- WiC: the target word is wrapped in asterisks in both sentences, "*bank*";
- WSC: one text, the noun phrase wrapped in asterisks and the pronoun in brackets, "*Mark* ... [He]".
Headlines: CB the mean of accuracy and macro-F1 (the SuperGLUE leaderboard's task score), MultiRC F1a,
ReCoRD F1, AX-b Matthews corr., accuracy elsewhere.
"""

from __future__ import annotations

import re
import string
from functools import partial

from skeleton.tasks.answers import answer_scores
from skeleton.tasks.readers import flatten_multirc, flatten_record, flatten_wsc
from skeleton.tasks.registry import Example, TaskSpec, register_benchmark, register_benchmark_task

BENCHMARK = register_benchmark("superglue", "SuperGLUE")
HUB_ID = "aps/super_glue"
FILES = {"train": "train.jsonl", "dev": "val.jsonl", "test": "test.jsonl"}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
NLI2 = ("entailment", "not_entailment")
BOOL = ("False", "True")


def pair(a: str, b: str, row: dict) -> Example:
    return Example([(row[a], row[b])], row["label"])


def copa(row: dict) -> Example:
    prompt = f"What was the {row['question']}?"
    return Example([(row["premise"], f"{prompt} {row[c]}") for c in ("choice1", "choice2")], row["label"])


def multirc(row: dict) -> Example:
    """Binary per answer option; `group` packs (paragraph, question) so EM can regroup a question. The
    paragraph's "<b>Sent 1: </b>...<br>" markup is dropped: plain text, fewer wasted tokens."""
    idx = row["idx"]
    group = (int(idx["paragraph"]) << 32) + int(idx["question"])
    paragraph = " ".join(re.sub(r"<b>Sent \d+: </b>|<br>", " ", row["paragraph"]).split())
    return Example([(f"{row['question']} {row['answer']}", paragraph)], row["label"], group=group)


def record(row: dict) -> Example:
    """One choice per candidate entity; the label is the candidate with the best F1 against the gold
    answers (-1 when unanswered), and every candidate's (EM, F1) travels along for the metric."""
    passage = row["passage"].replace("@highlight\n", "- ")
    entities, answers = list(row["entities"]), list(row["answers"])
    scores = [answer_scores(e, answers) for e in entities]
    label = max(range(len(entities)), key=lambda i: scores[i][::-1]) if answers and entities else -1
    texts = [(row["query"].replace("@placeholder", e), passage) for e in entities]
    return Example(texts, label, candidate_scores=scores)


def mark(s: str, start: int, end: int, left: str = "*", right: str = "*") -> str:
    return f"{s[:start]}{left}{s[start:end]}{right}{s[end:]}"


def wic(row: dict) -> Example:
    s1 = mark(row["sentence1"], row["start1"], row["end1"])
    s2 = mark(row["sentence2"], row["start2"], row["end2"])
    return Example([(s1, s2)], row["label"])


def _bare(word: str) -> str:
    return word.strip(string.punctuation).lower()


def find_span(words: list[str], index: int, span: str) -> tuple[int, int]:
    """(start, length) of `span` in the whitespace-split text: at `index` if it matches there, else at the
    nearest match (the official WSC file has a few off-by-some indices), else trust `index`."""
    target = [_bare(w) for w in span.split()]
    n = max(len(target), 1)
    hits = [i for i in range(len(words) - n + 1) if [_bare(w) for w in words[i : i + n]] == target]
    start = min(hits, key=lambda i: abs(i - index)) if hits else min(index, len(words) - 1)
    return start, min(n, len(words) - start)


def wsc(row: dict) -> Example:
    words = row["text"].split()
    for key, left, right in (("span1", "*", "*"), ("span2", "[", "]")):
        start, n = find_span(words, row[f"{key}_index"], row[f"{key}_text"])
        words[start] = left + words[start]
        words[start + n - 1] += right
    return Example([(" ".join(words), None)], row["label"])


def superglue(name, folder, labels, convert, fields, **kw) -> TaskSpec:
    kw.setdefault("metrics", ("accuracy",))
    return register_benchmark_task(
        BENCHMARK,
        name,
        folder,
        labels,
        files=kw.pop("files", FILES),
        hub_id=HUB_ID,
        hub_splits=kw.pop("hub_splits", HUB_SPLITS),
        formulation=kw.pop("formulation", "classification"),
        headline=kw.pop("headline", kw["metrics"][0]),
        convert=convert,
        fields=fields,
        **kw,
    )


BOOLQ = superglue("boolq", "BoolQ", BOOL, partial(pair, "question", "passage"), ("question", "passage"))
CB = superglue("cb", "CB", ("entailment", "contradiction", "neutral"), partial(pair, "premise", "hypothesis"),
               ("premise", "hypothesis"), metrics=("accuracy", "macro_f1", "acc_macro_f1"),
               headline="acc_macro_f1")  # fmt: skip
COPA = superglue("copa", "COPA", ("choice1", "choice2"), copa, ("premise", "choice1", "choice2", "question"),
                 formulation="multiple_choice", num_choices=2)  # fmt: skip
MULTIRC = superglue("multirc", "MultiRC", BOOL, multirc, ("paragraph", "question", "answer", "idx"),
                    flatten=flatten_multirc, metrics=("f1a", "em", "accuracy"))  # fmt: skip
RECORD_FIELDS = ("passage", "query", "entities", "entity_spans", "answers")
RECORD = superglue("record", "ReCoRD", None, record, RECORD_FIELDS,
                   flatten=flatten_record, formulation="multiple_choice", num_choices=None,
                   metrics=("f1", "em"))  # fmt: skip
SUPERGLUE_RTE = superglue("superglue-rte", "RTE", NLI2, partial(pair, "premise", "hypothesis"),
                          ("premise", "hypothesis"), hub_config="rte",
                          aliases=("sg-rte", "rte-superglue"), display="RTE (SG)")  # fmt: skip
WIC = superglue(
    "wic", "WiC", BOOL, wic, ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2")
)
WSC = superglue("wsc", "WSC", BOOL, wsc, ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
                flatten=flatten_wsc, hub_config="wsc.fixed")  # fmt: skip
# Diagnostics: evaluation-only (no train file); score a model trained on superglue-rte with them. Not part
# of the official SuperGLUE score, so tables leave them out of its average.
AXB = superglue("axb", "AX-b", NLI2, partial(pair, "sentence1", "sentence2"), ("sentence1", "sentence2"),
                files={"dev": "AX-b.jsonl"}, hub_splits={"dev": "test"},
                metrics=("mcc", "accuracy"), diagnostic=True)  # fmt: skip
AXG = superglue("axg", "AX-g", NLI2, partial(pair, "premise", "hypothesis"), ("premise", "hypothesis"),
                files={"dev": "AX-g.jsonl"}, hub_splits={"dev": "test"}, diagnostic=True)  # fmt: skip
