"""The study's Hydra experiments: each ``*_debug`` sweep runs through ``python run.py -m
+experiment=X_debug`` and the collector sees every run (one per point of the sweep axes), completed,
with periodic evals; the full experiments compose with the axes the study needs; a sweep also runs
through the joblib and submitit_local launchers.

Each debug sweep runs once per module (:func:`debug_sweep`); compare_debug's (every framework x
every strategy) also serves two checks that would otherwise start the same jobs again: every job in
a worker process of its own while the parent imports no framework (moved from test_runs.py), and
the contract files of every framework run (moved from test_cli.py, which keeps the single runs of
the oracle).

The subprocesses get one thread per framework (OMP/TF/XLA variables): these are correctness checks
of tiny models on a shared machine, where spinning thread pools only slow them down. The jobs of a
debug sweep share a JAX compilation cache (a folder of this test session): jax jobs that trace the
same computation (an eval step, a window shape) compile it once."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("pandas")         # the analysis extra: pip install -e '.[analysis]'
pytest.importorskip("matplotlib")

from benchmarks import plots, registry, results  # noqa: E402
from tests.conftest import jax_cache  # noqa: E402
from tests.helpers import REQUIRE_ALL, backend_names  # noqa: E402
from tests.test_cli import check_contract_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
              "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


@functools.lru_cache(maxsize=None)
def composed(name: str):
    """conf/experiment/NAME.yaml composed by Hydra (its parents too), with the hydra node; composed
    once per process and read-only (the tests read it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def sweep_axes(name: str) -> dict:
    """``hydra.sweeper.params`` of experiment NAME as {key: [values]}, each axis expanded by Hydra's
    own override parser (``glob(*)`` over a config group needs its config loader). A new dict each
    call (expanded once per process)."""
    return {k: list(v) for k, v in _sweep_axes(name)}


@functools.lru_cache(maxsize=None)
def _sweep_axes(name: str) -> tuple:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = composed(name).hydra.sweeper.params
    with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
        return tuple((o.get_key_element(), tuple(o.sweep_string_iterator()) if o.is_sweep_override()
                      else (o.get_value_element_as_str(),)) for o in parsed)


def installed_backends(names):
    ok = [b for b in names if not registry.missing_requirements(registry.backend_configs()[b])]
    if REQUIRE_ALL and ok != list(names):
        pytest.fail(f"backends not installed: {sorted(set(names) - set(ok))} (RESETBENCH_REQUIRE_ALL=1)")
    return ok


def run_sweep(*args: str, timeout: int = 300):
    env = {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "-m", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


# ``python run.py ARGS`` in this process (run.py's main as the script it is), then one line: this
# process's pid and which frameworks it imported (a sweep's parent must import none)
PARENT = r"""
import os, runpy, sys
sys.argv = ["run.py", *sys.argv[1:]]
try:
    runpy.run_path("run.py", run_name="__main__")
finally:
    print("PARENT", os.getpid(), sorted(m for m in ("torch", "jax", "tensorflow", "keras", "flax") if m in sys.modules))
"""


class Sweep:
    """One debug sweep, run by :func:`debug_sweep`: its axes (the installed backends only), its
    token budget, the folder collected (``root``), the finished process, and the parent's pid and
    imports."""

    def __init__(self, name: str, root, axes: dict, budget: int, proc: subprocess.CompletedProcess):
        self.name, self.root, self.axes, self.budget, self.proc = name, root, axes, budget, proc
        self.sweep_dir = root / f"{name}_2026-01-01_00-00-00"
        parent = [line for line in proc.stdout.splitlines() if line.startswith("PARENT ")]
        self.parent_pid, self.imported = (int(parent[-1].split(" ", 2)[1]), parent[-1].split(" ", 2)[2]) \
            if parent else (None, None)

    @property
    def points(self) -> int:
        n = 1
        for values in self.axes.values():
            n *= len(values)
        return n

    def check_exit(self) -> None:
        assert self.proc.returncode == 0, (self.proc.stdout[-2000:], self.proc.stderr[-4000:])


@pytest.fixture(scope="module")
def debug_sweep(tmp_path_factory):
    """``debug_sweep(name)``: ``python run.py -m +experiment=NAME`` (the sweep axes as the
    experiment declares them, its backend axis cut to the installed backends), run on first use
    and shared by this module's tests. Each job trains on half the experiment's token budget
    (``train.max_valid_tokens``): what the tests check holds at any budget, and the padded layouts
    then bring fewer window lengths for jax and keras to compile."""
    cache = {}

    def get(name: str) -> Sweep:
        if name not in cache:
            axes = sweep_axes(name)
            budget = composed(name).train.max_valid_tokens // 2
            extra = [f"train.max_valid_tokens={budget}"]
            if "backend" in axes:
                have = installed_backends(axes["backend"])
                if not have:
                    pytest.skip("no backend of the sweep installed")
                if have != axes["backend"]:
                    axes["backend"] = have
                    extra.append(f"backend={','.join(have)}")
            root = tmp_path_factory.mktemp(name)
            env = {**os.environ, **ONE_THREAD, **jax_cache(tmp_path_factory.getbasetemp() / "jax_cache"),
                   "PYTHONUNBUFFERED": "1"}
            proc = subprocess.run([sys.executable, "-c", PARENT, "-m", f"+experiment={name}",
                                   f"hydra.sweep.dir={root / f'{name}_2026-01-01_00-00-00'}", *extra],
                                  cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
            cache[name] = Sweep(name, root, axes, budget, proc)
        return cache[name]
    return get


def _check_runs(runs, experiment, n):
    assert len(runs) == n, runs[["run_dir", "status"]].to_string()
    assert (runs["status"] == "completed").all(), runs[["run_dir", "status", "problem"]].to_string()
    assert runs["complete"].all() and (runs["experiment"] == experiment).all()
    assert runs["run_dir"].is_unique


@pytest.mark.parametrize("name", ["compare_debug", "waste_debug", "window_debug", "peers_debug", "peers_gru_debug"])
def test_debug_experiment_runs_and_is_collected(debug_sweep, name):
    sweep = debug_sweep(name)
    sweep.check_exit()
    axes, n = sweep.axes, sweep.points

    runs, steps, evals, problems = results.collect(str(sweep.root), warn=False)
    assert problems == []
    _check_runs(runs, name, n)
    # every point of the sweep is there exactly once
    columns = {"backend": "backend", "strategy": "strategy", "train.seed": "seed",
               "train.window": "window", "data.length.sigma": "data.length.sigma",
               "backend.kernel": "backend.kernel"}
    seen = {tuple(str(row[columns[k]]) for k in axes) for _, row in runs.iterrows()}
    assert seen == set(itertools.product(*axes.values()))
    # the fixed token budget stopped each run; periodic evals give loss curves
    assert (runs["stop_reason"] == "token_budget").all()
    assert (runs["valid_tokens"] >= sweep.budget).all()
    assert (evals.groupby("run_dir").size() >= 2).all() and evals["run_dir"].nunique() == n
    assert steps["run_dir"].nunique() == n
    assert (runs["pad_fraction"][runs["strategy"] == "packed"] < 0.1).all()

    if name == "compare_debug":
        table = plots.summary_table(runs, evals, name)
        assert set(table["backend"]) == set(axes["backend"]) and len(table) == len(runs)
        # same weights, same data, same layouts: the backends agree on the eval loss
        spread = runs.groupby("strategy")["eval_loss"].agg(lambda s: s.max() - s.min())
        assert (spread < 0.02).all(), spread


def _summary(run_dir) -> dict:
    with open(run_dir / "summary.json") as fh:
        return json.load(fh)


def test_sweep_runs_each_framework_in_its_own_process(debug_sweep):
    """A sweep over every framework (compare_debug: every framework x every strategy): one worker
    process per job, none of them the parent, and the parent (the python running run.py's main)
    never imports a framework."""
    sweep = debug_sweep("compare_debug")
    sweep.check_exit()
    assert sweep.imported == "[]", f"the parent imported {sweep.imported}"
    run_dirs = sorted(p for p in sweep.sweep_dir.iterdir() if p.is_dir())
    assert len(run_dirs) == sweep.points
    sums = [_summary(p) for p in run_dirs]
    assert {s["backend"] for s in sums} == set(sweep.axes["backend"])
    pids = {s["process_id"] for s in sums}
    assert len(pids) == len(run_dirs) and sweep.parent_pid not in pids
    assert {s["parent_process_id"] for s in sums} == {sweep.parent_pid}
    assert all(s["status"] == "completed" and s["exit_code"] == 0 for s in sums)


def test_every_framework_run_writes_contract_files(debug_sweep):
    """The contract files of tests/test_cli.py's single runs, for every framework backend x every
    strategy: checked on compare_debug's runs (the same jobs; test_cli.py runs the oracle's).
    Each run stopped at its token budget, so its step count is steps.csv's."""
    sweep = debug_sweep("compare_debug")
    sweep.check_exit()
    frameworks = [b for b in backend_names() if not registry.missing_requirements(registry.backend_configs()[b])]
    assert set(frameworks) <= set(sweep.axes["backend"])
    run_dirs = sorted(p for p in sweep.sweep_dir.iterdir() if p.is_dir())
    assert len(run_dirs) == sweep.points
    # each job prints its summary table on stdout, ending with its run directory: the job's part of
    # stdout runs from the previous job's last line to that one
    out, seen, end = sweep.proc.stdout, set(), 0
    last_line = {}
    for run_dir in run_dirs:
        m = re.search(rf"^ *results +{re.escape(str(run_dir))}$", out, re.M)
        assert m, f"no summary table of {run_dir.name} on stdout"
        last_line[run_dir] = m
    for run_dir in sorted(run_dirs, key=lambda p: last_line[p].start()):
        table, end = out[end:last_line[run_dir].end()], last_line[run_dir].end()
        summary = check_contract_files(run_dir, table)
        seen.add((summary["backend"], summary["strategy"]))
    assert seen == set(itertools.product(sweep.axes["backend"], sweep.axes["strategy"]))


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
    """Two points of window_debug through the launcher. Their jobs train the oracle (no framework
    to import: about a second each; window_debug's torch option ``backend.threads`` dropped): a
    launcher starts each job's worker process alike whatever it trains, and every framework's jobs
    run in the debug sweeps above."""
    pytest.importorskip({"submitit_local": "hydra_plugins.hydra_submitit_launcher",
                         "joblib": "hydra_plugins.hydra_joblib_launcher"}[launcher])
    oracle = next(b for b, cfg in sorted(registry.backend_configs().items()) if registry.is_oracle(cfg))
    sweep_dir = tmp_path / "window_debug_2026-01-01_00-00-00"
    extra = ["hydra.launcher.timeout_min=5"] if launcher == "submitit_local" else ["hydra.launcher.n_jobs=2"]
    r = run_sweep("+experiment=window_debug", f"backend={oracle}", "~backend.threads", f"hydra/launcher={launcher}",
                  "train.window=16,32", f"hydra.sweep.dir={sweep_dir}", *extra, timeout=240)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    runs, _, evals, problems = results.collect(str(tmp_path), warn=False)
    assert problems == []
    _check_runs(runs, "window_debug", 2)
    assert sorted(runs["window"].tolist()) == [16, 32]
    assert evals["run_dir"].nunique() == 2
