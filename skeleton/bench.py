"""Dense vs pruned latency, measured the way shared, noisy machines allow: interleaved calls, medians,
and speedups read as ratios within one run, next to the FLOP-based ideal speedup.

    skeleton-bench runs/sst2/0                      # a run folder (uses its skeleton/), an artifact or an export
    skeleton-bench artifact --device all --batch-sizes 1,32 --seq-lens 128 --output bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from skeleton.evaluate import to_device
from skeleton.localize import backbone_flops, count_parameters


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _num_examples(batch: dict) -> int:
    return batch["input_ids"].shape[0] // max(int(batch.get("num_choices", 1) or 1), 1)


def _stats(times_ms: list[float], examples: int) -> dict:
    median = statistics.median(times_ms)
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(times_ms, 90)),
        "throughput": examples / (median / 1000) if median > 0 else float("inf"),
        "batch_size": examples,
        "repeats": len(times_ms),
    }


@torch.inference_mode()
def measure_latency(models: dict[str, nn.Module], batch: dict, *, repeats: int = 20, warmup: int = 3) -> dict:
    """Forward latency of each model on the same batch, calls interleaved (a, b, a, b, ...) so that load
    from other processes and CPU frequency drift hit every model alike. Returns per model median_ms,
    p90_ms, throughput (examples/s at the median), batch_size and repeats.

    Models run in eval mode and get every submodule's mode back exactly afterwards; the batch is moved to
    each model's device once; CUDA is synchronised around each call so a call is timed to its end."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    devices = {name: _device_of(m) for name, m in models.items()}
    on_device = {str(d): to_device(batch, d) for d in devices.values()}
    sync = any(d.type == "cuda" for d in devices.values())
    modes = [(mod, mod.training) for m in models.values() for mod in m.modules()]  # exact, per submodule
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        for step in range(warmup + repeats):
            for name, model in models.items():
                if sync:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(on_device[str(devices[name])])
                if sync:
                    torch.cuda.synchronize()
                if step >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    finally:
        for mod, mode in modes:
            mod.training = mode
    examples = _num_examples(batch)
    return {name: _stats(t, examples) for name, t in times.items()}


def synthetic_batch(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict:
    """Random token ids with a full attention mask, one choice per example: latency depends on shapes,
    not on the text. Ids avoid the start of the vocabulary, where BERT-style models keep special tokens."""
    vocab = model.backbone.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch_size, seq_len), generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "num_choices": 1,
    }
    if getattr(model, "task_formulation", None) == "multiple_choice":
        batch["choice_mask"] = torch.ones(batch_size, 1, dtype=torch.bool)
    return to_device(batch, device or _device_of(model))


def default_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def parameter_summary(dense: nn.Module, pruned: nn.Module) -> dict:
    """Backbone parameter counts. `layers` (the transformer layers alone) is what pruning shrinks; the
    total also holds the embeddings (about half of MiniLM), which pruning does not touch."""
    return {"dense": count_parameters(dense.backbone), "pruned": count_parameters(pruned.backbone)}


def _seen_length(model: nn.Module, seq_len: int) -> int:
    """Tokens the backbone actually processes: the text plus the soft prompt."""
    prompt = getattr(model, "prompt", None)
    return seq_len + (prompt.num_tokens if prompt is not None else 0)


def benchmark(
    dense: nn.Module,
    pruned: nn.Module,
    batch_sizes: Sequence[int] = (1, 8, 32),
    seq_lens: Sequence[int] = (32, 128),
    devices: Sequence[str] | None = None,
    repeats: int = 20,
    warmup: int = 3,
    show: bool = True,
) -> list[dict]:
    """One row per (device, batch size, sequence length): measured latency and speedup next to the ideal
    (FLOP ratio) speedup, plus backbone and layer-only parameter counts. Models are moved to each device
    in turn and moved back at the end. Prints a rich table unless show=False."""
    params = parameter_summary(dense, pruned)
    homes = [(m, _device_of(m)) for m in (dense, pruned)]
    rows = []
    try:
        for device in devices or default_devices():
            dense.to(device), pruned.to(device)
            for seq_len in seq_lens:
                seen = _seen_length(pruned, seq_len)
                flops = (
                    backbone_flops(dense.backbone, seen)["total"],
                    backbone_flops(pruned.backbone, seen)["total"],
                )
                for batch_size in batch_sizes:
                    batch = synthetic_batch(pruned, batch_size, seq_len, device=device)
                    t = measure_latency(
                        {"dense": dense, "pruned": pruned}, batch, repeats=repeats, warmup=warmup
                    )
                    rows.append(_row(device, batch_size, seq_len, t, flops, params))
    finally:
        for model, home in homes:
            model.to(home)
    if show:
        print_table(rows, params)
    return rows


def _row(device: str, batch_size: int, seq_len: int, t: dict, flops: tuple[int, int], params: dict) -> dict:
    d, p = t["dense"], t["pruned"]
    return {
        "device": device,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dense_ms": d["median_ms"],
        "pruned_ms": p["median_ms"],
        "dense_p90_ms": d["p90_ms"],
        "pruned_p90_ms": p["p90_ms"],
        "dense_throughput": d["throughput"],
        "pruned_throughput": p["throughput"],
        "speedup": d["median_ms"] / max(p["median_ms"], 1e-9),
        "ideal_speedup": flops[0] / max(flops[1], 1),
        "dense_gflops": batch_size * flops[0] / 1e9,
        "pruned_gflops": batch_size * flops[1] / 1e9,
        "dense_params": params["dense"]["total"],
        "pruned_params": params["pruned"]["total"],
        "dense_layer_params": params["dense"]["layers"],
        "pruned_layer_params": params["pruned"]["layers"],
        "repeats": d["repeats"],
    }


def print_table(rows: list[dict], params: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title="dense vs pruned: medians of interleaved runs",
        caption="ideal = dense / pruned FLOPs of the transformer layers",
    )
    for name in ("device", "batch", "seq", "dense ms", "pruned ms", "speedup", "ideal", "pruned ex/s"):
        table.add_column(name, justify="left" if name == "device" else "right")
    for r in rows:
        table.add_row(
            r["device"], str(r["batch_size"]), str(r["seq_len"]), f"{r['dense_ms']:.2f}", f"{r['pruned_ms']:.2f}",
            f"x{r['speedup']:.2f}", f"x{r['ideal_speedup']:.2f}", f"{r['pruned_throughput']:.1f}",
        )  # fmt: skip
    console.print(table)
    d, p = params["dense"], params["pruned"]
    for label, key in (("backbone", "total"), ("layers only", "layers"), ("FFN", "ffn")):
        share = 100 * p[key] / max(d[key], 1)
        console.print(f"{label:>12} params: {d[key]:,} -> {p[key]:,} ({share:.1f}%)")


# ---- command line --------------------------------------------------------------------------------
def dense_twin(pruned: nn.Module) -> nn.Module:
    """A dense copy of an exported model for timing: same config without the pruned widths, random
    weights (latency depends on shapes only), so no dense weights are needed."""
    from transformers import AutoModel

    config = copy.deepcopy(pruned.backbone.config)
    for key in ("skeleton_ffn_widths", "skeleton_heads_per_layer"):
        if hasattr(config, key):
            delattr(config, key)
    twin = copy.deepcopy(pruned)
    twin.backbone = AutoModel.from_config(config).eval().requires_grad_(False)
    return twin


def load_pair(path: str | Path, backbone: str | None = None) -> tuple[nn.Module, nn.Module]:
    """(dense, pruned) models for an artifact, an export or a run folder."""
    from skeleton.export import KIND_EXPORT, apply_keep, build_dense, load_pruned, read_meta

    if read_meta(path)["kind"] == KIND_EXPORT:
        pruned = load_pruned(path)
        return dense_twin(pruned), pruned
    dense = build_dense(path, backbone)
    return dense, apply_keep(copy.deepcopy(dense), path)


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
    parser.add_argument("--output", default="bench.json", help="where to write the rows as JSON")
    args = parser.parse_args(argv)
    from skeleton.export import ArtifactError, BackboneMismatchError, resolve_artifact

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    devices = default_devices() if args.device == "all" else (args.device,)
    try:
        path = resolve_artifact(args.artifact)
        dense, pruned = load_pair(path, args.backbone)
    except (ArtifactError, BackboneMismatchError, FileNotFoundError) as err:
        print(f"skeleton-bench: error: {err}", file=sys.stderr)
        return 2
    rows = benchmark(dense, pruned, args.batch_sizes, args.seq_lens, devices, args.repeats, args.warmup)
    result = {
        "artifact": str(path),
        "task": pruned.task.name,
        "params": parameter_summary(dense, pruned),
        "torch_threads": torch.get_num_threads(),
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
