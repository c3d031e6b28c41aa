"""Paper tables and figures from finished runs: read ``summary.json`` files (or W&B runs), tabulate, plot.

Everything here reads only summaries, so a sweep can be re-tabled offline at any time, and torch is never
imported. Scores in summaries are fractions; tables show points (x100), rates and kept fractions percent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

SUMMARY, ERROR, COMPLETE = "summary.json", "error.json", "complete"
WANDB_KEY = "skeleton_summary"  # the training code logs the whole summary dict into the W&B config here
GROUP = ("model", "psi", "criterion")
KEY_NAMES = {"psi": "ψ (points)"}

GLUE = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli-mm", "qnli", "rte", "wnli")
SUPERGLUE = ("boolq", "cb", "copa", "multirc", "record", "superglue-rte", "wic", "wsc", "axb", "axg")
BENCHMARKS = {"glue": ("GLUE", GLUE), "superglue": ("SuperGLUE", SUPERGLUE)}
DIAGNOSTICS = {"axb", "axg"}  # evaluation-only probes: not part of the official SuperGLUE score
MNLI = {"mnli", "mnli-mm"}  # matched + mismatched are one GLUE task: averaged before the benchmark mean
TASK_NAMES = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI-m",
    "mnli-mm": "MNLI-mm", "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "boolq": "BoolQ", "cb": "CB",
    "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD", "superglue-rte": "RTE (SG)", "wic": "WiC",
    "wsc": "WSC", "axb": "AX-b", "axg": "AX-g",
}  # fmt: skip
# Composite headlines, in case a summary lacks the composite key but has its parts.
COMPOSITES = {"acc_f1": ("accuracy", "f1"), "pearson_spearman": ("pearson", "spearman"),
              "acc_macro_f1": ("accuracy", "macro_f1")}  # fmt: skip
# Table columns: (header, decimals). Scores in points, rate and params in percent.
COLUMNS = {
    "dense_dev": ("Prompt tuning", 1),
    "pruned_dev": ("Skeleton", 1),
    "rate": ("Rate (%)", 1),
    "params_kept": ("Params kept (%)", 1),
    "speedup": ("Speedup (×)", 2),
}


# ---- loading ---------------------------------------------------------------------------------------
class Summaries(list):
    """A list of complete summaries that also remembers what was skipped, so callers can report it."""

    def __init__(self, items: Iterable[dict] = (), searched=(), failed=(), incomplete=()):
        super().__init__(items)
        self.searched = list(searched)
        self.failed = list(failed)  # error.json paths (or W&B run paths)
        self.incomplete = list(incomplete)  # summary.json paths without status: complete

    def __add__(self, other):
        other = other if isinstance(other, Summaries) else Summaries(other)
        return Summaries(
            [*self, *other],
            self.searched + other.searched,
            self.failed + other.failed,
            self.incomplete + other.incomplete,
        )

    def report(self, limit: int = 5) -> str:
        where = ", ".join(map(str, self.searched)) or "nowhere"
        lines = [f"{len(self)} complete run(s) from {where}"]
        for name, paths in (("failed", self.failed), ("incomplete", self.incomplete)):
            if paths:
                shown = "".join(f"\n  {p}" for p in paths[:limit])
                more = f"\n  ... and {len(paths) - limit} more" if len(paths) > limit else ""
                lines.append(f"{len(paths)} {name} run(s), skipped:{shown}{more}")
        return "\n".join(lines)


def load_summaries(path_or_paths: str | Path | Sequence[str | Path]) -> Summaries:
    """Complete summaries found recursively under each path (a sweep, a run folder or a summary.json).

    Failed runs (``error.json`` and no complete summary) and unfinished ones are skipped but counted.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    found, failed, incomplete, seen = [], [], [], set()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob(SUMMARY)) + sorted(root.rglob(ERROR))
        for file in files:
            run_dir = file.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            summary = _read_json(run_dir / SUMMARY)
            if summary and summary.get("status") == COMPLETE:
                found.append(summary)
            elif (run_dir / ERROR).exists():
                failed.append(run_dir / ERROR)
            else:
                incomplete.append(run_dir / SUMMARY)
    result = Summaries(found, paths, failed, incomplete)
    log.info(result.report())
    return result


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_wandb(project: str, entity: str | None = None, filters: dict | None = None, api=None) -> Summaries:
    """Summaries of W&B runs, read from each run's config key ``skeleton_summary``.

    ``project`` may be ``ENTITY/PROJECT``. Pass ``api`` to reuse a ``wandb.Api`` (or a stand-in in tests).
    """
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    found, failed, incomplete = [], [], []
    for run in api.runs(path, filters=filters):
        summary = _unwrap(dict(run.config).get(WANDB_KEY))
        name = "/".join(map(str, getattr(run, "path", None) or [path, run.id]))
        if isinstance(summary, dict) and summary.get("status") == COMPLETE:
            found.append({**summary, "wandb_run": name})
        elif getattr(run, "state", "") in ("failed", "crashed"):
            failed.append(name)
        else:
            incomplete.append(name)
    return Summaries(found, [f"wandb:{path}"], failed, incomplete)


def _unwrap(value):
    """W&B raw configs wrap values as ``{"value": ...}``; a summary may also arrive as a JSON string."""
    if isinstance(value, dict) and set(value) == {"value"}:
        value = value["value"]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


# ---- flat frame ------------------------------------------------------------------------------------
def to_frame(summaries: Iterable[dict]) -> pd.DataFrame:
    """One flat row per run: scores in points, rates and kept fractions as fractions."""
    return pd.DataFrame([_row(s) for s in summaries], columns=list(_row({}).keys()))


def _row(s: dict) -> dict:
    headline = s.get("headline_metric")
    dense, pruned = s.get("dense") or {}, s.get("pruned") or {}
    params = s.get("backbone_params") or {}
    attribution = (s.get("skeleton_config") or {}).get("attribution") or {}
    return {
        "task": s.get("task"),
        "benchmark": s.get("benchmark") or _benchmark_of(s.get("task")),
        "model": s.get("model"),
        "seed": s.get("seed"),
        "psi": s.get("psi"),
        "criterion": s.get("criterion") or attribution.get("criterion"),
        "token_agg": attribution.get("token_agg"),
        "headline": headline,
        "dense_dev": _points(dense.get("dev"), headline),
        "pruned_dev": _points(pruned.get("dev"), headline),
        "dense_search": _points(dense.get("search"), headline),
        "pruned_search": _points(pruned.get("search"), headline),
        "rate": _num(s.get("rate")),
        "ffn_kept_fraction": _num((s.get("ffn") or {}).get("kept_fraction")),
        "params_kept_fraction": _ratio(params, "total"),
        "layers_kept_fraction": _ratio(params, "layers"),
        "speedup": _num(s.get("speedup")),
        "ideal_speedup": _num((s.get("flops") or {}).get("ideal_speedup")),
        "train_seconds": _num((s.get("train") or {}).get("seconds")),
        # summaries written before the "degenerate" key had no other warning
        "degenerate": bool(s.get("degenerate", bool(s.get("warnings")))),
        "sweep": s.get("sweep"),
        "run_dir": s.get("run_dir") or s.get("wandb_run"),
    }


def _benchmark_of(task: str | None) -> str | None:
    return next((b for b, (_, tasks) in BENCHMARKS.items() if task in tasks), None)


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _points(scores: dict | None, headline: str | None) -> float:
    """The headline score in points; rebuilds a composite (mean of its parts) when only the parts exist."""
    scores = scores or {}
    if headline in scores:
        return 100 * _num(scores[headline])
    parts = COMPOSITES.get(headline, ())
    if parts and all(p in scores for p in parts):
        return 100 * sum(_num(scores[p]) for p in parts) / len(parts)
    return math.nan


def _ratio(params: dict, key: str) -> float:
    dense, pruned = (params.get(k) or {} for k in ("dense", "pruned"))
    return _num(pruned.get(key)) / _num(dense.get(key)) if dense.get(key) else math.nan


# ---- paper table -----------------------------------------------------------------------------------
def paper_table(frame: pd.DataFrame, group: Sequence[str] = GROUP) -> pd.DataFrame:
    """Long numeric table: per ``group`` and task the mean and sample std over runs of each column in
    ``COLUMNS`` (std is NaN with one run), followed by each benchmark's average row.

    Averages follow the official composite: the mean over tasks present of each task's headline score
    (MNLI-m/-mm averaged into one task first; AX-b/AX-g diagnostics left out). ``avg_over`` names them.
    """
    frame = frame.assign(rate=frame["rate"] * 100, params_kept=frame["params_kept_fraction"] * 100)
    cols = list(COLUMNS)
    parts = []
    for keys, sub in frame.groupby(list(group), dropna=False, sort=True):
        by_task = sub.groupby("task")
        stats = by_task[cols].mean().join(by_task[cols].std(ddof=1).add_suffix("_std"))
        stats["n"] = by_task.size()
        stats["degenerate"] = by_task["degenerate"].any() if "degenerate" in sub else False
        stats["benchmark"] = by_task["benchmark"].first()
        stats = stats.loc[sorted(stats.index, key=_task_order)].reset_index()
        blocks = [_with_average(stats[stats["benchmark"] == b], b) for b in BENCHMARKS]
        blocks.append(stats[~stats["benchmark"].isin(list(BENCHMARKS))])
        block = pd.concat([b for b in blocks if len(b)], ignore_index=True)
        parts.append(block.assign(**dict(zip(group, keys))))
    if not parts:
        return pd.DataFrame(columns=[*group, "task", "benchmark", "n", *cols, "avg_over"])
    table = pd.concat(parts, ignore_index=True)
    ordered = [*group, "task", "benchmark", "n"] + [c for m in cols for c in (m, f"{m}_std")]
    ordered += ["avg_over", "degenerate"]
    return table.reindex(columns=ordered).astype({"n": "Int64"})


def _task_order(task: str) -> tuple:
    order = GLUE + SUPERGLUE
    return (order.index(task), "") if task in order else (len(order), str(task))


def _with_average(stats: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """Append the benchmark's average row (the mean of per-task means) to its task rows."""
    members = stats[~stats["task"].isin(DIAGNOSTICS)]
    if members.empty:
        return stats
    unit = members["task"].where(~members["task"].isin(MNLI), "mnli")  # MNLI-m/-mm count once
    means = members.groupby(unit)[list(COLUMNS)].mean().mean(skipna=False)
    both = len(set(members["task"]) & MNLI) == 2
    names = [
        TASK_NAMES.get(t, t) if not (both and t in MNLI) else "MNLI (m/mm averaged)" for t in members["task"]
    ]
    names = list(dict.fromkeys(names))
    label = BENCHMARKS[benchmark][0]
    average = {"task": f"{label} avg.", "benchmark": benchmark, **means, "avg_over": ", ".join(names)}
    return pd.concat([stats, pd.DataFrame([average])], ignore_index=True)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings as in a paper: ``mean ± std`` (std only with more than one run), ``–`` when missing."""
    flagged = (
        table["degenerate"].fillna(False).astype(bool) if "degenerate" in table else [False] * len(table)
    )
    names = [TASK_NAMES.get(t, t) + (" †" if f else "") for t, f in zip(table["task"], flagged)]
    out = pd.DataFrame({"Task": names}, index=table.index)
    for col, (header, digits) in COLUMNS.items():
        out[header] = [_cell(m, s, digits) for m, s in zip(table[col], table[f"{col}_std"])]
    out["Runs"] = [str(int(n)) if pd.notna(n) else "" for n in table["n"]]
    return out


def _cell(mean, std, digits: int) -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if pd.notna(std) else "")


def _groups(table: pd.DataFrame, group: Sequence[str]):
    """(title, display rows, footnotes) per group, in table order."""
    group = [g for g in group if g in table.columns]
    keys = table[group].astype(object).where(table[group].notna(), None).apply(tuple, axis=1)
    for key in dict.fromkeys(keys):
        rows = table[keys.map(lambda k, key=key: k == key)]
        title = " · ".join(f"{KEY_NAMES.get(g, g)} = {_fmt_key(v)}" for g, v in zip(group, key))
        notes = [f"{t}: mean over {o}." for t, o in zip(rows["task"], rows["avg_over"]) if isinstance(o, str)]
        notes.append("Scores in points (dev set); mean ± sample std over runs (std only with >1 run).")
        if "degenerate" in rows and rows["degenerate"].fillna(False).astype(bool).any():
            notes.append(
                "†: the dense prompt-tuned model answered every search example alike (it did not "
                "learn the task), so its pruning rate means nothing; train longer."
            )
        yield title, display_table(rows), notes


def _fmt_key(value) -> str:
    if value is None:
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- writers ---------------------------------------------------------------------------------------
def to_markdown(table: pd.DataFrame, group: Sequence[str] = GROUP) -> str:
    """One pipe table per group, with its footnotes: readable in a terminal and on GitHub."""
    out = []
    for title, rows, notes in _groups(table, group):
        header = list(rows.columns)
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows.itertuples(index=False)]
        out.append("\n".join([*lines, "", *(f"- {n}" for n in notes)]))
    return "\n\n".join(out) + "\n"


def to_latex(table: pd.DataFrame, group: Sequence[str] = GROUP) -> str:
    """Booktabs tables, hand-written (no jinja2/Styler): one ``table`` float per group."""
    out = []
    for title, rows, notes in _groups(table, group):
        header = " & ".join(_tex(c) for c in rows.columns) + r" \\"
        body = []
        for task, line in zip(rows["Task"], rows.itertuples(index=False)):
            if task.endswith("avg."):
                body.append(r"\midrule")
            body.append(" & ".join(_tex(c) for c in line) + r" \\")
        out.append(
            "\n".join(
                [
                    r"\begin{table}[t]",
                    r"\centering",
                    rf"\caption{{{_tex(title)}}}",
                    r"\begin{tabular}{l" + "r" * (len(rows.columns) - 1) + "}",
                    r"\toprule",
                    header,
                    r"\midrule",
                    *body,
                    r"\bottomrule",
                    r"\end{tabular}",
                    r"\par\footnotesize " + " ".join(_tex(n) for n in notes),
                    r"\end{table}",
                ]
            )
        )
    return "% requires \\usepackage{booktabs}\n" + "\n\n".join(out) + "\n"


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
               "±": r"$\pm$", "×": r"$\times$", "–": "--", "ψ": r"$\psi$", "·": r"$\cdot$", ">": r"$>$"}  # fmt: skip


def _tex(text) -> str:
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in str(text))


# ---- plots -----------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas: no global backend switch, nothing left open."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _grid(fig, n: int, ncols: int = 3):
    ncols = min(ncols, n)
    axes = fig.subplots(math.ceil(n / ncols), ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _label(keys: Sequence, names: Sequence[str]) -> str:
    return " ".join(f"{n}={_fmt_key(k)}" if n == "psi" else _fmt_key(k) for n, k in zip(names, keys))


def _tasks(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["task"].dropna().unique(), key=_task_order)


def plot_curves(summaries: Sequence[dict], group: Sequence[str] = GROUP):
    """Search score vs pruning rate per task: one line per group (seed-mean of the binary search's
    curves, interpolated on their joint rates), dense score dashed, chosen rates starred."""
    import numpy as np

    frame = to_frame(summaries).assign(curve=[s.get("curve") or [] for s in summaries])
    tasks = _tasks(frame)
    fig = _figure(4.2 * min(3, len(tasks)), 3.2 * math.ceil(len(tasks) / 3))
    for ax, task in zip(_grid(fig, len(tasks)), tasks):
        sub = frame[(frame["task"] == task) & frame["curve"].map(len).astype(bool)]
        for keys, runs in sub.groupby(list(group), dropna=False):
            curves = [np.array(sorted(c), dtype=float).reshape(-1, 2) for c in runs["curve"]]
            grid = np.unique(np.concatenate([c[:, 0] for c in curves]))
            ys = [
                np.where((grid >= c[0, 0]) & (grid <= c[-1, 0]), np.interp(grid, *c.T), np.nan)
                for c in curves
            ]
            (line,) = ax.plot(100 * grid, 100 * np.nanmean(ys, axis=0), marker=".", label=_label(keys, group))
            ax.axhline(runs["dense_search"].mean(), color=line.get_color(), ls="--", lw=1)
            ax.plot(100 * runs["rate"], runs["pruned_search"], "*", ms=11, color=line.get_color(), mec="k")
        ax.set(title=TASK_NAMES.get(task, task), xlabel="FFN neurons pruned (%)", ylabel="search score")
        ax.legend(fontsize="x-small")
    return fig


def plot_speedup(summaries: Sequence[dict]):
    """Measured latency speedup of each run vs its pruning rate, with the ideal FLOP speedup (x)."""
    frame = to_frame(summaries).dropna(subset=["rate"])
    fig = _figure(5.5, 4)
    ax = fig.subplots()
    for task in _tasks(frame):
        sub = frame[frame["task"] == task]
        ax.scatter(100 * sub["rate"], sub["speedup"], label=TASK_NAMES.get(task, task), alpha=0.8)
    ax.scatter(100 * frame["rate"], frame["ideal_speedup"], marker="x", color="gray", label="ideal (FLOPs)")
    ax.axhline(1, color="k", lw=0.8, ls=":")
    ax.set(xlabel="FFN neurons pruned (%)", ylabel="speedup over dense (×)", title="Speedup vs pruning rate")
    ax.legend(fontsize="x-small")
    return fig


def plot_criteria(summaries: Sequence[dict], group: Sequence[str] = ("model", "psi")):
    """Criteria ablation: chosen rate and Skeleton dev score per task, bars per criterion, one row of
    panels per (model, psi). None when fewer than two criteria are present."""
    import numpy as np

    frame = to_frame(summaries).dropna(subset=["criterion", "rate"])
    criteria = sorted(frame["criterion"].unique())
    if len(criteria) < 2:
        return None
    frame = frame.assign(rate=100 * frame["rate"])
    groups = list(frame.groupby(list(group), dropna=False))
    fig = _figure(11, 3.5 * len(groups))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    width = 0.8 / len(criteria)
    for (keys, sub), row in zip(groups, axes):
        tasks = _tasks(sub)
        x = np.arange(len(tasks))
        for col, ylabel, ax in (("rate", "pruning rate (%)", row[0]), ("pruned_dev", "Skeleton dev", row[1])):
            stats = sub.groupby(["task", "criterion"])[col].agg(["mean", "std"])
            for i, crit in enumerate(criteria):
                vals = stats.reindex([(t, crit) for t in tasks])
                ax.bar(x + i * width, vals["mean"], width, yerr=vals["std"].fillna(0), label=crit)
            ax.set_xticks(x + width * (len(criteria) - 1) / 2, [TASK_NAMES.get(t, t) for t in tasks])
            ax.set(ylabel=ylabel, title=_label(keys, group))
        row[0].legend(fontsize="x-small")
    return fig


def plot_kept_heatmap(summaries: Sequence[dict]):
    """Fraction of FFN neurons kept per layer, one row per pruned run: where the task's neurons live."""
    import numpy as np

    rows = []
    for s in summaries:
        ffn = s.get("ffn") or {}
        kept, total = ffn.get("kept_per_layer"), ffn.get("total_per_layer")
        if kept and total:
            label = f"{TASK_NAMES.get(s.get('task'), s.get('task'))} ψ={_fmt_key(s.get('psi'))} "
            label += f"{s.get('criterion') or ''} s{s.get('seed')}"
            rows.append((label, [k / max(t, 1) for k, t in zip(kept, total)]))
    rows.sort(key=lambda r: r[0])
    width = max((len(r[1]) for r in rows), default=1)
    data = np.full((max(len(rows), 1), width), np.nan)
    for i, (_, fractions) in enumerate(rows):
        data[i, : len(fractions)] = fractions
    fig = _figure(max(5, 0.5 * width + 3), min(2 + 0.28 * len(rows), 30))
    ax = fig.subplots()
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize="x-small")
    ax.set_xticks(range(width))
    ax.set(xlabel="layer", title="FFN neurons kept per layer")
    fig.colorbar(image, ax=ax, label="kept fraction")
    return fig


def save_plots(summaries: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Draw every figure that applies to these runs and save it as a PNG under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned = [s for s in summaries if s.get("rate") is not None]
    figures = {"score_vs_rate": plot_curves(pruned) if pruned else None}
    figures["speedup_vs_rate"] = plot_speedup(pruned) if pruned else None
    figures["kept_per_layer"] = plot_kept_heatmap(pruned) if pruned else None
    figures["criteria"] = plot_criteria(pruned)
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out_dir / f"{name}.png", dpi=120)
            written.append(out_dir / f"{name}.png")
    return written


# ---- CLI -------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skeleton-tables", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dirs", nargs="*", type=Path, metavar="SWEEP_DIR")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from this W&B project")
    parser.add_argument("--out", type=Path, help="output folder (default: <first SWEEP_DIR>/tables)")
    parser.add_argument("--formats", default="md,tex,csv", help="comma-separated subset of md,tex,csv")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not args.sweep_dirs and not args.wandb:
        parser.error("give at least one SWEEP_DIR or --wandb ENTITY/PROJECT")
    formats = {f.strip() for f in args.formats.split(",") if f.strip()}
    if formats - {"md", "tex", "csv"}:
        parser.error(f"unknown format(s): {', '.join(sorted(formats - {'md', 'tex', 'csv'}))}")

    summaries = load_summaries(args.sweep_dirs) if args.sweep_dirs else Summaries()
    if args.wandb:
        summaries = summaries + load_wandb(args.wandb)
    if not summaries:
        sys.exit(
            f"skeleton-tables: no complete summary.json found (searched recursively).\n{summaries.report()}"
        )
    if summaries.failed or summaries.incomplete:
        print(summaries.report(), file=sys.stderr)

    frame = to_frame(summaries)
    table = paper_table(frame)
    markdown = to_markdown(table)
    print(markdown)
    out = args.out or (args.sweep_dirs[0] / "tables" if args.sweep_dirs else Path("tables"))
    out.mkdir(parents=True, exist_ok=True)
    writers = {"md": ("table.md", lambda p: p.write_text(markdown)),
               "tex": ("table.tex", lambda p: p.write_text(to_latex(table))),
               "csv": ("table.csv", lambda p: table.to_csv(p, index=False))}  # fmt: skip
    written = []
    for fmt, (name, write) in writers.items():
        if fmt in formats:
            write(out / name)
            written.append(out / name)
    frame.to_csv(out / "runs.csv", index=False)
    written.append(out / "runs.csv")
    if not args.no_plots:
        written += save_plots(summaries, out / "plots")
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
