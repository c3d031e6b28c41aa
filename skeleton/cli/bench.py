"""skeleton-bench: dense vs pruned latency of an artifact, an export or a run folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from skeleton.bench import benchmark, default_devices, load_pair, machine_load, parameter_summary
from skeleton.export import ArtifactError, BackboneMismatchError, resolve_artifact
from skeleton.fastpath import DTYPES, PATHS, PathUnsupportedError
from skeleton.localize import UnsupportedArchitectureError, check_adapter


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,8,32, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _paths(text: str) -> list[str]:
    paths = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if not paths or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown path(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(PATHS)}, e.g. eager,sdpa"
        )
    if len(set(paths)) != len(paths):
        raise argparse.ArgumentTypeError(f"a path is named twice in {text!r}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skeleton-bench",
        description="Time the dense and the pruned model, interleaved, and compare with the FLOP-ideal speedup.",
    )
    parser.add_argument(
        "artifact", help="skeleton artifact, export folder, or run folder (uses its skeleton/)"
    )
    parser.add_argument(
        "--backbone", help="dense backbone to rebuild a skeleton on (overrides skeleton.json)"
    )
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    parser.add_argument("--seq-lens", type=_ints, default=[32, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument(
        "--paths",
        type=_paths,
        default=None,
        help=f"comma-separated inference paths, each timed for dense and pruned ({', '.join(PATHS)}); "
        "default: the attention transformers picks (sdpa where the family has it, else eager)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of the compile path"
    )
    parser.add_argument("--output", default="bench.json", help="where to write the rows as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    devices = default_devices() if args.device == "all" else (args.device,)
    try:
        path = resolve_artifact(args.artifact)
        dense, pruned = load_pair(path, args.backbone)
        check_adapter(dense.backbone, heads=False)  # the family's layers are found as the artifact expects
    except (ArtifactError, BackboneMismatchError, FileNotFoundError, UnsupportedArchitectureError) as err:
        print(f"skeleton-bench: error: {err}", file=sys.stderr)
        return 2
    try:
        rows = benchmark(
            dense, pruned, args.batch_sizes, args.seq_lens, devices, args.repeats, args.warmup,
            paths=args.paths, dtype=args.dtype, compile_backend=args.compile_backend,
        )  # fmt: skip
    except PathUnsupportedError as err:
        print(f"skeleton-bench: error: {err}", file=sys.stderr)
        return 2
    result = {
        "artifact": str(path),
        "task": pruned.task.name,
        "params": parameter_summary(dense, pruned),
        "paths": list(dict.fromkeys(r["path"] for r in rows)),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_per_core": machine_load(),  # 1-minute load average per core when the run ended
        "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
        "rows": rows,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
