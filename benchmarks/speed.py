"""Issue 11's proof: the fastest network within psi, held on dev, found in a fraction of the tuning time.

    python benchmarks/speed.py                       # trains what is missing, then tabulates
    python benchmarks/speed.py --tasks sst2 --seeds 0 --methods pooled

For each task x seed it runs ``skeleton-train experiment=quickstart`` (MiniLM, the shared data, psi = 1,
search split carved from train, dev reported) once per method. ``pooled`` and ``confirm`` rank heads
and neurons together by score per modelled cost and search on one half of the search split; a
candidate rate must then keep psi on both halves pooled (``pooled``) or on the other half alone
(``confirm``). ``paper`` (``skeleton=paper``) prunes FFN neurons only, at the largest rate the whole
split keeps within psi. ``best`` (``pruning.units=best``) searches as ``pooled`` does, then FFN
neurons alone past the joint rate, and keeps the lower modelled latency. All reuse one converged
prompt per task x seed (the prompt cache), so the methods differ only after training. Then it times every artifact
again, dense vs pruned interleaved, at 128 tokens (batch 32) and at batch 1, and writes speed.md and
speed.json into --out. Runs that already hold a complete summary are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from skeleton import runs
from skeleton.pipeline import NEAR_CONSTANT
from skeleton.summary import RunSummary

# every method names its acceptance rule, so a run folder means the same whatever the defaults are
METHODS = {
    "reconstruct": [
        "skeleton.search.acceptance=pooled",
        "skeleton.pruning.units=joint",
        "skeleton.reconstruct.enabled=true",
    ],
    "pooled": [
        "skeleton.search.acceptance=pooled",
        "skeleton.pruning.units=joint",
        "skeleton.reconstruct.enabled=false",
    ],
    "best": [
        "skeleton.search.acceptance=pooled",
        "skeleton.pruning.units=best",
        "skeleton.reconstruct.enabled=false",
    ],
    "confirm": ["skeleton.search.acceptance=confirm", "skeleton.reconstruct.enabled=false"],
    "paper": ["skeleton=paper"],
}
TASKS = {
    "sst2": [],
    # MRPC's 3.7k training pairs make an epoch 84 steps: let the step budget, not the epoch, end training
    "mrpc": [
        "task=mrpc",
        "trainer.max_epochs=1000",
        "+trainer.check_val_every_n_epoch=null",
        "trainer.max_steps=400",
    ],
}
# (batch, text tokens; the prompt's 20 come on top) re-timed per artifact: the run's median dev batch
# length ("real", the first table's speedup), long inputs, and one long input
SHAPES = ((32, "real"), (32, 128), (1, 128))


def run_dir(root: Path, method: str, task: str, seed: int) -> Path:
    return root / method / f"{task}-seed{seed}"


def ensure_run(root: Path, method: str, task: str, seed: int, extra: list[str]) -> RunSummary:
    folder = run_dir(root, method, task, seed)
    done = runs.read_summary(folder)
    if done is not None and done.complete:
        return done
    command = [
        sys.executable, "-m", "skeleton.cli.train", "experiment=quickstart", "logger=none", f"seed={seed}",
        f"hydra.run.dir={folder.resolve()}", "tags=[speed]", *TASKS[task], *METHODS[method], *extra,
    ]  # fmt: skip
    print(f"running {method} {task} seed {seed}: {' '.join(command[2:])}", flush=True)
    log = folder.parent / f"{folder.name}.log"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    if code != 0:
        raise SystemExit(f"{method} {task} seed {seed} failed (exit {code}): see {log}")
    return runs.read_summary(folder)


def row_of(summary: RunSummary) -> dict:
    out = summary.skeleton
    headline = summary.headline_metric
    dense_dev, pruned_dev = summary.dense.dev[headline], out.pruned.dev[headline]
    dense_search, pruned_search = summary.dense.search[headline], out.pruned.search[headline]
    localize = sum(out.seconds.get(step, 0.0) for step in ("attribution", "reconstruct", "search"))
    tuning = float(summary.train.get("seconds") or 0.0)
    heads = out.heads or {}
    kept_heads, dense_heads = sum(heads.get("kept", [0])), sum(heads.get("dense", [0]))
    return {
        "task": summary.task,
        "seed": summary.seed,
        "rate": out.rate,
        "dense_dev": 100 * dense_dev,
        "pruned_dev": 100 * pruned_dev,
        "dev_drop": 100 * (dense_dev - pruned_dev),
        "dev_drop_se": (out.drops.get("dev") or {}).get("se"),
        "search_drop": 100 * (dense_search - pruned_search),
        "ffn_pruned": 1 - out.ffn.kept_fraction,
        "heads_pruned": 1 - kept_heads / dense_heads if dense_heads else 0.0,
        "speedup": out.latency.speedup,  # replaced by the re-timed one where the artifact is timed again
        "speedup_in_run": out.latency.speedup,
        "timed_idle_in_run": out.latency.reliable,
        "seq_len": out.latency.seq_len,
        "modelled": out.modelled_speedup,
        "flop_speedup": out.flops.ideal_speedup,
        "localize_s": localize,
        "tuning_s": tuning,
        "localize_share": localize / tuning if tuning else None,
        "artifact": out.artifact,
        "reliable": out.latency.reliable,
        # how far the dense model stands above answering every search example alike (points): within psi,
        # any pruning down to that answer passes
        "above_constant": None
        if not out.constant_answer
        else 100 * (dense_search - out.constant_answer["search"]),
        "near_constant": any(w.startswith(NEAR_CONSTANT) for w in out.warnings),
    }


def time_shapes(artifact: str, repeats: int, real_len: int) -> dict:
    """Dense vs pruned at SHAPES ("real": the run's median dev length), interleaved, medians (the
    artifact's dense backbone), timed again after the runs so that every row is timed alike."""
    from skeleton.bench import benchmark, load_pair

    dense, pruned = load_pair(artifact)
    out = {}
    for batch, tokens in SHAPES:
        length = real_len if tokens == "real" else tokens
        row = benchmark(dense, pruned, [batch], [length], ["cpu"], repeats=repeats, show=False)[0]
        out[f"b{batch}x{tokens}"] = row["speedup"]
    return out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".2f", prefix: str = "") -> str:
    return "-" if value is None else f"{prefix}{value:{spec}}"


def tables(rows: list[dict]) -> str:
    lines = [
        "| method | task | seeds | dense dev | dev drop (median; per seed) | FFN / heads pruned | speedup b32 at the dev median length, re-timed (median; per seed) | modelled | localization / tuning (rankings reused from the cache where they fit) | dense above a constant answer, search split (median, points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tasks = sorted({r["task"] for r in rows}, key=list(TASKS).index)
    groups = [(t, [t]) for t in tasks] + ([("all", tasks)] if len(tasks) > 1 else [])
    for method in METHODS:
        for task, members in groups:
            rs = [r for r in rows if r["method"] == method and r["task"] in members]
            if not rs:
                continue
            drops = ", ".join(f"{r['dev_drop']:.1f}" for r in rs)
            speeds = ", ".join(f"{r['speedup']:.2f}" for r in rs)
            # the tasks' metrics differ: no median dense score across them
            within = sum(r["near_constant"] for r in rs)  # dense models within psi of a constant answer
            dense_dev = "-" if task == "all" else f"{median(r['dense_dev'] for r in rs):.1f}"
            lines.append(
                f"| {method} | {task} | {len(rs)} | {dense_dev} | "
                f"**{median(r['dev_drop'] for r in rs):.1f}** ({drops}) | "
                f"{100 * median(r['ffn_pruned'] for r in rs):.0f}% / {100 * median(r['heads_pruned'] for r in rs):.0f}% | "
                f"**x{median(r['speedup'] for r in rs):.2f}** ({speeds}) | "
                f"{fmt(median(r['modelled'] for r in rs), prefix='x')} | "
                f"{fmt(median(r['localize_share'] for r in rs), '.0%')} "
                f"({median(r['localize_s'] for r in rs):.0f} s / {median(r['tuning_s'] for r in rs):.0f} s) | "
                f"{'-' if task == 'all' else fmt(median(r.get('above_constant') for r in rs), '.1f')}"
                f"{f' (within psi: {within})' if within else ''} |"
            )
    lines += [
        "",
        "| method | task | "
        + " | ".join(f"speedup batch {b} x {'dev median' if t == 'real' else t} tokens" for b, t in SHAPES)
        + " |",
    ]
    lines.append("|---|---|" + "---|" * len(SHAPES))
    for method in METHODS:
        for task, members in groups:
            rs = [r for r in rows if r["method"] == method and r["task"] in members and "shapes" in r]
            if rs:
                cells = [fmt(median(r["shapes"][f"b{b}x{t}"] for r in rs), prefix="x") for b, t in SHAPES]
                lines.append(f"| {method} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="outputs/speed", help="folder of the runs (method/task-seedN)")
    parser.add_argument("--out", default="benchmarks/results/speed")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model in the second table")
    parser.add_argument("--no-train", action="store_true", help="tabulate finished runs only")
    parser.add_argument("overrides", nargs="*", help="extra skeleton-train overrides for every run")
    args = parser.parse_args(argv)
    root, rows = Path(args.runs), []
    for method in args.methods:
        for task in args.tasks:
            for seed in args.seeds:
                if args.no_train:
                    summary = runs.read_summary(run_dir(root, method, task, seed))
                    if summary is None or not summary.complete:
                        continue
                else:
                    summary = ensure_run(root, method, task, seed, args.overrides)
                row = {"method": method, **row_of(summary)}
                moved = run_dir(root, method, task, seed) / "skeleton"  # a run folder renamed since
                if row["artifact"] and not Path(row["artifact"]).exists() and moved.exists():
                    row["artifact"] = str(moved)
                if row["artifact"]:
                    row["shapes"] = time_shapes(row["artifact"], args.repeats, row["seq_len"])
                    row["speedup"] = row["shapes"]["b32xreal"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = tables(rows)
    (out / "speed.md").write_text(text)
    (out / "speed.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
