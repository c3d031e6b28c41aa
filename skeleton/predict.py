"""Batch predictions from a skeleton artifact or an export: label names, values or chosen candidates.

The library half of ``skeleton-predict`` (whose command line lives in ``skeleton.cli.predict``) and of
``PromptTunedModel.predict``. Inputs are official-format files, JSON lines with the task's field names,
plain text (one input per line, tab-separated fields), or the same things in Python: strings, tuples
and dicts.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from skeleton.data import TokenizedSplit, collator_for, tokenize
from skeleton.evaluate import to_device
from skeleton.export import tokenizer_for
from skeleton.tasks import DataFormatError, encode_label, read_split
from skeleton.tasks.readers import json_object

STDIN = "-"
# Fields a prediction row may leave out: the gold label, MultiRC's ids, ReCoRD's answers and spans.
OPTIONAL = ("label", "idx", "answers", "entity_spans")


def input_fields(spec) -> tuple[str, ...]:
    """The fields one input of ``spec`` gives, in order: ``("sentence",)`` for SST-2, ``("premise",
    "choice1", "choice2", "question")`` for COPA. Tuples and tab-separated lines follow this order."""
    fields = [f for f in spec.columns if f != "label"] if spec.columns else list(spec.fields)
    return tuple(f for f in fields if f not in OPTIONAL)


def as_row(spec, item, position: int = 0) -> dict:
    """One input (a string, a tuple of the input fields, or a dict keyed by field name) -> a row."""
    fields = input_fields(spec)
    if isinstance(item, str):
        item = (item,)
    if isinstance(item, (tuple, list)):
        if len(item) != len(fields):
            raise DataFormatError(
                f"input {position}: {spec.name} takes {len(fields)} field(s) ({', '.join(fields)}), "
                f"got {len(item)}; give a tuple in that order or a dict with those keys"
            )
        item = dict(zip(fields, item))
    if not isinstance(item, dict):
        raise DataFormatError(
            f"input {position}: expected a string, a tuple or a dict, got {type(item).__name__}"
        )
    missing = [f for f in fields if f not in item]
    if missing:
        raise DataFormatError(f"input {position}: missing field(s) {missing} for {spec.name}")
    defaults = {"idx": {"paragraph": position, "question": position, "answer": 0}, "answers": []}
    row = {k: v for k, v in defaults.items() if k in spec.fields} | item
    unlabelled = row.get("label") in (None, -1)
    row["label"] = (
        (-1 if spec.labels else -1.0) if unlabelled else encode_label(spec, row["label"], f"input {position}")
    )
    return row


def as_rows(spec, inputs) -> list[dict]:
    """One input (a string, a tuple of one input's fields, a dict) or a list of them -> rows; refuses an
    empty input."""
    if isinstance(inputs, (str, tuple, dict)):
        inputs = [inputs]
    rows = [as_row(spec, item, i) for i, item in enumerate(inputs)]
    if not rows:
        raise DataFormatError("no inputs to predict")
    return rows


def read_inputs(spec, path: str | Path) -> list[dict]:
    """Rows from an official file, JSON lines with the task's fields, plain text, or stdin (``-``)."""
    if str(path) == STDIN:
        rows = parse_text(spec, sys.stdin.read(), "stdin")
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} does not exist")
        official = ".tsv" if spec.benchmark == "glue" else ".jsonl"
        if path.suffix == official and not (spec.flatten is not None and _field_rows(spec, path)):
            rows = read_split(spec, path)
        else:
            rows = parse_text(spec, path.read_text(encoding="utf-8-sig"), str(path))
    if not rows:
        raise DataFormatError(f"{'stdin' if str(path) == STDIN else path}: no inputs to predict")
    return rows


def _field_rows(spec, path: Path) -> bool:
    """Whether a ``.jsonl`` file holds flat rows with the task's input fields, not the nested official
    records of MultiRC, ReCoRD or WSC (the other official files are flat rows already)."""
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and all(k in record for k in input_fields(spec))


def parse_text(spec, text: str, where: str) -> list[dict]:
    """JSON lines (when the first non-blank line is an object) or plain text: one input per line,
    tab-separated when the task takes several fields."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if lines and lines[0][1].lstrip().startswith("{"):
        return [as_row(spec, json_object(line, f"{where}:{n}"), i) for i, (n, line) in enumerate(lines)]
    return [as_row(spec, tuple(line.split("\t")), i) for i, (_, line) in enumerate(lines)]


def prediction_record(spec, index: int, row: dict, n_choices: int, logits: torch.Tensor) -> dict:
    """One output line: the label name (classification, COPA), the value (regression) or the chosen
    candidate (ReCoRD), plus the raw scores."""
    scores = logits[:n_choices] if spec.formulation == "multiple_choice" else logits.reshape(-1)
    record: dict = {"index": index}
    if spec.benchmark == "superglue" and "idx" in row:  # SuperGLUE submissions key on the file's idx
        record["idx"] = row["idx"]
    if spec.formulation == "regression":
        record["prediction"] = float(scores[0])
    else:
        best = int(scores.argmax())
        if spec.labels is not None:
            record["prediction"] = spec.labels[best]
        elif "entities" in row:
            record["prediction"] = row["entities"][best]
        else:
            record["prediction"] = best
    record["scores"] = [round(float(s), 6) for s in scores]
    return record


def default_max_length(model) -> int:
    """The longest input the backbone takes beside the soft prompt (at most 512 tokens)."""
    positions = getattr(model.backbone.config, "max_position_embeddings", 512)
    return max(8, min(512, positions - model.prompt.num_tokens - 2))


def _tokenizer(model):
    """The model's tokenizer, loaded once per model (a load takes longer than a small batch)."""
    if getattr(model, "_predict_tokenizer", None) is None:
        model._predict_tokenizer = tokenizer_for(model)
    return model._predict_tokenizer


@torch.inference_mode()
def predict_rows(model, rows: list[dict], *, batch_size=64, max_length=None, device=None):
    """Predict rows on ``device`` (default: the model's). Returns (records, metrics or None, seconds);
    metrics only when every row has a gold label. The model's train/eval mode is restored."""
    spec = model.task
    examples = [spec.convert(row) for row in rows]
    tokenizer = _tokenizer(model)
    dataset = TokenizedSplit(tokenize(examples, tokenizer, max_length or default_max_length(model)))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator_for(tokenizer, spec))
    labelled = bool(examples) and all(ex.label != -1 for ex in examples)
    metrics = spec.build_metrics() if labelled else None
    device = device or model.device
    training = model.training
    model.to(device).eval()
    outputs = []
    started = time.perf_counter()
    for batch in loader:
        logits = model(to_device(batch, device)).float().cpu()
        outputs.append(logits)
        if metrics is not None:
            metrics.update(logits, batch)
    seconds = time.perf_counter() - started
    model.train(training)
    logits = [row for out in outputs for row in out]
    records = [
        prediction_record(spec, i, row, len(ex.texts), lg)
        for i, (row, ex, lg) in enumerate(zip(rows, examples, logits))
    ]
    return records, (metrics.compute() if metrics is not None else None), seconds


def predict(model, inputs, *, batch_size: int = 64, max_length: int | None = None) -> list[dict]:
    """``PromptTunedModel.predict``: strings, tuples of the task's fields, or dicts keyed by them, ->
    one record per input with ``prediction`` (label name, value or chosen candidate) and ``scores``."""
    records, _, _ = predict_rows(
        model, as_rows(model.task, inputs), batch_size=batch_size, max_length=max_length
    )
    return records


def predict_file(model, input_path, *, batch_size=64, max_length=128, limit=None, device="cpu"):
    """Predict every example of an input file (see ``read_inputs``). Returns (records, metrics or None,
    seconds)."""
    rows = read_inputs(model.task, input_path)[:limit]
    return predict_rows(model, rows, batch_size=batch_size, max_length=max_length, device=device)


def write_records(records: Iterable[dict], output: str | Path) -> Path:
    """JSON lines into a temporary file renamed over ``output`` at the end: an existing output is
    never replaced by a partial or empty one."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output
