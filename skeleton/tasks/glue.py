"""GLUE task specs (official TSV layout of `glue_data/`, hub mirror "nyu-mll/glue").

Headline metrics follow the GLUE leaderboard's task score: CoLA Matthews corr.; MRPC and QQP the mean of
accuracy and F1 ("acc_f1"); STS-B the mean of Pearson and Spearman ("pearson_spearman"); accuracy
elsewhere (MNLI: matched dev; "mnli-mm" reports mismatched). Every component metric is reported too.
"""

from __future__ import annotations

from functools import partial

from skeleton.tasks.registry import Example, TaskSpec, register_benchmark, register_benchmark_task

BENCHMARK = register_benchmark("glue", "GLUE")
HUB_ID = "nyu-mll/glue"
FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
PAIR = ("sentence1", "sentence2")
NLI2 = ("entailment", "not_entailment")
ACC_F1 = {"metrics": ("accuracy", "f1", "acc_f1"), "headline": "acc_f1"}


def texts(a: str, b: str | None, row: dict) -> Example:
    """A single sentence or a sentence pair; the label is already hub-encoded (float for STS-B)."""
    return Example([(row[a], row[b] if b else None)], row["label"])


def glue(name, folder, labels, fields, columns=None, label_column="label", **kw) -> TaskSpec:
    """Register a GLUE spec. `fields` are the hub's text fields, `columns` their official TSV columns
    (default: same names) and `label_column` the TSV column holding the gold label."""
    kw.setdefault("metrics", ("accuracy",) if labels else ("pearson", "spearman", "pearson_spearman"))
    kw.setdefault("headline", kw["metrics"][-1] if labels is None else kw["metrics"][0])
    return register_benchmark_task(
        BENCHMARK,
        name,
        folder,
        labels,
        files=kw.pop("files", FILES),
        hub_id=HUB_ID,
        hub_splits=kw.pop("hub_splits", HUB_SPLITS),
        formulation="classification" if labels else "regression",
        convert=partial(texts, fields[0], fields[1] if len(fields) > 1 else None),
        columns={**dict(zip(fields, columns or fields)), "label": label_column},
        **kw,
    )


MNLI_FILES = {"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv",
              "test": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}  # fmt: skip
MNLI_HUB = {"train": "train", "dev": "validation_matched", "dev_mismatched": "validation_mismatched",
            "test": "test_matched", "test_mismatched": "test_mismatched"}  # fmt: skip
MNLI_MM_FILES = {"train": "train.tsv", "dev": "dev_mismatched.tsv", "test": "test_mismatched.tsv"}
MNLI_MM_HUB = {"train": "train", "dev": "validation_mismatched", "test": "test_mismatched"}
MNLI_LABELS = ("entailment", "neutral", "contradiction")
COLA_HEADER = ("source", "label", "original_label", "sentence")  # CoLA train/dev have no header row

COLA = glue(
    "cola",
    "CoLA",
    ("unacceptable", "acceptable"),
    ("sentence",),
    header=COLA_HEADER,
    metrics=("mcc", "accuracy"),
)
SST2 = glue("sst2", "SST-2", ("negative", "positive"), ("sentence",))
MRPC = glue(
    "mrpc", "MRPC", ("not_equivalent", "equivalent"), PAIR, ("#1 String", "#2 String"), "Quality", **ACC_F1
)
QQP = glue(
    "qqp", "QQP", ("not_duplicate", "duplicate"), ("question1", "question2"), None, "is_duplicate", **ACC_F1
)
STSB = glue("stsb", "STS-B", None, PAIR, label_column="score")
MNLI = glue("mnli", "MNLI", MNLI_LABELS, ("premise", "hypothesis"), PAIR, "gold_label", files=MNLI_FILES,
            hub_splits=MNLI_HUB, aliases=("mnli-m", "mnli-matched"), display="MNLI-m",
            averaged_display="MNLI (m/mm averaged)")  # fmt: skip
# MNLI reported on the mismatched dev set: same training data, the other dev file. GLUE counts matched and
# mismatched as one task, so the two are averaged before the GLUE mean.
MNLI_MM = glue("mnli-mm", "MNLI", MNLI_LABELS, ("premise", "hypothesis"), PAIR, "gold_label",
               files=MNLI_MM_FILES, hub_splits=MNLI_MM_HUB, hub_config="mnli",
               aliases=("mnli-mismatched",), display="MNLI-mm", averaged_into="mnli")  # fmt: skip
QNLI = glue("qnli", "QNLI", NLI2, ("question", "sentence"))
RTE = glue("rte", "RTE", NLI2, PAIR)
WNLI = glue("wnli", "WNLI", ("not_entailment", "entailment"), PAIR)
