"""The analysis notebook runs top to bottom on a tiny fake sweep and draws its figures."""

import json
import sys
from pathlib import Path

import pytest

from tests.test_tables import fake_summary, write_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def test_parameter_cell_is_tagged():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and "SKELETON_SWEEP_DIR" in cells[0].source and "SWEEP_DIR =" in cells[0].source


def test_notebook_runs_on_fake_sweep(tmp_path, monkeypatch):
    sweep = tmp_path / "multirun" / "quick"
    for task in ("sst2", "rte"):
        for seed in (0, 1):
            for criterion in ("attribution", "random"):
                rate = 0.5 + 0.1 * seed if criterion == "attribution" else 0.2
                summary = fake_summary(task, seed=seed, criterion=criterion, rate=rate)
                write_run(sweep, summary, f"task={task},seed={seed},criterion={criterion}")
    # A kernel spec pointing at this interpreter, found first via JUPYTER_PATH: no user-level install.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SKELETON_SWEEP_DIR", str(sweep))  # the parameter cell reads it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=60, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # curves, speedup, heatmap, criteria ablation
    assert any("| SST-2 |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
