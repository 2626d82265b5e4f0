"""The study's Hydra experiments: each ``*_debug`` sweep runs through ``python run.py -m
+experiment=X_debug`` and the collector sees every run (one per point of the sweep axes), completed,
with periodic evals; the full experiments compose with the axes the study needs; a sweep also runs
through the joblib and submitit_local launchers.

The subprocesses get one thread per framework (OMP/TF/XLA variables): these are correctness checks
of tiny models on a shared machine, where spinning thread pools only slow them down."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("pandas")         # the analysis extra: pip install -e '.[analysis]'
pytest.importorskip("matplotlib")

from benchmarks import plots, registry, results  # noqa: E402
from tests.helpers import REQUIRE_ALL  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
              "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


def composed(name: str):
    """conf/experiment/NAME.yaml composed by Hydra (its parents too), with the hydra node."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)


def sweep_axes(name: str) -> dict:
    """``hydra.sweeper.params`` of experiment NAME as {key: [values]}, each axis expanded by Hydra's
    own override parser (``glob(*)`` over a config group needs its config loader)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = composed(name).hydra.sweeper.params
    with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
        return {o.get_key_element(): list(o.sweep_string_iterator()) if o.is_sweep_override()
                else [o.get_value_element_as_str()] for o in parsed}


def installed_backends(names):
    ok = [b for b in names if not registry.missing_requirements(registry.backend_configs()[b])]
    if REQUIRE_ALL and ok != list(names):
        pytest.fail(f"backends not installed: {sorted(set(names) - set(ok))} (RESETBENCH_REQUIRE_ALL=1)")
    return ok


def run_sweep(*args: str, timeout: int = 300):
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "-m", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _check_runs(runs, experiment, n):
    assert len(runs) == n, runs[["run_dir", "status"]].to_string()
    assert (runs["status"] == "completed").all(), runs[["run_dir", "status", "problem"]].to_string()
    assert runs["complete"].all() and (runs["experiment"] == experiment).all()
    assert runs["run_dir"].is_unique


@pytest.mark.parametrize("name", ["compare_debug", "waste_debug", "window_debug", "peers_debug", "peers_gru_debug"])
def test_debug_experiment_runs_and_is_collected(tmp_path, name):
    axes = sweep_axes(name)
    extra = []
    if "backend" in axes:
        have = installed_backends(axes["backend"])
        if not have:
            pytest.skip("no backend of the sweep installed")
        if have != axes["backend"]:
            axes["backend"] = have
            extra.append(f"backend={','.join(have)}")
    sweep_dir = tmp_path / f"{name}_2026-01-01_00-00-00"
    r = run_sweep(f"+experiment={name}", f"hydra.sweep.dir={sweep_dir}", *extra)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])

    runs, steps, evals, problems = results.collect(str(tmp_path), warn=False)
    assert problems == []
    n = 1
    for values in axes.values():
        n *= len(values)
    _check_runs(runs, name, n)
    # every point of the sweep is there exactly once
    columns = {"backend": "backend", "strategy": "strategy", "train.seed": "seed",
               "train.window": "window", "data.length.sigma": "data.length.sigma",
               "backend.kernel": "backend.kernel"}
    seen = {tuple(str(row[columns[k]]) for k in axes) for _, row in runs.iterrows()}
    assert seen == set(itertools.product(*axes.values()))
    # the fixed token budget stopped each run; periodic evals give loss curves
    budget = composed(name).train.max_valid_tokens
    assert (runs["stop_reason"] == "token_budget").all()
    assert (runs["valid_tokens"] >= budget).all()
    assert (evals.groupby("run_dir").size() >= 2).all() and evals["run_dir"].nunique() == n
    assert steps["run_dir"].nunique() == n
    assert (runs["pad_fraction"][runs["strategy"] == "packed"] < 0.1).all()

    if name == "compare_debug":
        table = plots.summary_table(runs, evals, name)
        assert set(table["backend"]) == set(axes["backend"]) and len(table) == len(runs)
        # same weights, same data, same layouts: the backends agree on the eval loss
        spread = runs.groupby("strategy")["eval_loss"].agg(lambda s: s.max() - s.min())
        assert (spread < 0.02).all(), spread


def test_full_experiments_compose_with_their_axes():
    """compare / waste / window / peers (and their GRU twins): the axes (composed by Hydra, nothing
    run); every point of every token-budget experiment validates."""
    frameworks = [b for b in registry.group_options("backend") if b != "numpy"]    # not the oracle
    assert sweep_axes("compare") == {"backend": frameworks, "strategy": registry.group_options("strategy"),
                                     "train.seed": ["0", "1", "2"]}
    assert sweep_axes("waste")["strategy"] == registry.group_options("strategy")
    assert len(sweep_axes("waste")["data.length.sigma"]) >= 4
    assert sweep_axes("window")["train.window"] == ["16", "32", "64", "128", "256"]
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from benchmarks.config import validate
    assert sweep_axes("peers") == {"backend": frameworks, "strategy": ["padded"],
                                   "backend.kernel": ["peer"], "train.seed": ["0", "1", "2"]}
    assert sweep_axes("compare_gru") == sweep_axes("compare") and sweep_axes("peers_gru") == sweep_axes("peers")
    # every experiment at a token budget (the study's run one epoch each: tests/test_study.py)
    for name in [e for e in registry.group_options("experiment") if not e.startswith("study_")]:
        cfg = composed(name)
        assert cfg.hydra.sweep.dir.startswith(f"results/runs/{name}_")
        job = OmegaConf.to_container(cfg, resolve=False)
        job.pop("hydra")
        for key, values in sweep_axes(name).items():   # every point validates
            for value in values:
                point = OmegaConf.create(job)
                if key in ("backend", "strategy"):
                    with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3"):
                        point = compose(config_name="config", overrides=[f"+experiment={name}", f"{key}={value}"])
                else:
                    OmegaConf.update(point, key, yaml.safe_load(value))
                plain = OmegaConf.to_container(point, resolve=True)
                validate(plain)
                assert plain["experiment"] == name
                assert plain["model"]["cell"] == ("gru" if "_gru" in name else "lstm")
                t = plain["train"]
                assert t["max_valid_tokens"] and t["steps"] is None and t["time_budget_s"] is None
                assert plain["eval"]["every_steps"]


# Hydra's own sweeper in a process of its own (python run.py without its preflight): each job's
# task overrides, recorded by a task that runs nothing
RECORD_JOBS = r"""
import json, runpy, sys
import benchmarks.cli, benchmarks.jobs
jobs = []

def task(cfg):
    from hydra.core.hydra_config import HydraConfig
    jobs.append(list(HydraConfig.get().overrides.task))

benchmarks.jobs.task = task
benchmarks.cli.preflight = lambda argv: None
sys.argv = ["run.py", *json.loads(sys.argv[1])]
try:
    runpy.run_path("run.py", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps(jobs))
"""


def test_glob_axes_expand_alike_in_preflight_and_hydra(tmp_path):
    """``glob(...)`` over a config group, in an experiment's sweeper params and on the command line:
    preflight's expansion (benchmarks.cli.compose_jobs) is the jobs Hydra's BasicSweeper runs."""
    from benchmarks import cli
    args = ["-m", "+experiment=compare_debug", "strategy=glob(pa*)", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    cli._check_group_values(args)                   # a sweep function is not a group name: no exit
    planned = [job.overrides for job in cli.compose_jobs(args)]
    r = subprocess.run([sys.executable, "-c", RECORD_JOBS, json.dumps(args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert r.returncode == 0, r.stderr[-3000:]
    ran = json.loads(r.stdout.strip().splitlines()[-1])
    assert ran == planned
    frameworks = [b for b in registry.group_options("backend") if b != "numpy"]
    pa = [s for s in registry.group_options("strategy") if s.startswith("pa")]
    assert [job[:2] for job in ran] == [[f"backend={b}", f"strategy={s}"] for b in frameworks for s in pa]


@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_sweep_through_a_parallel_launcher(tmp_path, launcher):
    pytest.importorskip({"submitit_local": "hydra_plugins.hydra_submitit_launcher",
                         "joblib": "hydra_plugins.hydra_joblib_launcher"}[launcher])
    sweep_dir = tmp_path / "window_debug_2026-01-01_00-00-00"
    extra = ["hydra.launcher.timeout_min=5"] if launcher == "submitit_local" else ["hydra.launcher.n_jobs=2"]
    r = run_sweep("+experiment=window_debug", f"hydra/launcher={launcher}", "train.window=16,32",
                  f"hydra.sweep.dir={sweep_dir}", *extra, timeout=240)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    runs, _, evals, problems = results.collect(str(tmp_path), warn=False)
    assert problems == []
    _check_runs(runs, "window_debug", 2)
    assert sorted(runs["window"].tolist()) == [16, 32]
    assert evals["run_dir"].nunique() == 2
