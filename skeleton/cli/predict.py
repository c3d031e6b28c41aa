"""skeleton-predict: predictions from a skeleton artifact, an export or a run folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from skeleton.export import ArtifactError, BackboneMismatchError, load_model
from skeleton.predict import predict_file
from skeleton.tasks import DataFormatError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skeleton-predict",
        description="Predict with a skeleton artifact, an export or a run folder on an official GLUE TSV / "
        "SuperGLUE JSONL file. Writes one JSON line per example; prints throughput and, when the file "
        "has gold labels, the task metrics.",
    )
    parser.add_argument(
        "artifact", help="skeleton artifact, export folder, or run folder (uses its skeleton/)"
    )
    parser.add_argument("--input", required=True, help="official-format input file (labels optional)")
    parser.add_argument("--output", default="preds.jsonl", help="where to write predictions (JSON lines)")
    parser.add_argument(
        "--backbone", help="dense backbone to rebuild a skeleton on (overrides skeleton.json)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.artifact, args.backbone)
        records, metrics, seconds = predict_file(
            model,
            args.input,
            batch_size=args.batch_size,
            max_length=args.max_length,
            limit=args.limit,
            device=args.device,
        )
    except (ArtifactError, BackboneMismatchError, DataFormatError, FileNotFoundError) as err:
        print(f"skeleton-predict: error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    rate = len(records) / max(seconds, 1e-9)
    print(f"{len(records)} examples in {seconds:.2f}s: {rate:.1f} examples/s ({args.device}); wrote {output}")
    if metrics is not None:
        print(f"{model.task.name}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
