"""Deep against input-only prompts at the same step budget (a benchmark, not a test).

    SKELETON_DATA=/work/shared/data nice -n 10 python benchmarks/deep_prompts.py \
        [--tasks sst2,mrpc,rte,cola] [--variants vocab,deep] [--steps 200] [--out outputs/deep/bench]

Runs plain prompt tuning (``skeleton.enabled=false``: prompt tuning is where the two differ) one after
the other, one seed, MiniLM, the same steps, batch size, schedule, learning rate and 20 tokens for each
variant; then prints a Markdown table of the dev scores (the task's headline metric, in points) and the
time per step. A finished run folder is not run again (its summary is reused), so an interrupted
benchmark resumes where it stopped. Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {  # name -> overrides
    "vocab": ["prompt=vocab"],
    "deep": ["prompt=deep"],
    "deep-reparam": ["prompt=deep", "prompt.reparam=512"],
}
LABELS = {"vocab": "input only", "deep": "deep", "deep-reparam": "deep, reparam 512"}


def overrides(task: str, variant: str, steps: int, out: Path, extra: list[str]) -> list[str]:
    return [
        f"task={task}",
        *VARIANTS[variant],
        "model=minilm",
        "callbacks=minimal",
        "skeleton.enabled=false",
        "logger=none",
        "reuse=false",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        f"trainer.val_check_interval={steps}",  # one search-split evaluation, at the end
        "+trainer.check_val_every_n_epoch=null",
        "data.max_length=128",
        "data.search_max=300",
        "paths.data_dir=${oc.env:SKELETON_DATA,../shared/data}",
        f"hydra.run.dir={out / f'{task}-{variant}'}",
        *extra,
    ]


def run(task: str, variant: str, steps: int, out: Path, extra: list[str]) -> dict:
    folder = out / f"{task}-{variant}"
    cmd = [sys.executable, "-m", "skeleton.cli.train", *overrides(task, variant, steps, out, extra)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((folder / "summary.json").read_text())


def table(results: dict, tasks: list[str], variants: list[str]) -> str:
    head = ["task", "metric"] + [f"{LABELS[v]}: dev (search split)" for v in variants]
    head += [f"{LABELS[v]} - input only (dev)" for v in variants if v != "vocab" and "vocab" in variants]
    head += [f"s/step {LABELS[v]}" for v in variants] + ["trainable params " + "/".join(variants)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        runs = {v: results[(task, v)] for v in variants if (task, v) in results}
        if not runs:
            continue
        metric = next(iter(runs.values()))["headline_metric"]
        dev = {v: 100 * s["dense"]["dev"][metric] for v, s in runs.items()}
        search = {v: 100 * s["dense"]["search"][metric] for v, s in runs.items()}
        row = [task, metric] + [f"{dev[v]:.1f} ({search[v]:.1f})" if v in dev else "-" for v in variants]
        row += [
            f"{dev[v] - dev['vocab']:+.1f}" if v in dev and "vocab" in dev else "-"
            for v in variants
            if v != "vocab" and "vocab" in variants
        ]
        row += [f"{runs[v]['train']['seconds_per_step']:.2f}" if v in runs else "-" for v in variants]
        row += ["/".join(f"{runs[v]['params']['trainable']:,}" if v in runs else "-" for v in variants)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="sst2,mrpc,rte,cola")
    parser.add_argument("--variants", default="vocab,deep")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("outputs/deep/bench"))
    parser.add_argument("--table-only", action="store_true", help="print the table of finished runs only")
    args, extra = parser.parse_known_args(argv)
    tasks, variants = args.tasks.split(","), args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    results = {}
    for task in tasks:  # sequential: the runs share a small CPU
        for variant in variants:
            summary = args.out.resolve() / f"{task}-{variant}" / "summary.json"
            if args.table_only:
                if summary.is_file():
                    results[(task, variant)] = json.loads(summary.read_text())
                continue
            results[(task, variant)] = run(task, variant, args.steps, args.out.resolve(), extra)
    print(table(results, tasks, variants))


if __name__ == "__main__":
    main()
