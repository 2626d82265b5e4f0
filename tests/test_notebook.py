"""analysis.ipynb: committed without outputs, and it executes top to bottom headless (nbclient,
kernel "python3" = ipykernel in this interpreter) on fabricated tables and on the committed ones."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pandas")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.test_results import fabricate_tables  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "analysis.ipynb")
COMMITTED = os.path.join(ROOT, "results", "tables")


def _execute(monkeypatch, tables: str, figures: str):
    monkeypatch.setenv("RESETBENCH_TABLES", tables)
    monkeypatch.setenv("RESETBENCH_FIGURES", figures)
    monkeypatch.delenv("RESETBENCH_SUFFIX", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                     resources={"metadata": {"path": ROOT}})
    client.execute()          # raises CellExecutionError on the first failing cell
    return nb


def _outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    source = "\n".join(c.source for c in code)
    assert "RESETBENCH_TABLES" in source and "benchmarks" in source
    assert "plt." not in source and "matplotlib" not in source   # figures come from benchmarks.plots


def test_notebook_runs_on_fabricated_tables(tmp_path, monkeypatch):
    tables = fabricate_tables(str(tmp_path / "tables"), str(tmp_path / "runs"))
    nb = _execute(monkeypatch, tables, str(tmp_path / "fig"))
    from benchmarks.plots import figure_specs
    assert len(_outputs(nb, "image/png")) == len(figure_specs())   # every figure drawn
    assert sorted(os.listdir(tmp_path / "fig")) == sorted(name for name, _ in figure_specs())
    html = "".join(o["data"]["text/html"] for o in _outputs(nb, "text/html"))
    assert "speedup_vs_padded" in html                             # the summary table is shown
    assert "time to target (s)" in html                            # the study ranking is shown
    assert "reset_cost_ratio" in html or "0.03" in html            # the kernel table is shown


def test_notebook_without_tables_notes_and_finishes(tmp_path, monkeypatch):
    nb = _execute(monkeypatch, str(tmp_path / "none"), str(tmp_path / "fig"))
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "skipped" in text and not _outputs(nb, "image/png")


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "runs.csv")),
                    reason="results/tables not committed yet")
def test_notebook_runs_on_committed_tables(tmp_path, monkeypatch):
    nb = _execute(monkeypatch, COMMITTED, str(tmp_path / "fig"))
    assert _outputs(nb, "image/png")
