"""Readers for the official GLUE (TSV) and SuperGLUE (JSONL) downloads.

They yield rows with the Hugging Face hub's field names and label encoding (labels as ints via the spec's
label list, -1 when a split is unlabelled), so one converter per task serves the hub and local files
alike. Nested SuperGLUE files (MultiRC, ReCoRD, WSC) are flattened exactly as the hub's builder does.
Every malformed row fails loudly with file:line, because a silently skipped row shifts reported scores.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from skeleton.tasks.registry import TaskSpec

# Long passages (BoolQ, MultiRC, ReCoRD) exceed csv's 128 KB default; the tokenizer truncates them later.
# The limit is a C long, so cap at 2**31 - 1 where sys.maxsize would overflow it.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataFormatError(ValueError):
    """A row of an official file does not have the expected shape or label."""


def read_split(spec: TaskSpec, path: str | Path) -> list[dict]:
    """All rows of one official file as hub-style dicts. A file that is not UTF-8 or holds no rows fails
    naming the file: both mean a broken download, and an empty split only crashes much later."""
    path = Path(path)
    try:
        rows = read_tsv(spec, path) if path.suffix == ".tsv" else read_jsonl(spec, path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not rows:
        raise DataFormatError(
            f"{path}: no rows for {spec.name} (the file is empty or holds only a header). "
            f"Fix: download the official file again, or point paths.data_dir at a complete copy."
        )
    return rows


def not_utf8(path: Path) -> DataFormatError:
    """The first undecodable line of `path`, found line by line (no UTF-8 character spans a newline)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = line[e.start]
                return DataFormatError(
                    f"{path}:{n}: not valid UTF-8 (byte 0x{byte:02x} at column {e.start + 1}); the official "
                    f"files are UTF-8. Fix: re-encode it as UTF-8, e.g. "
                    f"`iconv -f latin1 -t utf-8 {path} > {path}.utf8` and move {path.name}.utf8 over it."
                )
    return DataFormatError(f"{path}: not valid UTF-8. Fix: re-encode it as UTF-8 (e.g. with iconv).")


def encode_label(spec: TaskSpec, value, where: str) -> int | float:
    """Official label -> hub encoding: a float for regression, else the class index. Accepts the label
    name ("entailment"), its index as int or digit string ("1", GLUE's binary tasks) or a JSON bool."""
    if spec.labels is None:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataFormatError(f"{where}: regression target {value!r} is not a number") from None
    if isinstance(value, bool) and len(spec.labels) == 2:
        return int(value)
    if value in spec.labels:
        return spec.labels.index(value)
    if isinstance(value, (int, str)) and str(value).isdigit() and int(value) < len(spec.labels):
        return int(value)
    raise DataFormatError(
        f"{where}: unknown label {value!r} for {spec.name}; allowed: {', '.join(spec.labels)} "
        f"(or their indices 0..{len(spec.labels) - 1})"
    )


def read_tsv(spec: TaskSpec, path: Path) -> list[dict]:
    """GLUE TSV. Quoting is off (sentences hold bare double quotes); utf-8-sig drops MRPC's BOM. The
    header is read from the file unless the spec names the columns of a header-less file (CoLA)."""
    rows: list[dict] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first = next(reader, None)
        if first is None:
            return rows
        needed = [c for field, c in spec.columns.items() if field != "label"]
        pending = False
        if all(c in first for c in needed):
            header = first
        elif spec.header is not None:
            header, pending = list(spec.header), True
        else:
            raise DataFormatError(f"{path}:1: header {first} lacks column(s) {needed} for {spec.name}")
        index = {field: header.index(c) for field, c in spec.columns.items() if c in header}
        numbered = ((reader.line_num, line) for line in reader)
        for n, line in chain([(1, first)], numbered) if pending else numbered:
            if not line:
                continue
            where = f"{path}:{n}"
            if len(line) != len(header):
                raise DataFormatError(
                    f"{where}: expected {len(header)} tab-separated columns ({', '.join(header)}), "
                    f"got {len(line)}"
                )
            row = {field: line[i] for field, i in index.items()}
            if "label" in row:
                row["label"] = encode_label(spec, row["label"], where)
            else:  # unlabelled (test) split
                row["label"] = -1 if spec.labels else -1.0
            row["idx"] = len(rows)
            rows.append(row)
    return rows


def json_object(line: str, where: str) -> dict:
    """One JSON-lines record, or a DataFormatError naming ``where`` (file:line) and what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(spec: TaskSpec, path: Path) -> list[dict]:
    """SuperGLUE JSONL, one official record per line, flattened to hub rows by `spec.flatten`."""
    rows: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            record = json_object(line, where)
            try:
                flat = list(spec.flatten(record)) if spec.flatten else [dict(record)]
            except (KeyError, TypeError) as e:
                raise DataFormatError(
                    f"{where}: malformed {spec.name} record ({type(e).__name__}: {e})"
                ) from None
            for raw in flat:
                missing = [k for k in spec.fields if k not in raw]
                if missing:
                    raise DataFormatError(f"{where}: missing field(s) {missing} for {spec.name}")
                row = {k: raw[k] for k in (*spec.fields, "idx", "label") if k in raw}  # the hub's keys only
                if "label" in row:
                    row["label"] = encode_label(spec, row["label"], where)
                elif spec.labels is not None:
                    row["label"] = -1
                rows.append(row)
    return rows


# ---- flatteners: nested official records -> the hub's rows ------------------------------------------
def flatten_wsc(record: dict) -> Iterator[dict]:
    """WSC keeps its spans under "target"; the hub lifts them to the top level."""
    row = {k: v for k, v in record.items() if k != "target"}
    yield {**row, **record["target"]}


def flatten_multirc(record: dict) -> Iterator[dict]:
    """One row per (question, answer option), as the hub has it."""
    passage = record["passage"]
    for q in passage["questions"]:
        for a in q["answers"]:
            row = {
                "paragraph": passage["text"],
                "question": q["question"],
                "answer": a["text"],
                "idx": {"paragraph": record["idx"], "question": q["idx"], "answer": a["idx"]},
            }
            if "label" in a:
                row["label"] = a["label"]
            yield row


def flatten_record(record: dict) -> Iterator[dict]:
    """One row per query. Official entity offsets are inclusive; like the hub, entities and answers are
    sorted unique strings and entity_spans carry exclusive ends."""
    text = record["passage"]["text"]
    spans = [(e["start"], e["end"] + 1) for e in record["passage"]["entities"]]
    entity_spans = {
        "text": [text[s:e] for s, e in spans],
        "start": [s for s, _ in spans],
        "end": [e for _, e in spans],
    }
    entities = sorted(set(entity_spans["text"]))
    for qa in record["qas"]:
        yield {
            "passage": text,
            "query": qa["query"],
            "entities": entities,
            "entity_spans": entity_spans,
            "answers": sorted({a["text"] for a in qa.get("answers", [])}),
            "idx": {"passage": record["idx"], "query": qa["idx"]},
        }
