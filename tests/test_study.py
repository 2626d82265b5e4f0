"""The fair study: matched work in every plan, the learning-rate rule, and the debug twins of the
verses and chapters plans run end to end (tune, select, final; collected, ranked, drawn)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pandas as pd
import pytest

from benchmarks import cli, registry, study
from resetbench.layouts import epoch_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANS = sorted(p for p in glob.glob(os.path.join(ROOT, "conf", "study", "*.yaml")) if not p.endswith("_debug.yaml"))


@pytest.mark.parametrize("path", PLANS, ids=[os.path.basename(p) for p in PLANS])
def test_plan_matches_valid_tokens_per_step_within_1_3x(path, tmp_path, monkeypatch):
    """Every strategy of a plan, with its overrides, feeds about the same valid tokens to each
    optimizer step (max / min <= 1.3 over an epoch of the plan's data), and covers every strategy."""
    monkeypatch.chdir(tmp_path)
    plan = study.load_plan(path)
    assert sorted(plan["strategies"]) == registry.group_options("strategy")
    per_step = {}
    for strategy, overrides in plan["strategies"].items():
        (job,) = cli.compose_jobs([f"+experiment={plan['experiment']}", f"strategy={strategy}", *overrides])
        cfg = job.config
        layout = registry.build_layout(cfg["strategy"], cfg["train"]["batch_size"], cfg["train"]["window"], 0)
        data = registry.build_dataset({**cfg["data"], "max_train_sequences": None}).load()
        stats = epoch_stats(layout.epoch(data.train, 0))
        per_step[strategy] = stats["valid_tokens"] / len(layout.epoch(data.train, 0))
    assert max(per_step.values()) / min(per_step.values()) <= 1.3, per_step


def test_learning_rate_rule_is_the_lowest_median_validation_loss():
    runs = pd.DataFrame([
        {"strategy": "a", "lr": 0.01, "eval_loss": 2.0, "status": "completed"},
        {"strategy": "a", "lr": 0.01, "eval_loss": 3.0, "status": "completed"},   # median 2.5
        {"strategy": "a", "lr": 0.001, "eval_loss": 2.4, "status": "completed"},
        {"strategy": "a", "lr": 0.1, "eval_loss": 1.0, "status": "diverged"},     # not completed: ignored
        {"strategy": "b", "lr": 0.004, "eval_loss": 2.0, "status": "completed"},
        {"strategy": "b", "lr": 0.002, "eval_loss": 2.0, "status": "completed"},  # a tie: the smaller rate
    ])
    table = study.select_lr(runs)
    assert study.chosen_rates(table) == {"a": 0.001, "b": 0.002}
    assert table["runs"].sum() == 5 and table["chosen"].sum() == 2


@pytest.mark.slow
def test_debug_studies_run_end_to_end(tmp_path):
    """verses_debug: tune and final; chapters_debug: final at the verses rates (its plan's
    ``lr_from``, so no flags: what ``make study`` runs); verses_gru_debug
    (the GRU): tune and final; then the tables, the ranking (every strategy, time to target) and
    the curves."""
    from benchmarks.plots import load_tables
    from benchmarks.results import main as collect_main
    from benchmarks.study_report import plot_study_curves, ranking
    tables, root = tmp_path / "tables", tmp_path / "runs"
    base = [sys.executable, "-m", "benchmarks.study", "--root", str(root), "--tables", str(tables)]
    for args in (["conf/study/verses_debug.yaml"],
                 ["conf/study/chapters_debug.yaml"],
                 ["conf/study/verses_gru_debug.yaml"]):
        r = subprocess.run(base + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    for plan in ("verses_debug", "verses_gru_debug"):
        lr = pd.read_csv(tables / f"study_lr_{plan}.csv")
        assert lr.groupby("strategy")["chosen"].sum().eq(1).all() and len(lr) == 8
    assert not (tables / "study_lr_chapters_debug.csv").exists()       # lr_from: no tuning of its own
    assert collect_main([str(root), "--out", str(tables), "--no-lengths"]) == 0
    t = load_tables(str(tables))
    runs = t["runs"]
    assert (runs["status"] == "completed").all() and runs["process_id"].nunique() == len(runs)
    cells = runs.groupby("experiment")["cell"].agg(lambda c: set(c))
    assert cells["study_verses_gru_debug"] == {"gru"} and cells["study_verses_debug"] == {"lstm"}
    for experiment, n in (("study_verses_debug", 8), ("study_chapters_debug", 4), ("study_verses_gru_debug", 4)):
        table = ranking(runs, experiment)
        assert sorted(table["strategy"]) == registry.group_options("strategy")
        assert table["seeds"].sum() == n and {"time_to_target_s", "reached"} <= set(table.columns)
        assert os.path.getsize(plot_study_curves(t["evals"], runs, str(tmp_path / f"{experiment}.png"), experiment)) > 10_000


def test_study_experiments_come_from_the_plans():
    from benchmarks import plots, registry
    plans = [n for n in registry.group_options("study") if not n.endswith("_debug")]
    assert plots.STUDIES == tuple(registry.group_config("study", n)["experiment"] for n in plans)
    assert "study_verses" in plots.STUDIES and all(e in registry.group_options("experiment") for e in plots.STUDIES)


def test_sweep_experiments_come_from_conf_and_the_makefile_uses_them():
    """``make sweeps`` runs every experiment file but the debug twins and the study's, derived
    from conf/experiment/ (a new experiment is one yaml file), through ``benchmarks.registry``."""
    names = registry.sweep_experiments()
    files = registry.group_options("experiment")
    assert {"compare", "peers", "waste", "window_chapters"} <= set(names)
    assert not any(n.endswith("_debug") or n in registry.study_experiments() for n in names)
    assert set(names) | set(registry.study_experiments()) == {n for n in files if not n.endswith("_debug")}
    assert all(f"{n}_debug" in files for n in names), "every sweep has a debug twin the tests run"
    out = subprocess.run([sys.executable, "-m", "benchmarks.registry", "sweeps"], cwd=registry.ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == names
    with open(os.path.join(registry.ROOT, "Makefile")) as fh:
        recipe = fh.read().split("\nsweeps:")[1].split("\n\n")[0]
    assert "-m benchmarks.registry sweeps" in recipe and "compare" not in recipe


def test_study_plans_run_after_the_plan_whose_rates_they_take(tmp_path, monkeypatch):
    """``make study`` order (``registry.study_plans``): a plan with ``lr_from`` after that plan;
    an unknown plan or a cycle is a one-line error, before anything runs."""
    order = registry.study_plans()
    assert sorted(order) == sorted(n for n in registry.group_options("study") if not n.endswith("_debug"))
    assert order.index("verses") < order.index("chapters")
    r = subprocess.run([sys.executable, "-m", "benchmarks.registry", "studies"], cwd=ROOT, capture_output=True,
                       text=True, check=True)
    assert r.stdout.split() == order
    with open(os.path.join(ROOT, "Makefile")) as fh:
        recipe = fh.read().split("\nstudy:")[1].split("\n\n")[0]
    assert "-m benchmarks.registry studies" in recipe and "verses" not in recipe
    for plans, problem in (({"a": "b", "b": "a"}, "cycle"), ({"a": "nope"}, "names no plan")):
        monkeypatch.setattr(registry, "group_options", lambda group, plans=plans: sorted(plans))
        monkeypatch.setattr(registry, "group_config", lambda group, name, plans=plans: {"lr_from": plans[name]})
        with pytest.raises(registry.ConfigError, match=problem):
            registry.study_plans()
    bad = tmp_path / "plan.yaml"
    bad.write_text(open(os.path.join(ROOT, "conf", "study", "chapters.yaml")).read().replace("lr_from: verses", "lr_from: nope"))
    with pytest.raises(SystemExit, match="lr_from='nope': no plan nope.yaml"):
        study.load_plan(str(bad))
