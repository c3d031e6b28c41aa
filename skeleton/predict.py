"""Batch predictions from a skeleton artifact or an export: label names, values or chosen candidates.

The library half of ``skeleton-predict`` (whose command line lives in ``skeleton.cli.predict``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from skeleton.data import TokenizedSplit, collator_for, tokenize
from skeleton.evaluate import to_device
from skeleton.export import tokenizer_for
from skeleton.tasks import DataFormatError, read_split


def read_inputs(spec, path: str | Path) -> list[dict]:
    """Rows of an official-format file, refusing the other benchmark's format up front."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    wanted = ".tsv" if spec.benchmark == "glue" else ".jsonl"
    if path.suffix != wanted:
        raise DataFormatError(
            f"{path}: {spec.name} inputs are {spec.benchmark.upper()} {wanted[1:].upper()} files "
            f"(like the official {spec.files.get('dev', spec.files.get('test'))}); got a {path.suffix or 'suffix-less'} file"
        )
    return read_split(spec, path)


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


@torch.inference_mode()
def predict_file(model, input_path, *, batch_size=64, max_length=128, limit=None, device="cpu"):
    """Predict every example of an official-format file. Returns (records, metrics or None, seconds)."""
    spec = model.task
    rows = read_inputs(spec, input_path)[:limit]
    examples = [spec.convert(row) for row in rows]
    tokenizer = tokenizer_for(model)
    dataset = TokenizedSplit(tokenize(examples, tokenizer, max_length))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator_for(tokenizer, spec))
    labelled = bool(examples) and all(ex.label != -1 for ex in examples)
    metrics = spec.build_metrics() if labelled else None
    model.to(device).eval()
    outputs = []
    started = time.perf_counter()
    for batch in loader:
        logits = model(to_device(batch, device)).float().cpu()
        outputs.append(logits)
        if metrics is not None:
            metrics.update(logits, batch)
    seconds = time.perf_counter() - started
    logits = [row for out in outputs for row in out]
    records = [
        prediction_record(spec, i, row, len(ex.texts), lg)
        for i, (row, ex, lg) in enumerate(zip(rows, examples, logits))
    ]
    return records, (metrics.compute() if metrics is not None else None), seconds
