"""model.predict for every formulation, the same answers as predict_file, and skeleton-predict's inputs."""

import io
import json

import pytest
import torch

from skeleton.cli.predict import main as predict_main
from skeleton.export import save_skeleton
from skeleton.predict import input_fields, predict_file
from skeleton.prompt import PromptTunedModel
from skeleton.tasks import DataFormatError, get_task, read_split
from tests.helpers import FIXTURES

MAX_LENGTH = 64


def _model(task: str) -> PromptTunedModel:
    return PromptTunedModel(backbone="tiny:bert", task=task, prompt={"num_tokens": 3})


def _file(task: str):
    spec = get_task(task)
    return FIXTURES / spec.benchmark / spec.folder / spec.files["dev"]


def _without_index(records):
    return [{k: v for k, v in r.items() if k != "index"} for r in records]


@pytest.mark.parametrize("task", ["sst2", "stsb", "copa"])
def test_predict_equals_predict_file_on_the_same_rows(task):
    model = _model(task)
    rows = read_split(model.task, _file(task))
    from_file, _, _ = predict_file(model, _file(task), max_length=MAX_LENGTH, batch_size=2)
    direct = model.predict(rows, batch_size=3, max_length=MAX_LENGTH)  # other batching, same answers
    assert len(direct) == len(rows) >= 2
    assert _without_index(direct) == _without_index(from_file)


def test_classification_returns_label_names_and_one_score_per_class():
    model = _model("sst2")
    records = model.predict(["a gripping film", "dull and long"])
    assert [r["index"] for r in records] == [0, 1]
    assert all(r["prediction"] in ("negative", "positive") and len(r["scores"]) == 2 for r in records)
    best = [("negative", "positive")[max(range(2), key=lambda i: r["scores"][i])] for r in records]
    assert best == [r["prediction"] for r in records]


def test_regression_takes_pairs_and_returns_a_value():
    model = _model("stsb")
    (record,) = model.predict(("A man is dancing.", "A man dances."))  # a tuple is one input
    assert isinstance(record["prediction"], float) and record["scores"] == [round(record["prediction"], 6)]


def test_multiple_choice_takes_the_task_fields_and_names_the_choice():
    model = _model("copa")
    row = {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "question": "effect"}
    with pytest.raises(DataFormatError, match="choice2"):
        model.predict(row)
    (record,) = model.predict({**row, "choice2": "Water flowed."})
    assert record["prediction"] in ("choice1", "choice2") and len(record["scores"]) == 2


def test_a_pair_task_refuses_a_bare_string_naming_its_fields():
    with pytest.raises(DataFormatError, match="sentence1, sentence2"):
        _model("rte").predict("only one sentence")
    with pytest.raises(DataFormatError, match="no inputs"):
        _model("rte").predict([])


def test_predict_runs_in_inference_mode_and_restores_training_mode(monkeypatch):
    model = _model("sst2").train()
    seen = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda batch: seen.append(torch.is_inference_mode_enabled()) or forward(batch)
    )
    model.predict(["one", "two", "three"], batch_size=2)
    assert seen == [True, True]  # two batches, both under inference mode
    assert model.training


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """An unpruned skeleton artifact per task: what a run folder's skeleton/ holds."""
    root = tmp_path_factory.mktemp("artifacts")

    def make(task):
        model = _model(task)
        widths = [layer.intermediate.dense.out_features for layer in model.backbone.encoder.layer]
        keep = [torch.arange(w) for w in widths]
        return str(save_skeleton(model, root / task, keep_ffn=keep, dense_identity=model.backbone_identity()))

    return {task: make(task) for task in ("sst2", "rte")}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_reads_stdin_and_writes_stdout(artifacts, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a gripping film\n\ndull and long\n"))
    assert predict_main([artifacts["sst2"], "--input", "-", "--output", "-"]) == 0
    out = capsys.readouterr()
    records = [json.loads(line) for line in out.out.splitlines()]
    assert [r["prediction"] in ("negative", "positive") for r in records] == [True, True]
    assert "examples/s" in out.err


def test_cli_reads_tab_separated_pairs_and_jsonl_with_field_names(artifacts, tmp_path):
    assert input_fields(get_task("rte")) == ("sentence1", "sentence2")
    text = tmp_path / "pairs.txt"
    text.write_text("It rains.\tThe street is wet.\nA cat sleeps.\tAn animal rests.\n")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"sentence1": a, "sentence2": b}) + "\n"
            for a, b in (("It rains.", "The street is wet."),)
        )
    )
    out_text, out_jsonl = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert predict_main([artifacts["rte"], "--input", str(text), "--output", str(out_text)]) == 0
    assert predict_main([artifacts["rte"], "--input", str(jsonl), "--output", str(out_jsonl)]) == 0
    assert len(_lines(out_text)) == 2 and _lines(out_jsonl)[0]["scores"] == _lines(out_text)[0]["scores"]


def test_cli_refuses_an_empty_input_and_keeps_the_old_output(artifacts, tmp_path, capsys):
    empty, output = tmp_path / "empty.txt", tmp_path / "preds.jsonl"
    empty.write_text("\n")
    output.write_text('{"earlier": true}\n')
    assert predict_main([artifacts["sst2"], "--input", str(empty), "--output", str(output)]) == 2
    assert "no inputs" in capsys.readouterr().err
    assert output.read_text() == '{"earlier": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "preds.jsonl"]  # no temp file left


def test_cli_refuses_a_wrong_field_count_with_the_fields(artifacts, tmp_path, capsys):
    text = tmp_path / "single.txt"
    text.write_text("just one sentence\n")
    assert predict_main([artifacts["rte"], "--input", str(text), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "sentence1, sentence2" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["boolq", "cb", "multirc", "wsc"])
def test_official_superglue_files_keep_their_encoded_labels(task):
    """Flat official files (BoolQ's JSON bools, CB's label names) and nested ones (MultiRC, WSC) read
    as the training data does, so their metrics can be computed."""
    model = _model(task)
    records, metrics, _ = predict_file(model, _file(task), max_length=MAX_LENGTH)
    assert len(records) == len(read_split(model.task, _file(task))) and metrics is not None


def test_jsonl_rows_with_field_names_and_label_names_get_metrics(artifacts, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence": "fine", "label": "positive"}\n{"sentence": "awful", "label": "negative"}\n')
    assert predict_main([artifacts["sst2"], "--input", str(rows), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_multirc_rows_with_field_names_are_not_taken_for_official_records(tmp_path):
    model = _model("multirc")
    rows = tmp_path / "rows.jsonl"
    row = {"paragraph": "Sent 1: The sky is blue.", "question": "What colour is it?", "answer": "Blue"}
    rows.write_text(json.dumps(row) + "\n")
    records, metrics, _ = predict_file(model, rows, max_length=MAX_LENGTH)
    assert records[0]["prediction"] in ("False", "True") and metrics is None
