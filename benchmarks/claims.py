"""Check the paper's headline claims on finished runs (a benchmark, not a test).

    python benchmarks/claims.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results]

For each run folder (a Skeleton run, e.g. SST-2 and RTE at psi = 1 from `+sweeps=quick`):
  * the dev score drop of the pruned model (and after recovery, if the run tuned the prompt again), the
    standard error of that drop (paired per example), the share of FFN neurons removed, the parameters
    removed for the whole backbone and for the encoder layers alone;
  * the CPU speedup at batch 32 on real dev inputs (dense vs pruned, interleaved, median of repeats);
  * the dev-score pruning curves of the attribution ranking against random and weight-magnitude
    rankings at equal rates (reversible masks on the dense model from the run's own artifact).
Writes claims.md, claims.json and curves.png into --out. Needs no training: the dense prompt-tuned
model is rebuilt from the run's skeleton artifact (prompt + head + the dense backbone's hash).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from skeleton import summary as run_summary
from skeleton.bench import first_examples, measure_latency
from skeleton.evaluate import evaluate, predict_logits, to_device
from skeleton.export import build_dense, load_skeleton, read_meta
from skeleton.localize import masked, select_neurons
from skeleton.localize.config import SkeletonConfig
from skeleton.pipeline import score_model
from skeleton.reuse import PromptCache
from skeleton.summary import RunSummary

# name -> overrides of the run's attribution settings; the first is the run's own ranking
CRITERIA = {
    "act x grad (run's setting)": {},
    "act x grad, scored once": {"iterative_step": 0.0},
    "act x grad, once, logit, |mean_t|": {"iterative_step": 0.0, "target": "logit", "magnitude": "instance"},
    "weight magnitude": {"criterion": "magnitude"},
    "random": {"criterion": "random"},
}
RATES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def datamodule_of(run: Path):
    cfg = OmegaConf.load(run / "config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule, cfg


def curves(name: str, model, datamodule, cfg, rates=RATES) -> dict[str, list[list[float]]]:
    """Dev score of the dense model with the lowest-ranked neurons masked, per criterion and rate."""
    headline = model.task.headline
    dev = datamodule.dev_dataloader()
    out = {}
    scope = cfg.skeleton.pruning.scope
    for criterion, overrides in CRITERIA.items():
        attribution = {**OmegaConf.to_container(cfg.skeleton.attribution), "heads": False, **overrides}
        scores = cached_scores(cfg, model) if not overrides else None  # the run's own, if its cache is here
        if scores is None:
            settings = SkeletonConfig.from_dict(
                {"attribution": attribution, "pruning": {"units": "ffn", "scope": scope}}
            )
            scores = score_model(model, datamodule, settings, report=lambda _: None)
        points = []
        for rate in rates:
            with masked(model.backbone, select_neurons(scores, rate, scope=scope)):
                points.append([rate, evaluate(model, dev)[headline]])
            print(f"  {name} {criterion:36s} rate {rate:.2f}: {points[-1][1]:.4f}", flush=True)
        out[criterion] = points
    return out


def dense_model(run: Path, cfg):
    """The dense prompt-tuned model the run started from. The artifact holds the final prompt and head,
    which recovery tuned for the pruned backbone; the converged ones before recovery are in the prompt
    cache."""
    model = build_dense(run / "skeleton").eval()
    if OmegaConf.select(cfg, "skeleton.recovery.steps", default=0):
        cache = PromptCache.of_run(cfg, read_meta(run / "skeleton")["backbone"]["sha256"])
        if not cache.has_prompt():
            raise SystemExit(
                f"{run} tuned its prompt again after pruning; its dense prompt is not in the prompt cache "
                f"({cache.folder}). Run claims.py where the run ran, or rerun it with recovery.steps=0."
            )
        cache.load_prompt(model)
    return model


def cached_scores(cfg, model):
    """The scores the run itself ranked by, from the prompt cache (iterative scoring is the slow part);
    None when this machine has no cache entry for the run (then it scores again)."""
    return PromptCache.of_run(cfg, model.skeleton_info["backbone"]["sha256"]).load_scores()


def speedup_at(dense, pruned, datamodule, batch_size: int = 32, repeats: int = 30) -> dict:
    """Dense vs pruned on real dev inputs at batch 32, interleaved, medians: a median-length batch
    and the longest batch (dev batches are sorted by length), since fixed per-call costs dilute the
    speedup on short inputs."""
    batches = [first_examples(b, batch_size) for b in datamodule.dev_dataloader()]
    out = {}
    for name, batch in (("median", batches[len(batches) // 2]), ("long", batches[-1])):
        batch = fill(batch, batch_size)
        times = measure_latency({"dense": dense, "pruned": pruned}, to_device(batch, "cpu"), repeats=repeats)
        out[name] = {
            "tokens": int(batch["input_ids"].shape[1]) + dense.prompt.num_tokens,
            "dense_ms": times["dense"]["median_ms"],
            "pruned_ms": times["pruned"]["median_ms"],
            "speedup": times["dense"]["median_ms"] / times["pruned"]["median_ms"],
        }
    return out


def fill(batch: dict, n: int) -> dict:
    """Repeat a short last batch until it holds ``n`` examples."""
    have = batch["labels"].shape[0]
    if have >= n:
        return batch
    times = -(-n // have)
    grown = {
        k: v.repeat(times, *[1] * (v.dim() - 1)) if torch.is_tensor(v) and v.dim() else v
        for k, v in batch.items()
    }
    return first_examples(grown, n)


def paired_noise(dense, pruned, datamodule) -> dict | None:
    """How noisy a dev drop is: the share of dev examples on which the dense and the final pruned model
    disagree about correctness, and the standard error (points) of the accuracy difference, paired per
    example. With a few hundred examples it is about a point: the size of psi itself."""
    if dense.task.formulation != "classification":
        return None
    dev = datamodule.dev_dataloader()
    labels = torch.cat([batch["labels"] for batch in dev])

    def correct(model) -> torch.Tensor:
        return (torch.cat(predict_logits(model, dev)).argmax(-1) == labels).float()

    diff = correct(pruned) - correct(dense)
    return {
        "examples": len(diff),
        "disagree": float((diff != 0).float().mean()),
        "se_points": 100 * float(diff.std() / len(diff) ** 0.5),
    }


def claim_row(run: RunSummary, speed: dict, noise: dict | None = None) -> dict:
    out = run.skeleton
    dense, pruned, recovered = run.score("dense"), run.score("pruned"), run.score("recovered")
    final = pruned if recovered is None else recovered
    params = out.backbone_params
    return {
        "task": run.task,
        "psi": out.psi,
        "headline": run.headline_metric,
        "dense_dev": 100 * dense,
        "pruned_dev": 100 * pruned,
        "pruned_drop": 100 * (dense - pruned),
        "recovered_dev": None if recovered is None else 100 * recovered,
        "recovery_steps": out.skeleton_config.get("recovery", {}).get("steps", 0),
        "drop": 100 * (dense - final),
        "noise": noise,
        "ffn_pruned": 100 * (1 - out.ffn.kept_fraction),
        "backbone_params_pruned": 100 * (1 - params.pruned["total"] / params.dense["total"]),
        "layer_params_pruned": 100 * (1 - params.pruned["layers"] / params.dense["layers"]),
        "cpu": speed,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| task | psi | dense dev | pruned dev (drop) | after recovery | final drop (<= psi?) | drop's SE "
        "| FFN neurons pruned (>= 45%?) | params pruned: backbone / encoder layers "
        "| CPU speedup, batch 32: median length / longest (>= 1.5x?) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = lambda good: "yes" if good else "**no**"  # noqa: E731
        med, long = r["cpu"]["median"], r["cpu"]["long"]
        recovered = (
            "-" if r["recovered_dev"] is None else f"{r['recovered_dev']:.1f} ({r['recovery_steps']} steps)"
        )
        se = "-" if not r["noise"] else f"{r['noise']['se_points']:.1f}"
        lines.append(
            f"| {r['task']} | {r['psi']:g} | {r['dense_dev']:.1f} | {r['pruned_dev']:.1f} ({r['pruned_drop']:.1f}) "
            f"| {recovered} | {r['drop']:.1f} ({ok(r['drop'] <= r['psi'])}) | {se} "
            f"| {r['ffn_pruned']:.0f}% ({ok(r['ffn_pruned'] >= 45)}) "
            f"| {r['backbone_params_pruned']:.0f}% / {r['layer_params_pruned']:.0f}% "
            f"| x{med['speedup']:.2f} at {med['tokens']} tokens / x{long['speedup']:.2f} at {long['tokens']} tokens "
            f"({ok(max(med['speedup'], long['speedup']) >= 1.5)}) |"
        )
    return "\n".join(lines)


def plot(all_curves: dict[str, dict], rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(all_curves), 3.2))
    for i, (task, by_criterion) in enumerate(all_curves.items()):
        ax = fig.add_subplot(1, len(all_curves), i + 1)
        for criterion, points in by_criterion.items():
            rates, scores = zip(*points)
            ax.plot([100 * r for r in rates], [100 * s for s in scores], marker="o", ms=3, label=criterion)
        row = next(r for r in rows if r["task"] == task)
        ax.axhline(row["dense_dev"] - row["psi"], color="grey", ls="--", lw=0.8, label="dense - psi")
        ax.set(
            title=f"{task}: dev score vs FFN neurons pruned",
            xlabel="FFN neurons pruned (%)",
            ylabel=f"dev {row['headline']} (points)",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    args.out.mkdir(parents=True, exist_ok=True)
    rows, all_curves = [], {}
    for run in args.runs:
        started = time.perf_counter()
        summary = run_summary.read(run)
        datamodule, cfg = datamodule_of(run)
        dense, pruned = dense_model(run, cfg), load_skeleton(run / "skeleton").eval()
        speed = speedup_at(dense, pruned, datamodule, repeats=args.repeats)
        rows.append(claim_row(summary, speed, paired_noise(dense, pruned, datamodule)))
        all_curves[summary.task] = curves(run.name, dense, datamodule, cfg)
        print(f"{summary.task}: done in {time.perf_counter() - started:.0f}s", flush=True)
    table = markdown(rows)
    (args.out / "claims.md").write_text(table + "\n")
    (args.out / "claims.json").write_text(json.dumps({"rows": rows, "curves": all_curves}, indent=2))
    plot(all_curves, rows, args.out / "curves.png")
    print(table)
    print(f"wrote {args.out / 'claims.md'}, {args.out / 'claims.json'}, {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
