"""Paper tables and figures from finished runs: read run summaries (``summary.json`` files or W&B runs),
tabulate, plot.

Everything here reads only summaries, through ``skeleton.summary`` (one schema, one upgrade path), so a
sweep can be re-tabled offline at any time, and torch is never imported. How a benchmark is scored (its
tasks and their order, display names, MNLI's two dev sets counting as one task, the diagnostics left out,
composite headlines) comes from the torch-free task registry, so the tables cannot drift from the metrics.
Scores in summaries are fractions; tables show points (x100), rates and kept fractions percent.
The command line lives in ``skeleton.cli.tables``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from skeleton import summary as schema
from skeleton.summary import RunSummary, SummaryError
from skeleton.tasks import BENCHMARKS, COMPOSITES, TASKS, display_name

log = logging.getLogger(__name__)

ERROR = "error.json"
GROUP = ("model", "psi", "criterion")
KEY_NAMES = {"psi": "ψ (points)"}
# Table columns: (header, decimals). Scores in points, rate and params in percent.
COLUMNS = {
    "dense_dev": ("Prompt tuning", 1),
    "pruned_dev": ("Skeleton", 1),
    "rate": ("Rate (%)", 1),
    "params_kept": ("Params kept (%)", 1),
    "speedup": ("Speedup (×)", 2),
}
# The flat frame's columns, one row per run (see ``to_frame``).
FRAME_COLUMNS = ("task", "benchmark", "model", "seed", "psi", "criterion", "token_agg", "headline",
                 "dense_dev", "pruned_dev", "dense_search", "pruned_search", "rate", "ffn_kept_fraction",
                 "params_kept_fraction", "layers_kept_fraction", "speedup", "ideal_speedup",
                 "train_seconds", "degenerate", "sweep", "run_dir")  # fmt: skip


# ---- loading ---------------------------------------------------------------------------------------
class Summaries(list):
    """A list of complete ``RunSummary``s that also remembers what was skipped, so callers can report it.

    ``failed``: error.json paths (or W&B run paths); ``incomplete``: summary.json paths without
    ``status: complete`` (or W&B runs still going); ``unreadable``: (path, reason) of summaries that
    claim to be there but cannot be read (damaged JSON, a newer schema, fields this code does not know).
    """

    def __init__(
        self, items: Iterable[RunSummary] = (), searched=(), failed=(), incomplete=(), unreadable=()
    ):
        super().__init__(items)
        self.searched = list(searched)
        self.failed = list(failed)
        self.incomplete = list(incomplete)
        self.unreadable = list(unreadable)

    def __add__(self, other):
        other = other if isinstance(other, Summaries) else Summaries(other)
        return Summaries(
            [*self, *other],
            self.searched + other.searched,
            self.failed + other.failed,
            self.incomplete + other.incomplete,
            self.unreadable + other.unreadable,
        )

    def report(self, limit: int = 5) -> str:
        where = ", ".join(map(str, self.searched)) or "nowhere"
        lines = [f"{len(self)} complete run(s) from {where}"]
        skipped = (
            ("failed run(s)", list(map(str, self.failed))),
            ("incomplete run(s)", list(map(str, self.incomplete))),
            ("unreadable summary(ies)", [reason for _, reason in self.unreadable]),
        )
        for name, items in skipped:
            if items:
                shown = "".join(f"\n  {p}" for p in items[:limit])
                more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
                lines.append(f"{len(items)} {name}, skipped:{shown}{more}")
        return "\n".join(lines)


def load_summaries(path_or_paths: str | Path | Sequence[str | Path]) -> Summaries:
    """Complete summaries found recursively under each path (a sweep, a run folder or a summary.json).

    Failed runs (``error.json`` and no complete summary), unfinished ones and unreadable summaries are
    skipped but counted, so one damaged file never hides the rest of a sweep.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    found, failed, incomplete, unreadable, seen = [], [], [], [], set()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob(schema.FILENAME)) + sorted(root.rglob(ERROR))
        for file in files:
            run_dir = file.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            path = run_dir / schema.FILENAME
            try:
                run = _read_complete(path)
            except SummaryError as err:
                run, problem = None, (path, str(err))
            else:
                problem = None
            if run is not None:
                found.append(run)
            elif (run_dir / ERROR).exists():
                failed.append(run_dir / ERROR)
            elif problem:
                unreadable.append(problem)
            else:
                incomplete.append(path)
    result = Summaries(found, paths, failed, incomplete, unreadable)
    log.info(result.report())
    return result


def _read_complete(path: Path) -> RunSummary | None:
    """The summary at ``path`` if it is complete; None if absent or unfinished; SummaryError if damaged."""
    try:
        data = schema.read_json(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SummaryError(f"{path} cannot be read ({err})") from None
    if data.get("status") != schema.COMPLETE:
        return None
    return RunSummary.from_dict(data, str(path))


def load_wandb(project: str, entity: str | None = None, filters: dict | None = None, api=None) -> Summaries:
    """Summaries of W&B runs, read from each run's config key ``skeleton_summary``.

    ``project`` may be ``ENTITY/PROJECT``. Pass ``api`` to reuse a ``wandb.Api`` (or a stand-in in tests).
    A summary without a ``run_dir`` gets the W&B run path there, so every table row says where it came from.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    found, failed, incomplete, unreadable = [], [], [], []
    for run in api.runs(path, filters=filters):
        data = _unwrap(dict(run.config).get(schema.WANDB_KEY))
        name = "/".join(map(str, getattr(run, "path", None) or [path, run.id]))
        if isinstance(data, dict) and data.get("status") == schema.COMPLETE:
            try:
                summary = RunSummary.from_dict(data, source=f"wandb:{name}")
            except SummaryError as err:
                unreadable.append((name, str(err)))
                continue
            summary.run_dir = summary.run_dir or name
            found.append(summary)
        elif getattr(run, "state", "") in ("failed", "crashed"):
            failed.append(name)
        elif data is not None and not isinstance(data, dict):
            unreadable.append((name, f"wandb:{name}: config key {schema.WANDB_KEY!r} is not a summary"))
        else:
            incomplete.append(name)
    return Summaries(found, [f"wandb:{path}"], failed, incomplete, unreadable)


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


def _summaries(items: Iterable[RunSummary | Mapping]) -> list[RunSummary]:
    """Summaries as given; plain dicts (a summary.json's content) go through the schema first."""
    return [s if isinstance(s, RunSummary) else RunSummary.from_dict(dict(s), "summary dict") for s in items]


# ---- flat frame ------------------------------------------------------------------------------------
def to_frame(summaries: Iterable[RunSummary | Mapping]) -> pd.DataFrame:
    """One flat row per run: scores in points, rates and kept fractions as fractions."""
    return pd.DataFrame([_row(s) for s in _summaries(summaries)], columns=list(FRAME_COLUMNS))


def _row(s: RunSummary) -> dict:
    headline, sk = s.headline_metric, s.skeleton
    attribution = ((sk.skeleton_config if sk else None) or {}).get("attribution") or {}
    return {
        "task": s.task,
        "benchmark": s.benchmark or _benchmark_of(s.task),
        "model": s.model,
        "seed": s.seed,
        "psi": sk.psi if sk else None,
        "criterion": (sk.criterion if sk else None) or attribution.get("criterion"),
        "token_agg": attribution.get("token_agg"),
        "headline": headline,
        "dense_dev": _points(s.dense.dev, headline),
        "pruned_dev": _points(sk.pruned.dev if sk else None, headline),
        "dense_search": _points(s.dense.search, headline),
        "pruned_search": _points(sk.pruned.search if sk else None, headline),
        "rate": _num(sk.rate if sk else None),
        "ffn_kept_fraction": _num(sk.ffn.kept_fraction if sk else None),
        "params_kept_fraction": _ratio(sk.backbone_params if sk else None, "total"),
        "layers_kept_fraction": _ratio(sk.backbone_params if sk else None, "layers"),
        "speedup": _num(sk.latency.speedup if sk else None),
        "ideal_speedup": _num(sk.flops.ideal_speedup if sk else None),
        "train_seconds": _num((s.train or {}).get("seconds")),
        "degenerate": bool(sk.degenerate) if sk else False,
        "sweep": s.sweep,
        "run_dir": s.run_dir,
    }


def _benchmark_of(task: str | None) -> str | None:
    spec = TASKS.get(task)
    return spec.benchmark if spec else None


def _num(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _points(scores: Mapping | None, headline: str | None) -> float:
    """The headline score in points; rebuilds a composite (mean of its parts) when only the parts exist."""
    scores = scores or {}
    if headline in scores:
        return 100 * _num(scores[headline])
    parts = COMPOSITES.get(headline, ())
    if parts and all(p in scores for p in parts):
        return 100 * sum(_num(scores[p]) for p in parts) / len(parts)
    return math.nan


def _ratio(params, key: str) -> float:
    if params is None:
        return math.nan
    dense, pruned = params.dense or {}, params.pruned or {}
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
    """Registration order of the task registry (GLUE, then SuperGLUE, each in leaderboard order)."""
    order = list(TASKS)
    return (order.index(task), "") if task in order else (len(order), str(task))


def _unit(task: str) -> str:
    """The leaderboard task a row counts toward: MNLI matched and mismatched are both "mnli"."""
    spec = TASKS.get(task)
    return spec.score_unit if spec else task


def _is_diagnostic(task: str) -> bool:
    spec = TASKS.get(task)
    return bool(spec and spec.diagnostic)


def _with_average(stats: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """Append the benchmark's average row (the mean of per-task means) to its task rows."""
    members = stats[~stats["task"].map(_is_diagnostic)]
    if members.empty:
        return stats
    unit = members["task"].map(_unit)  # the specs of one leaderboard task count once
    means = members.groupby(unit)[list(COLUMNS)].mean().mean(skipna=False)
    merged = {u for u, n in unit.value_counts().items() if n > 1}
    names = [
        (TASKS[u].averaged_display or display_name(u)) if u in merged else display_name(t)
        for t, u in zip(members["task"], unit)
    ]
    names = list(dict.fromkeys(names))
    label = BENCHMARKS.get(benchmark, benchmark)
    average = {"task": f"{label} avg.", "benchmark": benchmark, **means, "avg_over": ", ".join(names)}
    return pd.concat([stats, pd.DataFrame([average])], ignore_index=True)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings as in a paper: ``mean ± std`` (std only with more than one run), ``–`` when missing."""
    flagged = (
        table["degenerate"].fillna(False).astype(bool) if "degenerate" in table else [False] * len(table)
    )
    names = [display_name(t) + (" †" if f else "") for t, f in zip(table["task"], flagged)]
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


def plot_curves(summaries: Sequence[RunSummary], group: Sequence[str] = GROUP):
    """Search score vs pruning rate per task: one line per group (seed-mean of the binary search's
    curves, interpolated on their joint rates), dense score dashed, chosen rates starred."""
    import numpy as np

    summaries = _summaries(summaries)
    curves = [(s.skeleton.curve if s.skeleton else None) or [] for s in summaries]
    frame = to_frame(summaries).assign(curve=curves)
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
        ax.set(title=display_name(task), xlabel="FFN neurons pruned (%)", ylabel="search score")
        ax.legend(fontsize="x-small")
    return fig


def plot_speedup(summaries: Sequence[RunSummary]):
    """Measured latency speedup of each run vs its pruning rate, with the ideal FLOP speedup (x)."""
    frame = to_frame(summaries).dropna(subset=["rate"])
    fig = _figure(5.5, 4)
    ax = fig.subplots()
    for task in _tasks(frame):
        sub = frame[frame["task"] == task]
        ax.scatter(100 * sub["rate"], sub["speedup"], label=display_name(task), alpha=0.8)
    ax.scatter(100 * frame["rate"], frame["ideal_speedup"], marker="x", color="gray", label="ideal (FLOPs)")
    ax.axhline(1, color="k", lw=0.8, ls=":")
    ax.set(xlabel="FFN neurons pruned (%)", ylabel="speedup over dense (×)", title="Speedup vs pruning rate")
    ax.legend(fontsize="x-small")
    return fig


def plot_criteria(summaries: Sequence[RunSummary], group: Sequence[str] = ("model", "psi")):
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
            ax.set_xticks(x + width * (len(criteria) - 1) / 2, [display_name(t) for t in tasks])
            ax.set(ylabel=ylabel, title=_label(keys, group))
        row[0].legend(fontsize="x-small")
    return fig


def plot_kept_heatmap(summaries: Sequence[RunSummary]):
    """Fraction of FFN neurons kept per layer, one row per pruned run: where the task's neurons live."""
    import numpy as np

    rows = []
    for s in _summaries(summaries):
        sk = s.skeleton
        kept, total = (sk.ffn.kept_per_layer, sk.ffn.total_per_layer) if sk else (None, None)
        if kept and total:
            label = f"{display_name(s.task)} ψ={_fmt_key(sk.psi)} {sk.criterion or ''} s{s.seed}"
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


def save_plots(summaries: Sequence[RunSummary], out_dir: str | Path) -> list[Path]:
    """Draw every figure that applies to these runs and save it as a PNG under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pruned = [s for s in _summaries(summaries) if s.skeleton is not None]
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
