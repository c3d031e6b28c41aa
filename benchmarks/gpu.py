"""Dense vs pruned at BERT-base shape on a GPU: measured against FLOP-ideal speedup (a benchmark, not a test).

    python benchmarks/gpu.py --out benchmarks/results/gpu        # CUDA, 12 x 768, FFN 3072, random weights
    python benchmarks/gpu.py --paths eager,sdpa,compile           # torch.compile too (compiles once per shape)
    python benchmarks/gpu.py --smoke --out /tmp/gpu-smoke         # tiny shapes on the CPU: the script runs

For each dtype (float16, bfloat16), pruning (a share of FFN neurons, optionally of heads, the same in every
layer) and inference path, dense and pruned are timed interleaved over batch x tokens (tokens = the soft
prompt plus the text, what the backbone sees). Kept FFN widths are rounded up to multiples of --round-to
(64: whole tensor-core tiles; heads are 64 wide already). Weights and keep sets are random: latency
depends on shapes only, so no download and no training. Writes gpu.md (tables) and gpu.json (every row).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, BertConfig

from skeleton.bench import benchmark
from skeleton.fastpath import DTYPES, PATHS, PathUnsupportedError, dtype_name
from skeleton.localize import (
    ffn_widths,
    heads_per_layer,
    prune_ffn,
    prune_heads,
    select_heads,
    select_neurons,
)
from skeleton.prompt import PromptTunedModel

PROMPT_TOKENS = 8
# name -> (share of FFN neurons removed, share of attention heads removed), per layer
PRUNINGS = {
    "ffn50": (0.5, 0.0),
    "ffn70": (0.7, 0.0),
    "ffn50+heads25": (0.5, 0.25),
    "ffn70+heads50": (0.7, 0.5),
}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
FULL_GRID = dict(batch_sizes=[1, 8, 32, 128], tokens=[64, 128, 256, 512], dtypes=["float16", "bfloat16"])
SMOKE_GRID = dict(batch_sizes=[1, 2], tokens=[12, 16], dtypes=["float16", "bfloat16"])


def dense_model(shape: dict, seed: int = 0) -> PromptTunedModel:
    """A prompt-tuned BERT of the given shape with random weights (BERT-base: 12 x 768, FFN 3072)."""
    torch.manual_seed(seed)
    config = BertConfig(**shape, vocab_size=30522, max_position_embeddings=512)
    backbone = AutoModel.from_config(config).eval()
    prompt = {"num_tokens": PROMPT_TOKENS, "init": "random"}
    return PromptTunedModel(
        backbone="bert-base-uncased", task="sst2", prompt=prompt, pooling="first", backbone_module=backbone
    )


def pruned_model(dense: PromptTunedModel, ffn_rate: float, head_rate: float, round_to: int, seed: int = 0):
    """`dense` with random FFN neurons and heads removed, the same share in every layer, kept FFN widths
    rounded up to a multiple of `round_to`."""
    gen = torch.Generator().manual_seed(seed)
    pruned = copy.deepcopy(dense)
    backbone = pruned.backbone
    widths, heads = ffn_widths(backbone), heads_per_layer(backbone)
    ffn_scores = [torch.rand(w, generator=gen) for w in widths]
    prune_ffn(backbone, select_neurons(ffn_scores, ffn_rate, scope="layer", round_to=round_to))
    if head_rate > 0:
        head_scores = [torch.rand(h, generator=gen) for h in heads]
        prune_heads(backbone, select_heads(head_scores, head_rate, scope="layer", min_per_layer=1))
    return pruned


def run(args: argparse.Namespace) -> dict:
    shape = TINY if args.smoke else BERT_BASE
    dense = dense_model(shape)
    text_lens = [t - PROMPT_TOKENS for t in args.tokens]
    rows, prunings = [], {}
    for name in args.prunings:
        ffn_rate, head_rate = PRUNINGS[name]
        pruned = pruned_model(dense, ffn_rate, head_rate, args.round_to)
        prunings[name] = {
            "ffn_removed": ffn_rate,
            "heads_removed": head_rate,
            "ffn_widths": ffn_widths(pruned.backbone),
            "heads": heads_per_layer(pruned.backbone),
        }
        for dtype in args.dtypes:
            started = time.perf_counter()
            got = benchmark(dense, pruned, args.batch_sizes, text_lens, [args.device], args.repeats,
                            args.warmup, show=False, paths=args.paths, dtype=dtype)  # fmt: skip
            for row in got:
                row["pruning"] = name
            rows += got
            print(f"{name} {dtype}: {len(got)} rows in {time.perf_counter() - started:.0f} s", flush=True)
        del pruned
    return {
        "meta": {
            "device": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "shape": shape,
            "prompt_tokens": PROMPT_TOKENS,
            "round_to": args.round_to,
            "repeats": args.repeats,
            "smoke": args.smoke,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
        "prunings": prunings,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """Per dtype and path, one table: a row per (pruning, batch), a column per token count, each cell
    `measured / ideal` speedup; then dense latencies for scale."""
    meta, rows = result["meta"], result["rows"]
    tokens = sorted({r["tokens"] for r in rows})
    batches = sorted({r["batch_size"] for r in rows})
    lines = [
        f"Dense vs pruned, {meta['shape']['num_hidden_layers']} x {meta['shape']['hidden_size']}, "
        f"FFN {meta['shape']['intermediate_size']}, random weights, on {meta['device']} "
        f"(torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}; "
        f"median of {meta['repeats']} interleaved calls; FFN widths rounded to {meta['round_to']}).",
        "",
        "| pruning | FFN widths kept | heads kept |",
        "|---|---|---|",
    ]
    for name, p in result["prunings"].items():
        lines.append(f"| {name} | {_runs(p['ffn_widths'])} | {_runs(p['heads'])} |")
    cell = {(r["dtype"], r["path"], r["pruning"], r["batch_size"], r["tokens"]): r for r in rows}
    header = "| pruning | batch | " + " | ".join(f"{t} tokens" for t in tokens) + " |"
    rule = "|---|---:|" + "---:|" * len(tokens)
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for path in dict.fromkeys(r["path"] for r in rows):
            lines += ["", f"**{dtype}, {path}**: measured / FLOP-ideal speedup", "", header, rule]
            for name in result["prunings"]:
                for b in batches:
                    got = [cell.get((dtype, path, name, b, t)) for t in tokens]
                    text = [f"x{r['speedup']:.2f} / x{r['ideal_speedup']:.2f}" if r else "" for r in got]
                    lines.append(f"| {name} | {b} | " + " | ".join(text) + " |")
            lines += ["", f"dense latency, ms ({dtype}, {path})", "", header.replace("pruning | ", ""),
                      rule.replace("|---|", "|", 1)]  # fmt: skip
            first = next(iter(result["prunings"]))
            for b in batches:
                got = [cell.get((dtype, path, first, b, t)) for t in tokens]
                lines.append(
                    f"| {b} | " + " | ".join(f"{r['dense_ms']:.2f}" if r else "" for r in got) + " |"
                )
    return "\n".join(lines) + "\n"


def _runs(values: list[int]) -> str:
    """`[1536] * 12` for uniform per-layer values, else the list."""
    return f"{values[0]} in all {len(values)} layers" if len(set(values)) == 1 else str(values)


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(v) for v in text.split(",") if v.strip()]

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, tiny grid, CPU unless CUDA is there")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--batch-sizes", type=_csv(int), default=None, help="default 1,8,32,128")
    parser.add_argument("--tokens", type=_csv(int), default=None, help="default 64,128,256,512")
    parser.add_argument("--dtypes", type=_csv(str), default=None, help="default float16,bfloat16")
    parser.add_argument("--paths", type=_csv(str), default=["eager", "sdpa"], help=f"of {', '.join(PATHS)}")
    parser.add_argument("--prunings", type=_csv(str), default=list(PRUNINGS), help=", ".join(PRUNINGS))
    parser.add_argument("--round-to", type=int, default=None, help="FFN width multiple (default 64; smoke 8)")
    parser.add_argument("--repeats", type=int, default=None, help="default 30 (smoke 2)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/gpu")
    args = parser.parse_args(argv)
    grid = SMOKE_GRID if args.smoke else FULL_GRID
    args.batch_sizes = args.batch_sizes or grid["batch_sizes"]
    args.tokens = args.tokens or grid["tokens"]
    args.dtypes = args.dtypes or grid["dtypes"]
    args.round_to = args.round_to or (8 if args.smoke else 64)
    args.repeats = args.repeats or (2 if args.smoke else 30)
    args.warmup = min(args.warmup, 1) if args.smoke else args.warmup
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and not args.smoke:
        parser.error(
            "no CUDA device: run this on a GPU machine, or pass --smoke to check the script on tiny shapes"
        )
    for name, values, known in (("dtype", args.dtypes, DTYPES), ("pruning", args.prunings, PRUNINGS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if min(args.tokens) <= PROMPT_TOKENS or max(args.tokens) > 512:
        parser.error(
            f"--tokens must lie in ({PROMPT_TOKENS}, 512]: {PROMPT_TOKENS} of them are the soft prompt"
        )
    args.dtypes = [dtype_name(DTYPES[d]) for d in args.dtypes]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke and args.device == "cpu":
        torch.set_num_threads(1)  # tiny matmuls: more threads only contend on a shared CPU
    try:
        result = run(args)
    except PathUnsupportedError as err:
        print(f"benchmarks/gpu.py: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
