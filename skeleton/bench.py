"""Dense vs pruned latency, measured the way shared, noisy machines allow: interleaved calls, medians,
and speedups read as ratios within one run, next to the FLOP-based ideal speedup.

    skeleton-bench runs/sst2/0                      # a run folder (uses its skeleton/), an artifact or an export
    skeleton-bench artifact --device all --batch-sizes 1,32 --seq-lens 128 --output bench.json
    skeleton-bench artifact --device cpu --paths eager,sdpa,compile,int8    # each path: dense and pruned
"""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import AutoModel

from skeleton.evaluate import to_device
from skeleton.export import KIND_EXPORT, apply_keep, build_dense, load_pruned, read_meta
from skeleton.fastpath import (
    PathUnsupportedError,
    as_dtype,
    attention_for,
    check_path,
    default_path,
    dtype_name,
    prepare,
)
from skeleton.localize import backbone_flops, count_parameters
from skeleton.timing import OtherLoad, interleaved_ms, machine_load, shared_cpu


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
    try:
        for m in models.values():
            m.eval()
        calls = {
            name: functools.partial(model, on_device[str(devices[name])]) for name, model in models.items()
        }
        times = interleaved_ms(calls, repeats=repeats, warmup=warmup, sync=sync)
    finally:
        for mod, mode in modes:
            mod.training = mode
    examples = _num_examples(batch)
    return {name: _stats(t, examples) for name, t in times.items()}


def first_examples(batch: dict, n: int) -> dict:
    """The first ``n`` examples of a batch: ``n * num_choices`` backbone rows, ``n`` labels."""
    rows = batch["input_ids"].shape[0]
    choices = batch.get("num_choices", 1)
    keep = {rows: n * choices, rows // choices: n}

    def cut(value):
        if torch.is_tensor(value) and value.dim() and value.shape[0] in keep:
            return value[: keep[value.shape[0]]]
        return value

    return {k: cut(v) for k, v in batch.items()}


def measure_speedup(model: nn.Module, dense_backbone: nn.Module, loader, bench) -> dict:
    """Dense vs pruned on one real batch of ``loader`` (sorted by length: the middle batch is typical),
    interleaved, medians. ``model`` is the pruned model; its prompt and head run on both backbones.
    Also says whether the timing can be trusted: the spread of the repeats and the machine's load."""
    batches = list(loader)
    if not batches:
        raise ValueError("cannot time the models: the dev split is empty")
    batch = first_examples(batches[len(batches) // 2], bench.batch_size)
    batch = to_device(batch, _device_of(model))
    with OtherLoad() as others:
        timings = measure_latency(
            {"dense": model.on_backbone(dense_backbone), "pruned": model}, batch, repeats=bench.repeats
        )
    dense_ms, pruned_ms = timings["dense"]["median_ms"], timings["pruned"]["median_ms"]
    spread = max(t["p90_ms"] / max(t["median_ms"], 1e-9) for t in timings.values())
    load = machine_load()
    return {
        "batch_size": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "dense_ms": dense_ms,
        "pruned_ms": pruned_ms,
        "speedup": dense_ms / max(pruned_ms, 1e-9),
        "device": str(_device_of(model)),
        "spread": round(spread, 3),
        "load": None if load is None else round(load, 2),
        "others": None if others.value is None else round(others.value, 3),
        "reliable": spread <= MAX_SPREAD and not shared_cpu(others.value, load),
    }


MAX_SPREAD = 1.5  # p90 / median of the repeats above this: other work interfered with the timing


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
    total also holds the embeddings, which pruning does not touch."""
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
    *,
    paths: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    compile_backend: str = "inductor",
) -> list[dict]:
    """One row per (device, sequence length, batch size, path): dense and pruned latency on that path, their
    speedup next to the ideal (FLOP ratio) speedup, and parameter counts. `paths` (see `skeleton.fastpath`;
    default: the one transformers picks, sdpa where the family has it) are all checked before anything is
    timed, and every path's dense and pruned models are called interleaved in one loop, so
    `speedup_vs_base` (the first path's dense ms / this path's pruned ms) compares within one run too.
    The models passed in are never changed: each path runs on prepared copies. Prints a table unless
    show=False."""
    params = parameter_summary(dense, pruned)
    paths = list(paths or [default_path(pruned)])
    if len(set(paths)) != len(paths):
        raise ValueError(f"paths repeat: {paths}")
    devices = list(devices or default_devices())
    options = {"dtype": dtype, "compile_backend": compile_backend}
    for device in devices:  # every refusal before the first timing
        for path in paths:
            for model in (dense, pruned):
                check_path(model, path, device=device, **options)
    rows = []
    for device in devices:
        models = {}
        for path in paths:
            models[f"{path}/dense"] = prepare(dense, path, device=device, **options)
            models[f"{path}/pruned"] = prepare(pruned, path, device=device, **options)
        for seq_len in seq_lens:
            seen = _seen_length(pruned, seq_len)
            flops = (
                backbone_flops(dense.backbone, seen)["total"],
                backbone_flops(pruned.backbone, seen)["total"],
            )
            for batch_size in batch_sizes:
                batch = synthetic_batch(pruned, batch_size, seq_len, device=device)
                if "compile" in paths:
                    _compile_for(models, batch)
                t = measure_latency(models, batch, repeats=repeats, warmup=warmup)
                base = t[f"{paths[0]}/dense"]["median_ms"]
                for path in paths:
                    pair = {"dense": t[f"{path}/dense"], "pruned": t[f"{path}/pruned"]}
                    row = _row(device, batch_size, seq_len, pair, flops, params)
                    row.update(
                        path=path,
                        attention=attention_for(pruned, path),
                        dtype=dtype_name(as_dtype(dtype)),
                        tokens=seen,
                        base_path=paths[0],
                        speedup_vs_base=base / max(row["pruned_ms"], 1e-9),
                    )
                    rows.append(row)
        del models
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if show:
        print_table(rows, params)
    return rows


def _compile_for(models: dict[str, nn.Module], batch: dict) -> None:
    """Compile the `compile` path's models for this batch's shape, outside the timed calls. Compiled code
    is specialised to one shape, so the caches are cleared first: a long grid would otherwise hit
    dynamo's recompile limit and silently fall back to uncompiled code."""
    torch._dynamo.reset()
    with torch.inference_mode():
        for name, model in models.items():
            if name.startswith("compile/"):
                try:
                    model(to_device(batch, _device_of(model)))
                except Exception as err:  # inductor/dynamo failures are long; the first line names them
                    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                    raise PathUnsupportedError("compile", f"torch.compile failed: {first[:300]}") from err


def _row(device: str, batch_size: int, seq_len: int, t: dict, flops: tuple[int, int], params: dict) -> dict:
    """Dense and pruned figures of one timing pair (`t`: their measure_latency stats)."""
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


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def print_table(rows: list[dict], params: dict, console=None) -> None:
    """Rows per path side by side. `vs base` is the first path's dense latency over this row's pruned one:
    what pruning and the path buy together."""
    console = console or Console()
    base = rows[0].get("base_path", "") if rows else ""
    table = Table(
        title="dense vs pruned: medians of interleaved runs",
        caption="ideal = dense / pruned FLOPs of the transformer layers",
        box=box.SIMPLE_HEAD,
    )
    columns = ("device", "batch", "seq", "path", "dense ms", "pruned ms", "speedup", "ideal", "vs base")
    for name in columns:
        table.add_column(name, justify="left" if name in ("device", "path") else "right")
    for r in rows:
        table.add_row(
            r["device"], str(r["batch_size"]), str(r["seq_len"]), r.get("path", ""), _ms(r["dense_ms"]),
            _ms(r["pruned_ms"]), f"x{r['speedup']:.2f}", f"x{r['ideal_speedup']:.2f}",
            f"x{r.get('speedup_vs_base', r['speedup']):.2f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"vs base = dense {base} ms / pruned ms of the row")
    d, p = params["dense"], params["pruned"]
    for label, key in (("backbone", "total"), ("layers only", "layers"), ("FFN", "ffn")):
        share = 100 * p[key] / max(d[key], 1)
        console.print(f"{label:>12} params: {d[key]:,} -> {p[key]:,} ({share:.1f}%)")


# ---- dense and pruned models to compare ------------------------------------------------------------
def dense_twin(pruned: nn.Module) -> nn.Module:
    """The exported model's prompt and head on a dense backbone of the same config with random weights
    (latency depends on shapes only), so timing an export needs no dense weights."""
    config = copy.deepcopy(pruned.backbone.config)
    for key in ("skeleton_ffn_widths", "skeleton_heads_per_layer"):
        if hasattr(config, key):
            delattr(config, key)
    return pruned.on_backbone(AutoModel.from_config(config).eval().requires_grad_(False))


def load_pair(path: str | Path, backbone: str | None = None) -> tuple[nn.Module, nn.Module]:
    """(dense, pruned) models for an artifact, an export or a run folder."""
    if read_meta(path)["kind"] == KIND_EXPORT:
        pruned = load_pruned(path)
        return dense_twin(pruned), pruned
    dense = build_dense(path, backbone)
    return dense, apply_keep(copy.deepcopy(dense), path)
