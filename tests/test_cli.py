"""The command line: contract files for every strategy, one-line errors for bad input, a NaN loss
that stops cleanly, and interrupted runs that keep their files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from backends.base import ModelSpec, init_weights, save_weights
from benchmarks import registry
from tests.helpers import REQUIRE_ALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.embed=4", "model.hidden=8", "train.batch_size=4", "train.window=8",
        "data.max_eval_sequences=20", "eval.batch_size=4", "eval.window=32", "train.warmup_steps=1"]
SUMMARY_KEYS = {"backend", "strategy", "data", "steps", "valid_tokens", "total_slots", "pad_fraction",
                "train_time_s", "compile_time_s", "valid_tokens_per_s", "train_loss_last", "eval_loss",
                "eval_tokens", "kernel", "device", "seed", "peak_mem_bytes", "data_hash",
                "python_version", "numpy_version", "framework_version", "status"}
STEP_COLUMNS = ["step", "loss", "valid_tokens", "total_slots", "step_time_s", "elapsed_s"]


def run_cli(*args: str, cwd: str = ROOT, prelude: str = ""):
    """Run ``python run.py ARGS``; ``prelude`` is Python executed first (to hide a module)."""
    if prelude:
        cmd = [sys.executable, "-c", f"{prelude}\nimport runpy, sys\nsys.argv = ['run.py'] + sys.argv[1:]\n"
               f"runpy.run_path({os.path.join(ROOT, 'run.py')!r}, run_name='__main__')", *args]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "run.py"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


# run.py's main (runpy, sys.argv set) for each command line of a JSON list on stdin, one after another
# in one interpreter; prints the list of {"rc", "stdout", "stderr"}. For command lines that
# preflight refuses: a job reached would be a bug, so the task raises.
DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
import benchmarks.jobs

def task(cfg):   # reached only if preflight let a bad command line through
    raise RuntimeError("preflight let this command line through")

benchmarks.jobs.task = task
results = []
for args in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["run.py", *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "run.py"), run_name="__main__")
            rc = 0
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            traceback.print_exc()
            rc = 1
    results.append({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_each(argvs, cwd: str = ROOT) -> list:
    """Each command line of ``argvs`` through :data:`DRIVER` (PYTHONPATH: the checkout), in one
    subprocess: one interpreter start for all of them."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(argvs), capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def read_steps(run_dir: str):
    with open(os.path.join(run_dir, "steps.csv")) as fh:
        return list(csv.DictReader(fh))


def installed(backend: str) -> bool:
    ok = not registry.missing_requirements(registry.backend_configs()[backend])
    if not ok and REQUIRE_ALL:
        pytest.fail(f"backend {backend} not installed (RESETBENCH_REQUIRE_ALL=1)")
    return ok


def _backends():
    return sorted(registry.backend_configs())


def _oracles():
    """The oracle backends (``oracle: true``). Every other backend runs every strategy in the
    compare_debug sweep, whose runs tests/test_experiments.py checks for these same contract files
    (test_every_framework_run_writes_contract_files): single runs of them here would start the same
    framework jobs a second time."""
    return [b for b in _backends() if registry.is_oracle(registry.backend_configs()[b])]


@pytest.mark.parametrize("strategy", registry.group_options("strategy"))
@pytest.mark.parametrize("backend", _oracles())
def test_each_strategy_writes_contract_files(tmp_path, backend, strategy):
    """A single run (``train.steps=3``) of the oracle with every strategy writes the contract
    files; the framework backends' runs are checked in tests/test_experiments.py (see
    :func:`_oracles`)."""
    if not installed(backend):
        pytest.skip(f"{backend} not installed")
    out = tmp_path / "run"
    r = run_cli(f"backend={backend}", f"strategy={strategy}", "train.steps=3", *TINY, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = check_contract_files(out, r.stdout)
    assert summary["steps"] == 3
    assert summary["backend"] == backend and summary["strategy"] == strategy


def check_contract_files(out, stdout: str) -> dict:
    """What every completed run writes (summary.json, steps.csv, weights.npz of the TINY model) and
    prints (its summary table, ``stdout``), consistent with each other; returns the summary."""
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["status"] == "completed" and summary["data"] == "kjv"
    default = registry.backend_configs()[summary["backend"]]["kernel"]
    assert summary["kernel_option"] == default and summary["kernel_role"] == "exact"
    assert summary["eval_tokens"] > 0 and np.isfinite(summary["eval_loss"])
    assert summary["valid_tokens_per_s"] > 0
    if sys.platform.startswith("linux"):
        assert summary["malloc"].startswith("glibc mmap_threshold"), summary["malloc"]   # tune_malloc: true
    steps = read_steps(str(out))
    assert summary["steps"] == len(steps) > 0 and set(STEP_COLUMNS) <= set(steps[0])
    assert sum(int(s["valid_tokens"]) for s in steps) == summary["valid_tokens"]
    assert summary["pad_fraction"] == pytest.approx(
        1 - summary["valid_tokens"] / sum(int(s["total_slots"]) for s in steps))
    with np.load(out / "weights.npz") as w:
        assert w["lstm.0.w_h"].shape == (8, 32) and w["embedding"].shape == (257, 4)
    assert "valid tokens/s" in stdout and "eval loss" in stdout, stdout[-2000:]
    return summary


def test_steps_zero_only_evaluates_and_init_loads(tmp_path):
    spec = ModelSpec(embed=4, hidden=8, layers=1)
    w = init_weights(spec, 5)
    path = tmp_path / "w.npz"
    save_weights(str(path), w)
    out = tmp_path / "run"
    r = run_cli("backend=numpy", "train.steps=0", f"model.init={path}", *TINY, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["valid_tokens"] == 0 and np.isfinite(summary["eval_loss"])
    with np.load(out / "weights.npz") as saved:
        for k in w:
            np.testing.assert_array_equal(saved[k], w[k])


def test_eval_loss_is_the_same_for_every_strategy_at_step_zero(tmp_path):
    losses = set()
    for strategy in registry.group_options("strategy"):
        out = tmp_path / strategy
        r = run_cli("backend=numpy", f"strategy={strategy}", "train.steps=0", *TINY, f"hydra.run.dir={out}")
        assert r.returncode == 0, r.stderr[-2000:]
        losses.add(round(json.loads((out / "summary.json").read_text())["eval_loss"], 6))
    assert len(losses) == 1


def _bad_weights(tmp_path, kind: str) -> str:
    w = init_weights(ModelSpec(embed=4, hidden=8, layers=1), 0)
    if kind == "missing":
        del w["head.b"]
    else:
        w["lstm.0.w_h"] = np.zeros((8, 8), np.float32)
    path = tmp_path / f"{kind}.npz"
    np.savez(path, **w)
    return str(path)


BAD = [
    (["train.batch_size=0"], "train.batch_size=0"),
    (["tune_malloc=maybe"], "tune_malloc='maybe'"),
    (["backend.kernel=nosuch"], "allowed for backend=torch: "
     + ", ".join(registry.kernel_decls(registry.backend_configs()["torch"]))),
    (["backend.kernel=native", "strategy=packed"], "backend.kernel='native': needs no_mid_reset, which "
     "strategy=packed does not guarantee; strategies that do: bucketed, padded, reset_all"),
    (["backend.kernel=peer", "strategy=reset_all"], "backend.kernel='peer': needs fresh_rows, which "
     "strategy=reset_all does not guarantee; strategies that do: bucketed, padded"),
    (["backend=numpy", "backend.kernel=fused"], "backend.kernel='fused': allowed for backend=numpy: loop"),
    (["model.hidden=-4"], "model.hidden=-4"),
    (["model.layers=two"], "model.layers='two'"),
    (["train.window=0"], "train.window=0"),
    (["train.lr=-1"], "train.lr=-1"),
    (["train.optimizer=rmsprop"], "allowed: adam, sgd"),
    (["device=tpu"], "allowed: auto, cpu, cuda"),
    (["backend=mxnet"], "backend='mxnet'"),
    (["strategy=sorted"], "strategy='sorted'"),
    (["data=imagenet"], "data='imagenet'"),
    (["train.foo=1"], "train.foo"),
    (["+model.dropout=0.1"], "model.dropout"),
    (["+backend.fast=1"], "backend.fast"),
    (["data=textfile"], "data.path=null"),
    (["data=textfile", "data.path=does/not/exist.txt"], "data.path='does/not/exist.txt'"),
    (["model.init=missing.npz"], "model.init='missing.npz'"),
    (["train.steps=null", "train.time_budget_s=null"], "train.steps"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Each BAD command line's result ({"rc", "stdout", "stderr"}) and its hydra.run.dir: run.py's
    main under runpy, every case in one subprocess (:func:`run_each`), so ~20 refusals cost one
    interpreter start (the real ``python run.py`` refuses alike: tests/test_validation.py runs a few)."""
    tmp = tmp_path_factory.mktemp("bad")
    dirs = [tmp / str(i) / "run" for i in range(len(BAD))]
    results = run_each([[*args, f"hydra.run.dir={d}"] for (args, _), d in zip(BAD, dirs)])
    return list(zip(results, dirs))


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line(bad_runs, args, needle):
    r, run_dir = bad_runs[BAD.index((args, needle))]
    assert r["rc"] == 2, (r["rc"], r["stdout"], r["stderr"])
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r["stderr"] + r["stdout"]
    assert not run_dir.exists(), "no run directory for a rejected command line"


@pytest.mark.parametrize("kind,needle", [("missing", "head.b"), ("shape", "lstm.0.w_h")])
def test_bad_init_weights(tmp_path, kind, needle):
    r = run_cli(f"model.init={_bad_weights(tmp_path, kind)}", "model.embed=4", "model.hidden=8")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.init" in lines[0] and needle in lines[0], r.stderr


@pytest.mark.parametrize("content,key", [("\n\n   \n", "data.path"), (None, "data.eval_path")])
def test_empty_text_files(tmp_path, content, key):
    train = tmp_path / "train.txt"
    train.write_text("hello world\nsecond line\n" if content is None else content)
    args = ["data=textfile", f"data.path={train}"]
    if content is None:
        empty = tmp_path / "eval.txt"
        empty.write_text("\n\n")
        args.append(f"data.eval_path={empty}")
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "no sequences" in lines[0], r.stderr


def test_missing_framework_is_one_line():
    r = run_cli("backend=torch", prelude="import sys; sys.modules['torch'] = None")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "backend='torch'" in lines[0] and "not installed" in lines[0], r.stderr


def test_textfile_paragraphs_train(tmp_path):
    text = "\n\n".join(f"para {i} line one\nline two of {i}" for i in range(40))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "run"
    r = run_cli("backend=numpy", "data=textfile", f"data.path={tmp_path / 't.txt'}", "data.unit=paragraph",
                "train.steps=2", *[a for a in TINY if not a.startswith("data.")], f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["data"] == "textfile" and s["train_sequences"] + s["eval_sequences"] == 40


def test_nan_loss_stops_and_keeps_files(tmp_path):
    out = tmp_path / "run"
    r = run_cli("backend=numpy", "data=synthetic", "data.train_sequences=50", "data.eval_sequences=5",
                "train.optimizer=sgd", "train.lr=1e38", "train.clip_norm=null", "train.steps=50",
                *[a for a in TINY if not a.startswith("data.")], f"hydra.run.dir={out}")
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "loss became" in r.stderr and "Traceback" not in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    steps = read_steps(str(out))
    assert 1 <= len(steps) < 50 and not np.isfinite(float(steps[-1]["loss"]))


def test_interrupted_run_keeps_valid_files(tmp_path, monkeypatch):
    """A KeyboardInterrupt mid-training leaves steps.csv, summary.json (status interrupted) and
    the weights behind."""
    from benchmarks import harness
    from omegaconf import OmegaConf

    real_build = registry.build_backend

    def build(*a, **k):
        be = real_build(*a, **k)
        real_step, count = be.train_step, [0]

        def step(batch):
            count[0] += 1
            if count[0] == 4:
                raise KeyboardInterrupt
            return real_step(batch)
        be.train_step = step
        return be

    monkeypatch.setattr(registry, "build_backend", build)
    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "config.yaml")))
    cfg.pop("defaults"), cfg.pop("hydra")
    for group, name in (("backend", "numpy"), ("strategy", "packed"), ("data", "synthetic")):
        cfg[group] = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", group, f"{name}.yaml")))
    cfg["data"].update(train_sequences=40, eval_sequences=4)
    cfg["model"].update(embed=4, hidden=8)
    cfg["train"].update(batch_size=4, window=8, steps=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        harness.run(cfg, str(tmp_path), echo=lambda s: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 3
    assert len(read_steps(str(tmp_path))) == 3
    assert (tmp_path / "weights.npz").exists()
