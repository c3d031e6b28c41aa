"""Task specs, official-format readers, converters and metrics (fixtures + the real shared data)."""

import json
import math
import os
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

from skeleton.tasks import (
    BENCHMARKS,
    COMPOSITES,
    TASKS,
    DataFormatError,
    Example,
    benchmark_tasks,
    display_name,
    get_task,
    normalize_answer,
    read_split,
    token_f1,
)
from skeleton.tasks.superglue import find_span

FIXTURES = Path(__file__).parents[1] / "skeleton" / "fixtures"  # package data
SHARED = Path(os.environ.get("SKELETON_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# The Hugging Face hub's feature names per task (nyu-mll/glue, aps/super_glue): local rows must match.
HUB_FEATURES = {
    "cola": {"sentence"},
    "sst2": {"sentence"},
    "mrpc": {"sentence1", "sentence2"},
    "qqp": {"question1", "question2"},
    "stsb": {"sentence1", "sentence2"},
    "mnli": {"premise", "hypothesis"},
    "mnli-mm": {"premise", "hypothesis"},
    "qnli": {"question", "sentence"},
    "rte": {"sentence1", "sentence2"},
    "wnli": {"sentence1", "sentence2"},
    "boolq": {"question", "passage"},
    "cb": {"premise", "hypothesis"},
    "copa": {"premise", "choice1", "choice2", "question"},
    "multirc": {"paragraph", "question", "answer"},
    "record": {"passage", "query", "entities", "entity_spans", "answers"},
    "superglue-rte": {"premise", "hypothesis"},
    "wic": {"word", "sentence1", "sentence2", "start1", "start2", "end1", "end2"},
    "wsc": {"text", "span1_index", "span2_index", "span1_text", "span2_text"},
    "axb": {"sentence1", "sentence2"},
    "axg": {"premise", "hypothesis"},
}
FIXTURE_ROWS = {  # (task, split) -> rows in the fixture file
    ("cola", "train"): 6, ("cola", "dev"): 3, ("sst2", "train"): 8, ("sst2", "dev"): 3, ("stsb", "dev"): 3, ("mrpc", "train"): 4, ("qqp", "train"): 4, ("stsb", "train"): 5,
    ("mnli", "train"): 6, ("mnli-mm", "train"): 6, ("mnli", "dev"): 2, ("mnli", "dev_mismatched"): 2, ("qnli", "train"): 4,
    ("rte", "train"): 5, ("wnli", "train"): 4, ("boolq", "train"): 5, ("cb", "train"): 5, ("copa", "train"): 5,
    ("multirc", "train"): 7, ("multirc", "dev"): 5, ("record", "train"): 3, ("record", "dev"): 3,
    ("superglue-rte", "train"): 4, ("wic", "train"): 4, ("wsc", "train"): 4, ("axb", "dev"): 4, ("axg", "dev"): 3,
}  # fmt: skip


def fixture(spec, split):
    return FIXTURES / spec.benchmark / spec.folder / spec.files[split]


def rows(task, split="train"):
    spec = get_task(task)
    return read_split(spec, fixture(spec, split))


# ---- registry --------------------------------------------------------------------------------------
def test_all_tasks_registered():
    assert set(TASKS) == set(HUB_FEATURES)


@pytest.mark.parametrize(
    ("alias", "name"),
    [("SST-2", "sst2"), ("sst_2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"), ("glue/rte", "rte"), ("RTE", "rte"),
     ("superglue-rte", "superglue-rte"), ("super_glue/rte", "superglue-rte"), ("MNLI-MM", "mnli-mm"),
     ("ReCoRD", "record"), ("AX-b", "axb"), ("superglue-cb", "cb")],
)  # fmt: skip
def test_aliases(alias, name):
    assert get_task(alias) is TASKS[name]
    assert get_task(TASKS[name]) is TASKS[name]


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*known tasks: cola, sst2.*superglue-rte"):
        get_task("nope")


@pytest.mark.parametrize("name", list(HUB_FEATURES))
def test_spec_is_consistent(name):
    spec = TASKS[name]
    assert spec.headline in spec.metrics
    assert spec.hub_id == {"glue": "nyu-mll/glue", "superglue": "aps/super_glue"}[spec.benchmark]
    assert set(spec.hub_splits) == set(spec.files)
    assert spec.num_labels == (len(spec.labels) if spec.formulation == "classification" else 1)
    assert fixture(spec, "dev").is_file()
    if spec.train_file:
        assert fixture(spec, "train").is_file()
    with pytest.raises(FrozenInstanceError):
        spec.name = "x"


def test_headlines_and_special_specs():
    headline = {n: s.headline for n, s in TASKS.items()}
    assert headline["cola"] == "mcc" and headline["mrpc"] == headline["qqp"] == "acc_f1"
    assert headline["stsb"] == "pearson_spearman" and headline["cb"] == "acc_macro_f1"
    assert headline["multirc"] == "f1a" and headline["record"] == "f1" and headline["sst2"] == "accuracy"
    assert TASKS["superglue-rte"] is not TASKS["rte"] and TASKS["superglue-rte"].hub_config == "rte"
    assert (
        TASKS["mnli"].dev_file == "dev_matched.tsv"
        and TASKS["mnli"].files["dev_mismatched"] == "dev_mismatched.tsv"
    )
    assert (
        TASKS["mnli-mm"].dev_file == "dev_mismatched.tsv"
        and TASKS["mnli-mm"].hub_splits["dev"] == "validation_mismatched"
    )
    assert TASKS["stsb"].labels is None and TASKS["stsb"].formulation == "regression"
    assert TASKS["copa"].num_choices == 2 and TASKS["record"].num_choices is None
    assert TASKS["axb"].train_file is None


def test_benchmark_layout_is_declared_with_the_specs():
    """What the tables need to score a benchmark lives in the registry, not in a copy in tables.py."""
    assert BENCHMARKS == {"glue": "GLUE", "superglue": "SuperGLUE"}
    assert benchmark_tasks("glue") == (
        "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli-mm", "qnli", "rte", "wnli"
    )  # fmt: skip
    assert benchmark_tasks("superglue") == (
        "boolq", "cb", "copa", "multirc", "record", "superglue-rte", "wic", "wsc", "axb", "axg"
    )  # fmt: skip
    assert benchmark_tasks("superglue", diagnostics=False) == benchmark_tasks("superglue")[:-2]
    assert [n for n, s in TASKS.items() if s.diagnostic] == ["axb", "axg"]
    names = {n: display_name(n) for n in TASKS}
    assert names["sst2"] == "SST-2" and names["mnli"] == "MNLI-m" and names["mnli-mm"] == "MNLI-mm"
    assert names["superglue-rte"] == "RTE (SG)" and names["axb"] == "AX-b" and names["record"] == "ReCoRD"
    assert display_name("not-a-task") == "not-a-task"
    assert len(set(names.values())) == len(names)  # every table row is distinguishable
    units = {n: s.score_unit for n, s in TASKS.items() if s.score_unit != n}
    assert units == {"mnli-mm": "mnli"} and TASKS["mnli"].averaged_display == "MNLI (m/mm averaged)"
    for spec in TASKS.values():  # a composite headline's parts are metrics of the task
        assert set(COMPOSITES.get(spec.headline, ())) <= set(spec.metrics)


def test_task_metrics_still_importable_from_the_package():
    import skeleton.tasks
    from skeleton.tasks import TaskMetrics, metrics

    assert TaskMetrics is metrics.TaskMetrics and metrics.AVERAGES is COMPOSITES
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        skeleton.tasks.nope  # noqa: B018


# ---- readers on every fixture ----------------------------------------------------------------------
FIXTURE_SPLITS = [
    (n, s) for n, spec in TASKS.items() for s in ("train", "dev", "dev_mismatched") if s in spec.files
]


@pytest.mark.parametrize(("name", "split"), FIXTURE_SPLITS)
def test_reader_yields_hub_rows(name, split):
    spec = TASKS[name]
    got = read_split(spec, fixture(spec, split))
    assert len(got) == FIXTURE_ROWS.get((name, split), 2)
    extra = set() if name == "record" else {"label"}
    for row in got:
        assert set(row) == HUB_FEATURES[name] | extra | {"idx"}
        ex = spec.convert(row)
        assert isinstance(ex, Example)
        if spec.formulation == "classification":
            assert isinstance(row["label"], int) and 0 <= row["label"] < spec.num_labels
            assert len(ex.texts) == 1
        elif spec.formulation == "regression":
            assert isinstance(ex.label, float) and 0 <= ex.label <= 5
        else:
            assert 0 <= ex.label < len(ex.texts)


def test_glue_specifics():
    assert rows("cola")[2] == {"sentence": "They drank the pub.", "label": 0, "idx": 2}  # header-less file
    assert rows("mrpc")[0]["label"] == 1 and rows("mrpc")[0]["sentence1"].startswith("Amrozi")  # BOM header
    assert rows("sst2")[4]["sentence"] == 'the " greatest " film of the year '  # bare quotes survive
    assert [r["label"] for r in rows("mnli")] == [1, 0, 0, 0, 1, 2]  # entailment, neutral, contradiction
    assert [r["label"] for r in rows("mnli", "dev_mismatched")] == [2, 0]
    assert [r["label"] for r in rows("qnli")] == [1, 1, 0, 0]  # entailment=0 as on the hub
    assert [r["label"] for r in rows("wnli")] == [1, 1, 1, 0]  # WNLI: 1 = entailment
    assert [r["label"] for r in rows("stsb")] == [5.0, 3.8, 3.8, 2.6, 4.25]
    assert rows("qqp")[1]["label"] == 1


def test_superglue_specifics():
    assert [r["label"] for r in rows("boolq")] == [1, 1, 1, 1, 0]  # JSON bools -> ClassLabel(False, True)
    assert [r["label"] for r in rows("cb")] == [0, 2, 1, 0, 1]  # entailment, contradiction, neutral
    assert rows("wsc")[0] == {"text": rows("wsc")[0]["text"], "span1_index": 0, "span2_index": 13,
                              "span1_text": "Mark", "span2_text": "He", "idx": 0, "label": 1}  # fmt: skip
    mrc = rows("multirc")
    assert [r["idx"] for r in mrc[:3]] == [{"paragraph": 0, "question": 0, "answer": i} for i in range(3)]
    assert [r["label"] for r in mrc] == [0, 1, 1, 0, 1, 1, 0]
    assert mrc[5]["idx"] == {"paragraph": 1, "question": 2, "answer": 0}
    rec = rows("record")
    assert rec[0]["entities"] == ["Afghan", "Afghanistan", "BBC", "Kabul"]  # sorted, unique
    assert rec[0]["answers"] == ["Kabul"] and rec[0]["idx"] == {"passage": 0, "query": 0}
    spans = rec[0]["entity_spans"]
    assert all(rec[0]["passage"][s:e] == t for t, s, e in zip(spans["text"], spans["start"], spans["end"]))


def test_unlabelled_rows_get_minus_one(tmp_path):
    (tmp_path / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tA b.\tC d.\n")
    assert read_split(get_task("rte"), tmp_path / "test.tsv")[0]["label"] == -1
    stsb = read_split(get_task("stsb"), tmp_path / "test.tsv")[0]
    assert stsb["label"] == -1.0 and isinstance(stsb["label"], float)
    (tmp_path / "cola.tsv").write_text("index\tsentence\n0\tJohn left.\n")  # CoLA's test file has a header
    assert read_split(get_task("cola"), tmp_path / "cola.tsv") == [
        {"sentence": "John left.", "label": -1, "idx": 0}
    ]
    (tmp_path / "test.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "idx": 0}) + "\n")
    assert read_split(get_task("cb"), tmp_path / "test.jsonl")[0]["label"] == -1


# ---- reader errors ---------------------------------------------------------------------------------
def test_wrong_column_count_names_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\ngood " film\t1\nbroken row\n')
    with pytest.raises(DataFormatError, match=rf"{path}:3: expected 2 tab-separated columns.*got 1"):
        read_split(get_task("sst2"), path)


def test_missing_header_column(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(DataFormatError, match=r"dev.tsv:1: header .* lacks column"):
        read_split(get_task("rte"), path)


def test_unknown_label_names_file_line_value_and_allowed(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tcontradiction\n")
    with pytest.raises(
        DataFormatError, match=r"dev.tsv:3: unknown label 'contradiction'.*entailment, not_entailment"
    ):
        read_split(get_task("rte"), path)
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe", "idx": 0}) + "\n")
    with pytest.raises(
        DataFormatError, match=r"val.jsonl:1: unknown label 'maybe'.*entailment, contradiction, neutral"
    ):
        read_split(get_task("cb"), path)
    stsb = tmp_path / "train.tsv"
    stsb.write_text("\t".join(["index", "sentence1", "sentence2", "score"]) + "\n0\ta\tb\thigh\n")
    with pytest.raises(DataFormatError, match=r"train.tsv:2: regression target 'high'"):
        read_split(get_task("stsb"), stsb)


def test_bad_json_and_missing_fields(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"premise": "a", "hypothesis": "b", "label": "entailment", "idx": 0}) + "\n{oops\n"
    )
    with pytest.raises(DataFormatError, match=r"train.jsonl:2: bad JSON"):
        read_split(get_task("cb"), path)
    path.write_text(json.dumps({"premise": "a", "label": "entailment", "idx": 0}) + "\n")
    with pytest.raises(DataFormatError, match=r"train.jsonl:1: missing field\(s\) \['hypothesis'\]"):
        read_split(get_task("cb"), path)
    path.write_text(json.dumps({"idx": 0, "passage": {"text": "x"}}) + "\n")
    with pytest.raises(DataFormatError, match=r"train.jsonl:1: malformed multirc record"):
        read_split(get_task("multirc"), path)


# ---- converters ------------------------------------------------------------------------------------
def test_copa_rendering():
    ex = TASKS["copa"].convert(rows("copa", "dev")[0])
    assert ex.texts == [("The man turned on the faucet.", "What was the effect? The toilet filled with water."),
                        ("The man turned on the faucet.", "What was the effect? Water flowed from the spout.")]  # fmt: skip
    assert ex.label == 1


def test_record_candidates_and_scores():
    ex = TASKS["record"].convert(rows("record", "dev")[0])  # entities sorted; gold "Angela Merkel"
    assert len(ex.texts) == 5 and ex.label == 0
    assert ex.texts[0][0] == "Angela Merkel hosted the meeting in the capital."
    assert "@highlight" not in ex.texts[0][1] and "\n- Obama in Germany" in ex.texts[0][1]
    assert ex.candidate_scores[0] == (1.0, 1.0)
    row = {"passage": "p", "query": "@placeholder won", "entities": ["Rafael", "Rafael Nadal", "Nadal"],
           "answers": ["Rafael Nadal"]}  # fmt: skip
    ex = TASKS["record"].convert(row)
    assert ex.label == 1 and ex.candidate_scores == [(0.0, 2 / 3), (1.0, 1.0), (0.0, 2 / 3)]
    assert TASKS["record"].convert({**row, "answers": []}).label == -1


def test_multirc_group_and_text():
    mrc = [TASKS["multirc"].convert(r) for r in rows("multirc")]
    assert [ex.group for ex in mrc] == [0, 0, 0, 1, 1, (1 << 32) + 2, (1 << 32) + 2]
    assert (
        mrc[0].texts[0][0]
        == "What did the high-level effort to persuade Pakistan include? Children, Gerd, or Dorian Popa"
    )
    assert "<b>" not in mrc[0].texts[0][1] and mrc[0].texts[0][1].startswith("While this process")


def test_span_markers():
    wic = TASKS["wic"].convert(rows("wic")[0])
    assert wic.texts == [("Do you want to come over to my *place* later?",
                          "A political system with no *place* for the less prominent groups.")]  # fmt: skip
    wsc = [TASKS["wsc"].convert(r).texts[0] for r in rows("wsc")]
    assert wsc[0] == ("*Mark* told Pete many lies about himself, which Pete included in his book. "
                      "[He] should have been more truthful.", None)  # fmt: skip
    assert "*Mr. Singer* 's heels. [He] heard" in wsc[2][0]
    assert wsc[3][0].startswith("*Joe 's uncle* can")


def test_wsc_span_search_survives_bad_index():
    text = "The mothers of Arthur fetch them. They are happy to have them back."
    words = text.split()
    assert find_span(words, 9, "them") == (11, 1)  # nearest real "them"
    assert find_span(words, 0, "mothers") == (1, 1)
    assert find_span(words, 3, "nobody here") == (3, 2)  # no match: trust the index


# ---- metrics ---------------------------------------------------------------------------------------
def onehot(preds, n=2):
    return torch.nn.functional.one_hot(torch.tensor(preds), n).float()


def score(task, logits, labels, **batch):
    metrics = get_task(task).build_metrics()
    metrics.update(logits, {"labels": torch.tensor(labels), **batch})
    return metrics.compute()


def test_binary_metrics_by_hand():
    labels, preds = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # TP 2, FN 1, FP 1, TN 2
    out = score("mrpc", onehot(preds), labels)
    assert out["accuracy"] == pytest.approx(4 / 6) and out["f1"] == pytest.approx(2 / 3)
    assert out["acc_f1"] == pytest.approx(2 / 3) and set(out) == {"accuracy", "f1", "acc_f1"}
    out = score("cola", onehot(preds), labels)
    assert out["mcc"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))


def test_mcc_of_constant_predictions_is_zero_as_in_glue():
    """sklearn (GLUE's scorer) gives 0 when a marginal is empty; torchmetrics alone gives 0.41 here."""
    labels = [1, 0, 1, 1, 0, 1, 1, 1]
    assert score("cola", onehot([1] * 8), labels)["mcc"] == 0.0
    assert score("cola", onehot([0] * 8), labels)["mcc"] == 0.0
    assert score("cola", onehot(labels), labels)["mcc"] == pytest.approx(1.0)


def test_macro_f1_by_hand():
    out = score("cb", onehot([0, 1, 1, 2, 2], 3), [0, 0, 1, 2, 1])
    macro = (2 / 3 + 1 / 2 + 2 / 3) / 3
    assert out["macro_f1"] == pytest.approx(macro) and out["accuracy"] == pytest.approx(0.6)
    assert out["acc_macro_f1"] == pytest.approx((0.6 + macro) / 2)


def test_correlations_by_hand():
    out = score("stsb", torch.tensor([1.0, 2.0, 3.0, 10.0]), [1.0, 3.0, 2.0, 4.0])
    assert out["pearson"] == pytest.approx(13 / math.sqrt(50 * 5), abs=1e-5)
    assert out["spearman"] == pytest.approx(0.8, abs=1e-5)
    assert out["pearson_spearman"] == pytest.approx((13 / math.sqrt(250) + 0.8) / 2, abs=1e-5)


def test_multirc_em_groups_across_batches():
    metrics = get_task("multirc").build_metrics()
    # questions 7: [1,0,1] all right; 8: [0,1] second wrong; 9: [1] right -- split over two batches
    metrics.update(
        onehot([1, 0, 1, 0]), {"labels": torch.tensor([1, 0, 1, 0]), "group": torch.tensor([7, 7, 7, 8])}
    )
    metrics.update(onehot([0, 1]), {"labels": torch.tensor([1, 1]), "group": torch.tensor([8, 9])})
    out = metrics.compute()
    assert out["em"] == pytest.approx(2 / 3) and out["f1a"] == pytest.approx(6 / 7)
    assert out["accuracy"] == pytest.approx(5 / 6)
    metrics.reset()
    metrics.update(onehot([1]), {"labels": torch.tensor([1]), "group": torch.tensor([1])})
    assert metrics.compute()["em"] == 1.0


def test_record_metric_takes_argmax_candidate():
    logits = torch.tensor([[0.1, 0.9, 0.3], [-1.0, -2.0, float("-inf")]])
    scores = torch.tensor([[[0, 0.5], [1, 1], [0, 0]], [[0, 0.4], [0, 0.2], [0, 0]]])
    out = score("record", logits, [1, 0], candidate_scores=scores)
    assert out == pytest.approx({"em": 0.5, "f1": 0.7})


def test_nothing_seen_gives_nan():
    assert all(math.isnan(v) for v in get_task("stsb").build_metrics().compute().values())


def test_copa_accuracy():
    assert score("copa", torch.tensor([[0.2, 0.1], [0.0, 3.0], [1.0, 2.0]]), [0, 1, 0])[
        "accuracy"
    ] == pytest.approx(2 / 3)


def test_squad_normalisation():
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    assert token_f1("the Big cat", "a big dog") == pytest.approx(0.5)
    assert token_f1("", "x") == 0.0


# ---- the real shared data --------------------------------------------------------------------------
REAL_COUNTS = {
    ("sst2", "train"): 67349, ("sst2", "dev"): 872, ("cola", "train"): 8551, ("cola", "dev"): 1043,
    ("mrpc", "train"): 3667, ("mrpc", "dev"): 408, ("rte", "train"): 2490, ("rte", "dev"): 277,
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("qnli", "dev"): 5463, ("cb", "train"): 250, ("cb", "dev"): 56,
    ("copa", "train"): 400, ("copa", "dev"): 100, ("superglue-rte", "train"): 2490, ("superglue-rte", "dev"): 277,
}  # fmt: skip


@pytest.mark.parametrize(("name", "split"), list(REAL_COUNTS))
def test_real_shared_files(name, split):
    spec = get_task(name)
    path = SHARED / spec.benchmark / spec.folder / spec.files[split]
    if not path.is_file():
        pytest.skip(f"{path} absent")
    got = read_split(spec, path)
    assert len(got) == REAL_COUNTS[(name, split)]
    examples = [spec.convert(r) for r in got]
    if spec.labels:
        assert {ex.label for ex in examples} == set(range(spec.num_labels if spec.name != "copa" else 2))
