"""skeleton-predict: predictions from a skeleton artifact, an export or a run folder.

skeleton-predict outputs/runs/sst2/minilm/<time> --input dev.tsv           # an official file
echo "a gripping film" | skeleton-predict RUN --input - --output -         # stdin to stdout
skeleton-predict RUN --input pairs.txt     # one input per line, tab-separated fields for pair tasks
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from skeleton.export import ArtifactError, BackboneMismatchError, load_model
from skeleton.predict import STDIN, predict_file, write_records
from skeleton.tasks import DataFormatError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skeleton-predict",
        description="Predict with a skeleton artifact, an export or a run folder. Inputs: an official GLUE "
        "TSV / SuperGLUE JSONL file, JSON lines with the task's field names, or plain text (one input per "
        "line, tab-separated fields for pair tasks), from a file or stdin. Writes one JSON line per "
        "example; prints throughput and, when every input has a gold label, the task metrics.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "artifact", help="skeleton artifact, export folder, or run folder (uses its skeleton/)"
    )
    parser.add_argument("--input", required=True, help="input file, or - for stdin (labels optional)")
    parser.add_argument(
        "--output", default="preds.jsonl", help="where to write predictions (JSON lines), or - for stdout"
    )
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
    if args.output == STDIN:
        sys.stdout.writelines(json.dumps(record) + "\n" for record in records)
        where, report = "stdout", sys.stderr  # the report must not mix into the predictions
    else:
        where, report = write_records(records, args.output), sys.stdout
    rate = len(records) / max(seconds, 1e-9)
    print(
        f"{len(records)} examples in {seconds:.2f}s: {rate:.1f} examples/s ({args.device}); wrote {where}",
        file=report,
    )
    if metrics is not None:
        print(
            f"{model.task.name}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()), file=report
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
