"""Figures (benchmarks/plots.py): every plot function writes a non-empty PNG from fabricated tables
and from the committed tables (results/tables, when present); a missing experiment is a note,
never a crash; the summary table ranks strategies and compares them with padded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pd = pytest.importorskip("pandas")    # the analysis extra: pip install -e '.[analysis]'
pytest.importorskip("matplotlib")

from benchmarks import plots, registry, results  # noqa: E402
from tests.test_results import (fabricate_kernel_rows, fabricate_lengths, fabricate_study,  # noqa: E402
                                fabricate_tables)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "results", "tables")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    base = tmp_path_factory.mktemp("plots")
    folder = fabricate_tables(str(base / "tables"), str(base / "runs"))
    return plots.load_tables(folder)


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head == PNG and os.path.getsize(path) > 2000


def _draw_each(t, out, suffix=""):
    written = []
    for name, draw in plots.figure_specs(suffix):
        written.append(draw(t, os.path.join(out, name)))
    return written


def test_each_plot_writes_a_png(tables, tmp_path):
    paths = [
        plots.plot_throughput(tables["runs"], str(tmp_path / "a.png")),
        plots.plot_padding(tables["runs"], str(tmp_path / "b.png")),
        plots.plot_loss_vs_time(tables["evals"], str(tmp_path / "c.png"), tables["runs"]),
        plots.plot_loss_vs_tokens(tables["evals"], str(tmp_path / "d.png"), tables["runs"]),
        plots.plot_gain_vs_padding(tables["runs"], str(tmp_path / "e.png")),
        plots.plot_lengths(tables["lengths"], str(tmp_path / "f.png")),
        plots.plot_loss_vs_window(tables["runs"], str(tmp_path / "g.png")),
    ]
    for p in paths:
        assert _is_png(p), p


def test_plots_work_on_frames_straight_from_collect(tmp_path):
    """The tables need not go through CSV: collect()'s frames plot the same."""
    fabricate_study(str(tmp_path / "runs"), backends=("torch",), seeds=(0,))
    runs, steps, evals, _ = results.collect(str(tmp_path / "runs"), warn=False)
    ker, mm = fabricate_kernel_rows()
    t = {"runs": runs, "steps": steps, "evals": evals, "lengths": fabricate_lengths(), "kernels": ker, "matmul": mm}
    for p in _draw_each(t, str(tmp_path / "fig")):
        assert _is_png(p)


def test_gains_match_packed_with_its_baseline(tables):
    g = plots.gains(tables["runs"], "waste", "padded")
    assert len(g) == 4                                  # one per sigma
    assert (g["gain"] > 1).all()
    # fabricated throughput scales with (1 - nominal pad): the gain is the ideal, up to the
    # rounding of the fabricated valid-token counts
    assert ((g["gain"] / g["ideal"] - 1).abs() < 0.02).all()
    assert len(plots.gains(tables["runs"], "waste", "reset_all")) == 4


def test_summary_table_ranks_and_compares(tables):
    t = plots.summary_table(tables["runs"], tables["evals"])
    assert list(t["backend"].unique()) == ["jax", "keras", "torch"]      # conf/backend/'s names, sorted
    assert len(t) == 9 and t["runs"].eq(2).all()
    for _, g in t.groupby("backend"):
        assert g["rank"].tolist() == [1, 2, 3]
        assert g["valid_tokens_per_s_median"].is_monotonic_decreasing
        packed, padded = g.set_index("strategy").loc["packed"], g.set_index("strategy").loc["padded"]
        assert padded["speedup_vs_padded"] == pytest.approx(1.0)
        assert packed["speedup_vs_padded"] == pytest.approx((1 - 0.01) / (1 - 0.35), rel=1e-3)
        assert padded["eval_loss_diff_vs_padded"] == pytest.approx(0.0)
        assert packed["eval_loss_diff_vs_padded"] < 0         # fabricated packed loss is lower
    final = plots.summary_table(tables["runs"])            # without evals: final eval loss
    assert len(final) == 9 and final["eval_loss_diff_vs_padded"].notna().all()
    assert "| backend | rank |" in plots.to_markdown(t)


def test_missing_experiment_is_a_note_not_a_crash(tables, tmp_path):
    only_compare = {**tables, "runs": tables["runs"][tables["runs"]["experiment"] == "compare"],
                    "lengths": pd.DataFrame()}
    notes = []
    written = plots.build_all(only_compare, str(tmp_path), echo=notes.append)
    names = {os.path.basename(p) for p in written}
    assert {"throughput.png", "padding.png", "loss_vs_time.png", "summary.md"} <= names
    assert "gain_vs_padding.png" not in names and "loss_vs_window.png" not in names
    skipped = [n for n in notes if n.strip().startswith("skipped")]
    # throughput_gru, summary_gru, gain, lengths, window, the three study figures, window_chapters,
    # the three study rankings
    assert len(skipped) == 12, notes
    with pytest.raises(plots.NoData):
        plots.plot_loss_vs_window(only_compare["runs"], str(tmp_path / "w.png"))


def test_incomplete_runs_are_not_aggregated(tables, tmp_path):
    runs = tables["runs"].copy()
    mask = (runs["experiment"] == "compare") & (runs["backend"] == "keras")
    runs.loc[mask, "complete"] = False
    runs.loc[mask, "status"] = "interrupted"
    t = plots.summary_table(runs, tables["evals"])
    assert "keras" not in set(t["backend"])
    assert _is_png(plots.plot_loss_vs_time(tables["evals"], str(tmp_path / "c.png"), runs))


def test_cli_rebuilds_from_tables_and_survives_empty(tables, tmp_path):
    folder = tmp_path / "tables"
    fabricate_tables(str(folder), str(tmp_path / "runs"))
    out = tmp_path / "fig"
    r = subprocess.run([sys.executable, "-m", "benchmarks.plots", "--tables", str(folder), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert len(pngs) == len(plots.figure_specs()) and all(_is_png(out / p) for p in pngs)
    assert {f"ranking_{s}.md" for s in plots.STUDIES} <= set(os.listdir(out))
    assert (out / "summary.md").read_text().count("\n") == 11
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-m", "benchmarks.plots", "--tables", str(empty), "--out", str(tmp_path / "f2")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    # every figure, the summary tables and the study rankings
    expected = len(plots.figure_specs()) + len(plots.SUMMARIES) + len(plots.STUDIES)
    assert r.returncode == 0 and r.stdout.count("skipped") == expected, r.stdout + r.stderr


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMMITTED, "runs.csv")),
                    reason="results/tables not committed yet (python -m benchmarks.results writes it)")
def test_committed_tables_plot(tmp_path):
    t = plots.load_tables(COMMITTED)
    written = plots.build_all(t, str(tmp_path), echo=lambda s: None)
    pngs = {os.path.basename(p): p for p in written if p.endswith(".png")}
    assert pngs and all(_is_png(p) for p in pngs.values())
    expected = {"compare": ("throughput.png", "padding.png", "loss_vs_time.png", "loss_vs_tokens.png"),
                "waste": ("gain_vs_padding.png",), "window": ("loss_vs_window.png",)}
    done = set(t["runs"].loc[t["runs"]["status"] == "completed", "experiment"])
    for name, figures in expected.items():
        if name in done:
            assert set(figures) <= set(pngs), (name, sorted(pngs))
    if len(t["lengths"]):
        assert "lengths.png" in pngs


def test_every_backend_and_strategy_gets_its_own_color_and_marker(monkeypatch):
    """Colors and markers come from conf/ by sorted name: distinct for every strategy (and the
    peer pseudo-strategy) and backend, and a new one gets its own without a change to plots.py."""
    from benchmarks import registry

    def distinct(names, pick):
        got = {n: pick(n) for n in names}
        return len(set(got.values())) == len(got) and "grey" not in got.values()

    assert set(plots.strategy_names()) == set(registry.group_options("strategy")) | {plots.PEER}
    assert plots.backend_names() == registry.group_options("backend")
    assert distinct(plots.strategy_names(), plots.strategy_color)
    assert distinct(plots.backend_names(), plots.backend_marker)
    real = registry.group_options
    monkeypatch.setattr(registry, "group_options", lambda g: sorted(real(g) + ["zz_new"]))
    assert "zz_new" in plots.strategy_names() and "zz_new" in plots.backend_names()
    assert distinct(plots.strategy_names(), plots.strategy_color)
    assert distinct(plots.backend_names(), plots.backend_marker)


def test_select_marks_peer_runs_by_role_and_reads_old_tables():
    """``kernel_role`` peer puts a run under strategy ``peer`` whatever its kernel label says; a
    table written before the column existed falls back to the ``.peer.`` label."""
    new = pd.DataFrame({"strategy": ["padded", "padded", "packed"], "status": ["completed"] * 3,
                        "kernel": ["x.own_varlen", "x.fused", "x.peer.odd_but_exact"],
                        "kernel_role": ["peer", "exact", "exact"]})
    assert list(plots.select(new)["strategy"]) == ["peer", "padded", "packed"]
    old = new.drop(columns="kernel_role").assign(kernel=["x.peer.pack", "x.fused", "x.loop"])
    assert list(plots.select(old)["strategy"]) == ["peer", "padded", "packed"]
    mixed = new.assign(kernel_role=[None, "exact", None], kernel=["x.peer.pack", "x.fused", "x.loop"])
    assert list(plots.select(mixed)["strategy"]) == ["peer", "padded", "packed"]
    assert list(plots.roles(old.assign(kernel_option=["peer", "native", "loop"]))) == ["peer", "native", "exact"]


def test_kernels_figure_reads_kernels_csv_without_roles(tmp_path):
    """kernels.csv written before ``kernel_role`` existed: the baselines are told by kernel_option."""
    ker, mm = fabricate_kernel_rows()
    old = pd.DataFrame(ker).drop(columns="kernel_role")
    assert _is_png(plots.kernels_figure(old, mm, str(tmp_path / "k.png")))


def test_every_cell_gets_its_summary_and_throughput_figure():
    """One summary table and one throughput figure per cell of conf/cell/ (registry.cell_suffixes),
    each over experiments that exist: the default cell's ``compare`` / ``peers``, another cell's
    ``compare_<cell>`` / ``peers_<cell>``, each training that cell."""
    import yaml
    cells = registry.group_options("cell")
    suffixes = registry.cell_suffixes()
    assert len(suffixes) == len(cells) and suffixes[0] == "" and registry.default_cell() in cells
    assert [name for name, _ in plots.SUMMARIES] == [f"summary{s}" for s in suffixes]
    names = [name for name, _ in plots.figure_specs()]
    assert all(f"throughput{s}.png" in names for s in suffixes)
    for sfx in suffixes:
        cell = sfx[1:] or registry.default_cell()
        for experiment in (f"compare{sfx}", f"peers{sfx}"):
            assert experiment in registry.group_options("experiment"), experiment
            with open(os.path.join(registry.CONF_DIR, "experiment", f"{experiment}.yaml")) as fh:
                text = yaml.safe_load(fh)
            assert text.get("model", {}).get("cell", registry.default_cell()) == cell, (experiment, text.get("model"))
