"""skeleton-tables: paper tables (Markdown, LaTeX, CSV) and PNG plots from sweep folders or a W&B project.

A thin command over ``skeleton.tables``: it finds the summaries, reports what it skipped, writes the files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from skeleton.extras import MissingExtraError, require

FORMATS = ("md", "tex", "csv")


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
    if formats - set(FORMATS):
        parser.error(f"unknown format(s): {', '.join(sorted(formats - set(FORMATS)))}")
    try:
        require("analysis", "skeleton-tables", ("pandas",) if args.no_plots else None)
    except MissingExtraError as err:
        parser.exit(2, f"skeleton-tables: error: {err}\n")
    from skeleton import tables  # pandas: imported once the extra is known to be there

    summaries = tables.load_summaries(args.sweep_dirs) if args.sweep_dirs else tables.Summaries()
    if args.wandb:
        summaries = summaries + tables.load_wandb(args.wandb)
    if not summaries:
        sys.exit(
            f"skeleton-tables: no complete summary.json found (searched recursively).\n{summaries.report()}"
        )
    if summaries.failed or summaries.incomplete or summaries.unreadable:
        print(summaries.report(), file=sys.stderr)

    frame = tables.to_frame(summaries)
    table = tables.paper_table(frame)
    markdown = tables.to_markdown(table)
    print(markdown)
    out = args.out or (args.sweep_dirs[0] / "tables" if args.sweep_dirs else Path("tables"))
    out.mkdir(parents=True, exist_ok=True)
    writers = {"md": ("table.md", lambda p: p.write_text(markdown)),
               "tex": ("table.tex", lambda p: p.write_text(tables.to_latex(table))),
               "csv": ("table.csv", lambda p: table.to_csv(p, index=False))}  # fmt: skip
    written = []
    for fmt, (name, write) in writers.items():
        if fmt in formats:
            write(out / name)
            written.append(out / name)
    frame.to_csv(out / "runs.csv", index=False)
    written.append(out / "runs.csv")
    if not args.no_plots:
        written += tables.save_plots(summaries, out / "plots")
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
