"""Tables and plots from fake sweeps: numbers must equal the summaries, averages the official composite."""

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from skeleton import summary as schema
from skeleton import tables
from skeleton.cli import tables as cli
from skeleton.summary import RunSummary, SummaryError

PNG = b"\x89PNG\r\n\x1a\n"


def fake_summary(task, psi=5.0, seed=0, dense=0.80, pruned=0.78, rate=0.5, **kw) -> dict:
    """A summary shaped like the training code's, with every number derived from the arguments.

    Version-less (as runs before ``schema_version`` wrote them), so every table test also goes through
    ``skeleton.summary.upgrade``."""
    headline = kw.get("headline", "accuracy")
    criterion = kw.get("criterion", "attribution")
    total, layers = 1000, 400
    return {
        "task": task,
        "benchmark": kw.get("benchmark", "glue"),
        "model": kw.get("model", "tiny"),
        "backbone": "tiny-bert",
        "seed": seed,
        "sweep": "fake",
        "headline_metric": headline,
        "dense": {"search": {headline: dense - 0.01}, "dev": kw.get("dense_dev", {headline: dense})},
        "pruned": {"search": {headline: pruned - 0.01}, "dev": {headline: pruned}},
        "psi": psi,
        "rate": rate,
        "curve": [[0.0, dense - 0.01], [rate / 2, dense - 0.01], [rate, pruned - 0.01], [0.95, 0.3]],
        "ffn": {"kept_per_layer": [40, 24], "total_per_layer": [64, 64], "kept_fraction": 1 - rate},
        "backbone_params": {
            "dense": {"total": total, "layers": layers},
            "pruned": {"total": total - layers * rate / 2, "layers": layers - layers * rate / 2},
        },
        "flops": {"dense": 100.0, "pruned": 100.0 * (1 - rate / 2), "ideal_speedup": 1 / (1 - rate / 2)},
        "latency": {
            "batch_size": 32,
            "seq_len": 128,
            "dense_ms": 2.0,
            "pruned_ms": 1.0,
            "speedup": kw.get("speedup", 1.5),
            "device": "cpu",
        },
        "speedup": kw.get("speedup", 1.5),
        "criterion": criterion,
        "skeleton_config": {"attribution": {"criterion": criterion, "token_agg": "mean"}},
        "status": "complete",
    }


def write_run(root: Path, summary: dict, name: str | None = None) -> Path:
    name = name or f"task={summary['task']},psi={summary['psi']},seed={summary['seed']}"
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


# 2 tasks x 2 psi x 2 seeds, every value distinct so a mix-up shows.
GRID = {
    (task, psi, seed): dict(
        dense=0.70 + 0.10 * t + 0.01 * seed,
        pruned=0.69 + 0.10 * t - 0.002 * psi + 0.013 * seed,
        rate=0.3 + 0.05 * psi + 0.02 * seed,
        speedup=1.2 + 0.1 * psi + 0.03 * seed,
    )
    for t, task in enumerate(("sst2", "rte"))
    for psi in (1.0, 5.0)
    for seed in (0, 1)
}


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "grid"
    for (task, psi, seed), values in GRID.items():
        write_run(root / f"psi={psi}", fake_summary(task, psi, seed, **values))  # nested folders too
    return root


def by_hand(task, psi, key):
    values = [v[key] for (t, p, _), v in GRID.items() if (t, p) == (task, psi)]
    return [100 * x for x in values] if key in ("dense", "pruned", "rate") else values


def test_table_numbers_equal_summaries(sweep):
    summaries = tables.load_summaries(sweep)
    assert len(summaries) == 8 and not summaries.failed and not summaries.incomplete
    table = tables.paper_table(tables.to_frame(summaries))
    for task in ("sst2", "rte"):
        for psi in (1.0, 5.0):
            row = table[(table["task"] == task) & (table["psi"] == psi)].iloc[0]
            assert row["n"] == 2 and row["model"] == "tiny" and row["criterion"] == "attribution"
            for col, key in (
                ("dense_dev", "dense"),
                ("pruned_dev", "pruned"),
                ("rate", "rate"),
                ("speedup", "speedup"),
            ):
                values = by_hand(task, psi, key)
                assert row[col] == pytest.approx(statistics.mean(values))
                assert row[f"{col}_std"] == pytest.approx(statistics.stdev(values))
            rates = [v["rate"] for (t, p, _), v in GRID.items() if (t, p) == (task, psi)]
            assert row["params_kept"] == pytest.approx(
                statistics.mean(100 * (1000 - 400 * r / 2) / 1000 for r in rates)
            )
    glue = table[(table["task"] == "GLUE avg.") & (table["psi"] == 5.0)].iloc[0]
    per_task = [statistics.mean(by_hand(t, 5.0, "pruned")) for t in ("sst2", "rte")]
    assert glue["pruned_dev"] == pytest.approx(statistics.mean(per_task))
    assert glue["avg_over"] == "SST-2, RTE"
    assert "SuperGLUE avg." not in set(table["task"])


def test_frame_fields(sweep):
    frame = tables.to_frame(tables.load_summaries(sweep))
    row = frame[(frame["task"] == "rte") & (frame["psi"] == 1.0) & (frame["seed"] == 1)].iloc[0]
    values = GRID[("rte", 1.0, 1)]
    assert row["pruned_search"] == pytest.approx(100 * values["pruned"] - 1)
    assert row["ffn_kept_fraction"] == pytest.approx(1 - values["rate"])
    assert row["layers_kept_fraction"] == pytest.approx(1 - values["rate"] / 2)
    assert row["ideal_speedup"] == pytest.approx(1 / (1 - values["rate"] / 2))
    assert row["token_agg"] == "mean" and row["headline"] == "accuracy"


def test_benchmark_averages_use_official_composite(tmp_path):
    runs = {
        "mrpc": fake_summary("mrpc", headline="acc_f1", dense=0.8),
        # no composite key: rebuilt from its parts, (0.70 + 0.90) / 2
        "stsb": fake_summary(
            "stsb", headline="pearson_spearman", dense_dev={"pearson": 0.7, "spearman": 0.9}
        ),
        "mnli": fake_summary("mnli", dense=0.6),
        "mnli-mm": fake_summary("mnli-mm", dense=0.7),
        "cb": fake_summary("cb", benchmark="superglue", headline="acc_macro_f1", dense=0.9),
        "multirc": fake_summary("multirc", benchmark="superglue", headline="f1a", dense=0.5),
        "record": fake_summary("record", benchmark="superglue", headline="f1", dense=0.4),
        "axb": fake_summary("axb", benchmark="superglue", dense=0.1),  # diagnostic: not averaged
    }
    for summary in runs.values():
        write_run(tmp_path, summary)
    table = tables.paper_table(tables.to_frame(tables.load_summaries(tmp_path))).set_index("task")
    assert table.loc["stsb", "dense_dev"] == pytest.approx(80.0)
    assert table.loc["GLUE avg.", "dense_dev"] == pytest.approx((80 + 80 + (60 + 70) / 2) / 3)
    assert table.loc["SuperGLUE avg.", "dense_dev"] == pytest.approx((90 + 50 + 40) / 3)
    assert table.loc["GLUE avg.", "avg_over"] == "MRPC, STS-B, MNLI (m/mm averaged)"
    assert "AX-b" not in table.loc["SuperGLUE avg.", "avg_over"]
    order = list(table.index)
    assert order.index("GLUE avg.") < order.index("cb") < order.index("SuperGLUE avg.")
    assert pd_isna(table.loc["mrpc", "dense_dev_std"])  # one seed: no std
    markdown = tables.to_markdown(table.reset_index())
    assert "| MRPC | 80.0 |" in markdown and "±" not in markdown.split("- ")[0]


def pd_isna(value) -> bool:
    return value != value


def test_incomplete_and_failed_runs_are_excluded_and_counted(sweep):
    write_run(sweep, {**fake_summary("sst2"), "status": "running"}, "unfinished")
    failed = write_run(sweep, {**fake_summary("sst2"), "status": "running"}, "crashed")
    (failed / "error.json").write_text(json.dumps({"type": "RuntimeError", "message": "boom"}))
    only_error = sweep / "died_early"
    only_error.mkdir()
    (only_error / "error.json").write_text("{}")
    (sweep / "torn").mkdir()
    (sweep / "torn" / "summary.json").write_text('{"status": "compl')
    summaries = tables.load_summaries([sweep, sweep / "psi=1.0"])  # overlapping paths: no double count
    assert len(summaries) == 8
    assert sorted(p.parent.name for p in summaries.failed) == ["crashed", "died_early"]
    assert [p.parent.name for p in summaries.incomplete] == ["unfinished"]
    assert [p.parent.name for p, _ in summaries.unreadable] == ["torn"]
    report = summaries.report()
    assert "2 failed run(s)" in report and "1 unreadable summary(ies)" in report
    assert f"{sweep / 'torn' / 'summary.json'} is not valid JSON" in report


def test_loaded_summaries_are_schema_objects(sweep):
    summaries = tables.load_summaries(sweep)
    assert all(isinstance(s, RunSummary) for s in summaries)
    run = next(s for s in summaries if (s.task, s.seed, s.skeleton.psi) == ("rte", 1, 5.0))
    values = GRID[("rte", 5.0, 1)]
    assert run.schema_version == schema.SCHEMA_VERSION
    assert run.score("dense") == pytest.approx(values["dense"])
    assert run.score("pruned", "search") == pytest.approx(values["pruned"] - 0.01)
    assert run.skeleton.latency.speedup == pytest.approx(values["speedup"])


def test_version_less_summary_loads_through_upgrade(tmp_path):
    old = fake_summary("cola", headline="mcc")
    old["warnings"] = ["learned nothing"]
    for key in ("criterion", "degenerate", "seconds", "schema_version"):
        old.pop(key, None)  # what summaries written before schema_version may lack
    write_run(tmp_path, old)
    (run,) = tables.load_summaries(tmp_path)
    assert run.schema_version == schema.SCHEMA_VERSION
    assert run.skeleton.degenerate  # schema 1: any warning meant "learned nothing"
    assert run.skeleton.criterion == "attribution"  # from skeleton_config
    assert run.skeleton.seconds == {}
    # written back it carries the version, and reads the same
    again = RunSummary.from_dict(json.loads(json.dumps(run.to_dict())), "again")
    assert again == run and again.to_dict()["schema_version"] == schema.SCHEMA_VERSION


def test_tables_equal_for_version_less_and_current_summaries(sweep, tmp_path):
    current = tmp_path / "current"
    for run in tables.load_summaries(sweep):
        write_run(current, run.to_dict(), f"{run.task},{run.skeleton.psi},{run.seed}")
    old, new = (tables.paper_table(tables.to_frame(tables.load_summaries(p))) for p in (sweep, current))
    assert tables.to_markdown(old) == tables.to_markdown(new)
    assert old.equals(new)


def test_newer_schema_is_refused_with_a_message_naming_the_file(sweep):
    newer = write_run(sweep, {**fake_summary("sst2"), "schema_version": schema.SCHEMA_VERSION + 1}, "newer")
    with pytest.raises(SummaryError, match=f"{newer / 'summary.json'} has schema version"):
        schema.read(newer)
    summaries = tables.load_summaries(sweep)
    assert len(summaries) == 8  # the rest of the sweep still tables
    ((path, reason),) = summaries.unreadable
    assert path == (newer / "summary.json").resolve() and "upgrade the package" in reason
    assert str(newer / "summary.json") in summaries.report()


def test_unknown_fields_are_reported_not_tabled(sweep):
    write_run(sweep, {**fake_summary("sst2"), "surprise": 1}, "odd")
    summaries = tables.load_summaries(sweep)
    assert len(summaries) == 8 and "unknown field(s) ['surprise']" in summaries.unreadable[0][1]


def test_library_modules_import_without_torch():
    code = (
        "import sys; import skeleton.tables, skeleton.summary, skeleton.tasks, skeleton.cli.tables; "
        "from skeleton.tasks import get_task; get_task('record').convert; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_writes_tables_and_plots(sweep, capsys):
    for seed in (0, 1):
        write_run(
            sweep / "random", fake_summary("sst2", seed=seed, criterion="random", rate=0.2 + 0.1 * seed)
        )
    assert cli.main([str(sweep)]) == 0
    out = sweep / "tables"
    printed = capsys.readouterr().out
    assert "| SST-2 |" in printed and "criterion = random" in printed
    for name in ("table.md", "table.tex", "table.csv", "runs.csv"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed
    assert "\\toprule" in (out / "table.tex").read_text() and "$\\pm$" in (out / "table.tex").read_text()
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 10
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots == {"score_vs_rate.png", "speedup_vs_rate.png", "kept_per_layer.png", "criteria.png"}
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 2000


def test_cli_formats_and_no_plots(sweep, tmp_path):
    assert cli.main([str(sweep), "--out", str(tmp_path / "t"), "--formats", "csv", "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["runs.csv", "table.csv"]


def test_cli_error_names_where_it_looked_and_the_failures(tmp_path):
    run = tmp_path / "sweep" / "a=1"
    run.mkdir(parents=True)
    (run / "error.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path / "sweep")])
    message = str(exit_info.value.code)
    assert "no complete summary.json" in message and str(tmp_path / "sweep") in message
    assert "1 failed" in message and str(run / "error.json") in message


class FakeRun:
    def __init__(self, run_id, config, state="finished"):
        self.id, self.config, self.state, self.path = run_id, config, state, ["me", "proj", run_id]


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return self._runs


def test_load_wandb_reads_summaries_from_run_configs(monkeypatch, tmp_path):
    api = FakeApi(
        [
            FakeRun("a", {"skeleton_summary": fake_summary("sst2", seed=0), "lr": 0.3}),
            FakeRun("b", {"skeleton_summary": {"value": fake_summary("sst2", seed=1)}}),  # raw-config form
            FakeRun("c", {"lr": 0.3}, state="crashed"),
            FakeRun("e", {"skeleton_summary": {**fake_summary("sst2"), "schema_version": 99}}),
            FakeRun(
                "d", {"skeleton_summary": {**fake_summary("sst2"), "status": "running"}}, state="running"
            ),
        ]
    )
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(Api=lambda: api))
    summaries = tables.load_wandb("proj", entity="me", filters={"config.sweep": "x"})
    assert api.calls == [("me/proj", {"config.sweep": "x"})]
    assert [s.seed for s in summaries] == [0, 1] and all(isinstance(s, RunSummary) for s in summaries)
    assert summaries.failed == ["me/proj/c"] and summaries.incomplete == ["me/proj/d"]
    ((name, reason),) = summaries.unreadable
    assert name == "me/proj/e" and "wandb:me/proj/e has schema version 99" in reason
    frame = tables.to_frame(summaries)
    assert list(frame["run_dir"]) == ["me/proj/a", "me/proj/b"]  # no run_dir recorded: the W&B run

    assert cli.main(["--wandb", "me/proj", "--out", str(tmp_path / "w"), "--no-plots"]) == 0
    assert api.calls[-1] == ("me/proj", None)
    assert (tmp_path / "w" / "table.md").exists()


def test_degenerate_runs_are_marked_in_the_table():
    healthy = RunSummary.from_dict(fake_summary("sst2"))
    stuck = RunSummary.from_dict({**fake_summary("cola", headline="mcc"), "warnings": ["learned nothing"]})
    table = tables.paper_table(tables.to_frame([healthy, stuck]))
    text = tables.to_markdown(table)
    assert "CoLA †" in text and "SST-2 †" not in text
    assert "†: the dense prompt-tuned model answered every search example alike" in text


def test_other_warnings_do_not_mark_a_run_degenerate():
    healthy = {
        **fake_summary("sst2"),
        "warnings": ["pruning.head_rate=0.5 alone drops ..."],
        "degenerate": False,
    }
    stuck = {**fake_summary("cola", headline="mcc"), "warnings": ["learned nothing"], "degenerate": True}
    runs = [RunSummary.from_dict(s, "test") for s in (healthy, stuck)]
    text = tables.to_markdown(tables.paper_table(tables.to_frame(runs)))
    assert "CoLA †" in text and "SST-2 †" not in text
