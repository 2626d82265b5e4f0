"""One-line errors before anything heavy: every bad option, file, Hydra key and size, and every job
of a ``-m`` sweep, is refused by ``run.py``'s preflight with ``error: key=value: ...`` and exit
code 2, no traceback, no run directory; the option schemas of conf/backend and conf/data; the
memory estimate; text files read as bytes.

The CLI cases run ``run.py`` (``runpy``, with ``sys.argv`` set) one after another in one
subprocess, so ~80 cases cost one interpreter start; a handful also run as ``python run.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from backends.base import ConfigError, ModelSpec, init_weights, load_weights
from benchmarks import cli, registry
from benchmarks.config import (check_memory, check_type, count_params, estimate_memory, format_bytes,
                               parse_type)
from benchmarks.data import KJV, DataSize, Synthetic, TextFile, data_size, split_bytes
from tests.test_cli import DRIVER, ROOT, run_cli

# --------------------------------------------------------------------------- the CLI cases
# (id, command-line arguments, the start of the one error line after "error: "). {tmp} is a
# folder of fixture files (see _fixtures); every case also gets hydra.run.dir={tmp}/run/ID. They
# run through tests/test_cli.py's DRIVER.
SYN = ["data=synthetic"]
TXT = ["data=textfile", "data.path={tmp}/t.txt"]
TINY = ["model.embed=4", "model.hidden=8"]
CASES = [
    # synthetic lengths
    ("low>high", SYN + ["data.length.dist=uniform", "data.length.low=100", "data.length.high=10"],
     "data.length.low=100: must be <= data.length.high (10)"),
    ("sigma<0", SYN + ["data.length.sigma=-0.5"], "data.length.sigma=-0.5: must be a non-negative number"),
    ("max_len<0", SYN + ["data.length.max_len=-5"], "data.length.max_len=-5: must be a positive integer"),
    ("min>max", SYN + ["data.length.min_len=100", "data.length.max_len=10"],
     "data.length.min_len=100: must be <= data.length.max_len (10)"),
    ("median=0", SYN + ["data.length.median=0"], "data.length.median=0: must be a positive number"),
    ("median<0", SYN + ["data.length.median=-3"], "data.length.median=-3: must be a positive number"),
    ("length=0", SYN + ["data.length.dist=fixed", "data.length.length=0"],
     "data.length.length=0: must be a positive integer"),
    ("low=abc", SYN + ["data.length.low=abc"], "data.length.low='abc': must be a positive integer"),
    ("median=abc", SYN + ["data.length.median=abc"], "data.length.median='abc': must be a positive number"),
    ("sequences=0", SYN + ["data.train_sequences=0"], "data.train_sequences=0: must be a positive integer"),
    ("length.extra", SYN + ["+data.length.foo=1"], "data.length.foo=1: not an option of data=synthetic"),
    # backend options, every backend, no framework import
    ("torch.threads=0", ["backend=torch", "backend.threads=0"], "backend.threads=0: must be a positive integer or null"),
    ("torch.threads=1.5", ["backend=torch", "backend.threads=1.5"], "backend.threads=1.5: must be a positive integer"),
    ("torch.threads=abc", ["backend=torch", "backend.threads=abc"], "backend.threads='abc': must be a positive"),
    ("keras.threads=0", ["backend=keras", "backend.threads=0"], "backend.threads=0: must be a positive integer or null"),
    ("keras.threads=1.5", ["backend=keras", "backend.threads=1.5"], "backend.threads=1.5: must be a positive"),
    ("keras.threads=abc", ["backend=keras", "backend.threads=abc"], "backend.threads='abc': must be a positive"),
    ("jax.unroll=0", ["backend=jax", "backend.unroll=0"], "backend.unroll=0: must be a positive integer"),
    ("jax.unroll=2.5", ["backend=jax", "backend.unroll=2.5"], "backend.unroll=2.5: must be a positive integer"),
    ("jax.hoist=no", ["backend=jax", "backend.hoist=no"], "backend.hoist='no': must be true or false"),
    ("jax.autodiff=1", ["backend=jax", "backend.autodiff=1"], "backend.autodiff=1: must be true or false"),
    ("keras.jit=1", ["backend=keras", "backend.jit_compile=1"], "backend.jit_compile=1: allowed: auto, true, false"),
    ("keras.jit=yes", ["backend=keras", "backend.jit_compile=yes"], "backend.jit_compile='yes': allowed: auto, true"),
    ("keras.loop", ["backend=keras", "backend.loop=unroll"], "backend.loop='unroll': allowed: auto, tf_bptt"),
    ("keras.loop+native", ["backend=keras", "backend.kernel=native", "strategy=padded", "backend.loop=scan"],
     "backend.loop='scan': ResetLSTM's loop"),
    ("keras.loop+native+gru", ["backend=keras", "backend.kernel=native", "strategy=padded", "backend.loop=scan",
                               "model.cell=gru"], "backend.loop='scan': ResetGRU's loop; kernel=native runs keras.layers.GRU's"),
    ("keras.scan+xla", ["backend=keras", "backend.loop=scan", "backend.jit_compile=true"],
     "backend.jit_compile=True: XLA cannot compile loop=scan"),
    ("schema override", ["backend.schema.threads=int"], "backend.schema.threads='int': metadata of "
     "conf/backend/torch.yaml, not an option"),
    ("kernels override", ["backend.kernels.native.needs=[]", "strategy=packed"],
     "backend.kernels.native.needs=[]: metadata of conf/backend/torch.yaml, not an option"),
    ("numpy kernel", ["backend=numpy", "backend.kernel=scan"], "backend.kernel='scan': allowed for backend=numpy: loop"),
    ("jax native+packed", ["backend=jax", "backend.kernel=native"],
     "backend.kernel='native': needs no_mid_reset, which strategy=packed does not guarantee; strategies that "
     "do: bucketed, padded, reset_all"),
    # textfile options
    ("split_seed<0", TXT + ["data.split_seed=-1"], "data.split_seed=-1: must be a non-negative integer"),
    ("split_seed=1.5", TXT + ["data.split_seed=1.5"], "data.split_seed=1.5: must be a non-negative integer"),
    ("eval_fraction=1", TXT + ["data.eval_fraction=1"], "data.eval_fraction=1: must be a number > 0 and < 1"),
    ("eval_fraction=0", TXT + ["data.eval_fraction=0"], "data.eval_fraction=0: must be a number > 0 and < 1"),
    ("eval_fraction=abc", TXT + ["data.eval_fraction=abc"], "data.eval_fraction='abc': must be a number"),
    ("unit", TXT + ["data.unit=word"], "data.unit='word': allowed: line, paragraph"),
    # booleans given as strings or numbers
    ("strip_brackets=no", ["data.strip_brackets=no"], "data.strip_brackets='no': must be true or false"),
    ("tune_malloc=yes", ["tune_malloc=yes"], "tune_malloc='yes': must be true or false"),
    ("overwrite=1", ["overwrite=1"], "overwrite=1: must be true or false"),
    ("progress=maybe", ["train.progress=maybe"], "train.progress='maybe': must be true or false"),
    # model.init files
    ("init.int", TINY + ["model.init={tmp}/int.npz"],
     "model.init='{tmp}/int.npz': key 'head.b' has dtype int32; canonical weights are floating-point arrays"),
    ("init.bool", TINY + ["model.init={tmp}/bool.npz"], "model.init='{tmp}/bool.npz': key 'head.b' has dtype bool"),
    ("init.complex", TINY + ["model.init={tmp}/complex.npz"],
     "model.init='{tmp}/complex.npz': key 'head.b' has dtype complex128"),
    ("init.str", TINY + ["model.init={tmp}/str.npz"], "model.init='{tmp}/str.npz': key 'head.b' has dtype <U"),
    ("init.object", TINY + ["model.init={tmp}/obj.npz"],
     "model.init='{tmp}/obj.npz': key 'head.b' holds Python objects"),
    ("init.layers", TINY + ["model.init={tmp}/two.npz"],
     "model.init='{tmp}/two.npz': key 'lstm.1.w_x' is a weight of LSTM layer 1, but model.layers=1"),
    ("init.unknown", TINY + ["model.init={tmp}/extra.npz"], "model.init='{tmp}/extra.npz': unknown key 'foo'"),
    ("init.shape", TINY + ["model.init={tmp}/shape.npz"],
     "model.init='{tmp}/shape.npz': key 'lstm.0.w_h' has shape (8, 8) but model.embed/hidden/layers require (8, 32)"),
    ("init.missing", TINY + ["model.init={tmp}/missing.npz"],
     "model.init='{tmp}/missing.npz': missing canonical key 'head.b'"),
    ("init.npy", TINY + ["model.init={tmp}/arr.npy"], "model.init='{tmp}/arr.npy': not an .npz archive"),
    ("init.dir", ["model.init={tmp}/adir"], "model.init='{tmp}/adir': is a directory"),
    ("init.fifo", ["model.init={tmp}/fifo"], "model.init='{tmp}/fifo': is a FIFO, not a regular file"),
    ("init.unreadable", ["model.init=/proc/self/mem"], "model.init='/proc/self/mem': cannot be read"),
    # files and interpolations
    ("path.env", ["data=textfile", "data.path=${{oc.env:RESETBENCH_NO_SUCH_VAR}}"],
     "data.path='${{oc.env:RESETBENCH_NO_SUCH_VAR}}': Environment variable 'RESETBENCH_NO_SUCH_VAR' not found"),
    ("env.elsewhere", ["train.lr=${{oc.env:RESETBENCH_NO_SUCH_VAR}}"], "train.lr='${{oc.env:RESETBENCH_NO_SUCH_VAR}}'"),
    ("path.dir", ["data=textfile", "data.path={tmp}/adir"], "data.path='{tmp}/adir': is a directory"),
    ("path.fifo", ["data=textfile", "data.path={tmp}/fifo"], "data.path='{tmp}/fifo': is a FIFO"),
    ("path.unreadable", ["data=textfile", "data.path=/proc/self/mem"], "data.path='/proc/self/mem': cannot be read"),
    ("eval_path.dir", TXT + ["data.eval_path={tmp}/adir"], "data.eval_path='{tmp}/adir': is a directory"),
    ("eval_path.fifo", TXT + ["data.eval_path={tmp}/fifo"], "data.eval_path='{tmp}/fifo': is a FIFO"),
    ("eval_path.unreadable", TXT + ["data.eval_path=/proc/self/mem"], "data.eval_path='/proc/self/mem': cannot be read"),
    # Hydra's own keys
    ("hydra.key", ["hydra.run.dirr=x"], "hydra.run.dirr=x: Key 'dirr' not in 'RunDir'"),
    ("hydra.bool", ["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe: Value 'maybe' is not a valid bool"),
    ("hydra.env", ["hydra.run.dir=${{oc.env:RESETBENCH_NO_SUCH_VAR}}"], "hydra.run.dir='${{oc.env:RESETBENCH_NO_SUCH_VAR}}'"),
    ("ambiguous sweep", ["train.seed=0,1"], "Ambiguous value for argument 'train.seed=0,1'"),
    # sizes
    ("hidden", ["model.hidden=1000000"], "model.hidden=1000000: this config needs about "),
    ("batch", ["train.batch_size=100000000"], "train.batch_size=100000000: this config needs about "),
    ("layers", ["model.layers=100000"], "model.layers=100000: this config needs about "),
    ("eval.window", ["eval.window=1000000000"], "eval.window=1000000000: this config needs about "),
    ("pad_multiple", ["strategy=padded", "strategy.pad_multiple=100000000"], "strategy.pad_multiple=100000000: this"),
    ("sequences", SYN + ["data.train_sequences=1000000000000"], "data.train_sequences=1000000000000: this config"),
    ("int64", SYN + ["data.length.length=100000000000000000000"],
     "data.length.length=100000000000000000000: must be a positive integer (at most 2^63-1)"),
    # run directories
    ("finished run", ["hydra.run.dir={tmp}/done"], "hydra.run.dir='{tmp}/done': holds an earlier run (status completed)"),
    # sweeps: every job validated, the job named
    ("sweep.lr", ["-m", "backend=torch,keras", "train.lr=1,-1", "hydra.sweep.dir={tmp}/sweep"],
     "job 1 (backend=torch train.lr=-1): train.lr=-1: must be a positive number"),
    ("sweep.experiment", ["-m", "+experiment=compare_debug", "train.seed=0,7", "train.lr=-1",
                          "hydra.sweep.dir={tmp}/sweep"],
     "job 0 (backend=jax strategy=bucketed train.seed=0 +experiment=compare_debug train.lr=-1): "
     "train.lr=-1: must be a positive number"),
    ("sweep.keras", ["-m", "+experiment=compare_debug", "backend=keras", "backend.jit_compile=maybe",
                     "hydra.sweep.dir={tmp}/sweep"],
     "job 0 (backend=keras strategy=bucketed train.seed=0 +experiment=compare_debug backend.jit_compile=maybe): "
     "backend.jit_compile='maybe': allowed: auto, true, false"),
    ("sweep.compose", ["-m", "backend=torch,jax", "backend.threads=2", "hydra.sweep.dir={tmp}/sweep"],
     "job 1 (backend=jax backend.threads=2): backend.threads=2: Key 'threads' is not in struct"),
    ("sweep.size", ["-m", "backend=jax,keras", "train.batch_size=100000000", "hydra.sweep.dir={tmp}/sweep"],
     "job 0 (backend=jax train.batch_size=100000000): train.batch_size=100000000: this config needs about "),
    ("sweep.finished", ["-m", "train.seed=0,1,2", "hydra.sweep.dir={tmp}/sweepdone"],
     "job 2 (train.seed=2): hydra.run.dir='{tmp}/sweepdone/2_torch_packed_kjv_s2': holds an earlier run"),
    ("sweep.same dir", ["-m", "train.seed=0,1", "hydra.sweep.dir={tmp}/sweep", "hydra.sweep.subdir=same"],
     "job 1 (train.seed=1): hydra.sweep.subdir='{tmp}/sweep/same': job 0 (train.seed=0) writes the same directory"),
    ("sweep.hydra.mode", ["hydra.mode=MULTIRUN", "train.lr=1,-1", "hydra.sweep.dir={tmp}/sweep"],
     "job 1 (train.lr=-1): train.lr=-1"),
    ("sweep.hydra key", ["-m", "train.seed=0,1", "hydra.sweep.dirr=x"], "hydra.sweep.dirr=x: Key 'dirr'"),
    ("sweep.interval", ["-m", "train.lr=interval(0.1,1)"], "BasicSweeper does not support sweep type : INTERVAL_SWEEP"),
]


def _fixtures(tmp) -> None:
    """The files the cases name: a text file, a directory, a FIFO, weights files good and bad,
    finished runs."""
    (tmp / "t.txt").write_text("alpha\nbeta\ngamma\ndelta\n")
    (tmp / "adir").mkdir()
    os.mkfifo(tmp / "fifo")
    spec = ModelSpec(embed=4, hidden=8, layers=1)
    w = init_weights(spec, 0)
    for name, arrays in {"int": {"head.b": np.zeros(257, np.int32)}, "bool": {"head.b": np.zeros(257, bool)},
                         "complex": {"head.b": np.zeros(257, complex)}, "str": {"head.b": np.array(["x"] * 257)},
                         "obj": {"head.b": np.array([None] * 257, dtype=object)},
                         "extra": {"foo": np.zeros(3, np.float32)},
                         "shape": {"lstm.0.w_h": np.zeros((8, 8), np.float32)}}.items():
        np.savez(tmp / f"{name}.npz", **{**w, **arrays})
    np.savez(tmp / "two.npz", **init_weights(ModelSpec(embed=4, hidden=8, layers=2), 0))
    np.savez(tmp / "missing.npz", **{k: v for k, v in w.items() if k != "head.b"})
    np.save(tmp / "arr.npy", np.zeros(3))
    for run in ("done", "sweepdone/2_torch_packed_kjv_s2"):
        (tmp / run).mkdir(parents=True)
        (tmp / run / "summary.json").write_text(json.dumps({"status": "completed"}))




def _expand(args, tmp):
    return [a.format(tmp=tmp) for a in args]


def _dirname(cid: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in cid)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case's (rc, stdout, stderr) from one subprocess, and the fixture folder."""
    tmp = tmp_path_factory.mktemp("cases")
    _fixtures(tmp)
    argvs = []
    for cid, args, _ in CASES:
        argv = _expand(args, tmp)
        if "-m" not in argv and not any(a.startswith(("hydra.run.dir=", "hydra.mode=")) for a in argv):
            argv.append(f"hydra.run.dir={tmp}/run/{_dirname(cid)}")
        argvs.append(argv)
    env = {k: v for k, v in os.environ.items() if k != "RESETBENCH_NO_SUCH_VAR"}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(argvs), capture_output=True, text=True,
                       cwd=str(tmp), env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, dict(zip((c[0] for c in CASES), json.loads(r.stdout)))


@pytest.mark.parametrize("cid,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_option_is_one_line(cases, cid, args, expected):
    tmp, results = cases
    r = results[cid]
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["rc"] == 2, (r["rc"], r["stderr"][-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    assert lines[0].startswith("error: " + expected.format(tmp=tmp)), lines[0]
    assert r["stdout"] == "" and "Traceback" not in r["stderr"]
    assert not (tmp / "run").exists() and not (tmp / "sweep").exists()


def test_cases_leave_finished_runs_untouched(cases):
    tmp, _ = cases
    assert sorted(os.listdir(tmp / "done")) == ["summary.json"]             # no .hydra/ written
    assert sorted(os.listdir(tmp / "sweepdone")) == ["2_torch_packed_kjv_s2"]


# --------------------------------------------------------------------------- the real command line
def _one_line(r, needle: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def test_run_py_sweep_and_single_run_errors(tmp_path):
    """Through ``python run.py``: a sweep's bad job before any sweep directory, a finished run's
    directory before Hydra writes .hydra/ into it, a size, a framework option."""
    r = run_cli("-m", "backend=torch,keras", "train.lr=1,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert _one_line(r, "train.lr=-1") == ("error: job 1 (backend=torch train.lr=-1): train.lr=-1: "
                                          "must be a positive number")
    assert not (tmp_path / "sweep").exists()
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    _one_line(run_cli(f"hydra.run.dir={done}"), "holds an earlier run (status completed)")
    assert os.listdir(done) == ["summary.json"]
    _one_line(run_cli("model.hidden=1000000", f"hydra.run.dir={tmp_path / 'run'}"), "model.hidden=1000000: this config")
    _one_line(run_cli("backend=jax", "backend.hoist=no", f"hydra.run.dir={tmp_path / 'run'}"), "backend.hoist='no'")
    assert not (tmp_path / "run").exists()


def test_hydra_commands_are_not_validated():
    """--cfg, --help and --info are Hydra's: they print, whatever the values."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--cfg", "job", "model.hidden=-4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "hidden: -4" in r.stdout, r.stderr[-2000:]
    assert cli.compose_jobs(["--help"]) is None and cli.compose_jobs(["-c", "job"]) is None
    assert cli.compose_jobs(["--info", "config"]) is None


# --------------------------------------------------------------------------- sweeps
def test_sweep_jobs_expand_like_hydra(tmp_path, monkeypatch):
    """The config's sweeper params first, then the command line; job numbers in hydra.sweep.subdir;
    one sweep directory (one ${now:})."""
    monkeypatch.chdir(tmp_path)
    jobs = cli.compose_jobs(["-m", "+experiment=window_debug", "train.window=16,32", "train.seed=3,4"])
    assert [j.num for j in jobs] == [0, 1, 2, 3]       # a swept key keeps its place, a new one comes last
    assert jobs[0].overrides == ["backend=torch", "strategy=packed", "train.window=16", "+experiment=window_debug",
                                 "train.seed=3"]
    assert jobs[1].overrides[-1] == "train.seed=4" and jobs[2].overrides[2] == "train.window=32"
    assert {os.path.dirname(j.run_dir) for j in jobs} == {os.path.dirname(jobs[0].run_dir)}
    assert os.path.basename(os.path.dirname(jobs[0].run_dir)).startswith("window_debug_")
    assert os.path.basename(jobs[3].run_dir) == "3_torch_packed_T32_s4"
    assert jobs[3].config["train"]["window"] == 32 and jobs[3].config["train"]["seed"] == 4
    assert "hydra" not in jobs[0].config and all(j.multirun for j in jobs)
    single = cli.compose_jobs(["model.hidden=8", f"hydra.run.dir={tmp_path / 'x'}"])
    assert len(single) == 1 and single[0].run_dir == str(tmp_path / "x") and not single[0].multirun
    assert single[0].overrides == ["model.hidden=8"] and single[0].config["model"]["hidden"] == 8


def test_experiments_fit_in_memory(monkeypatch, tmp_path):
    """Every job of the study's sweeps passes preflight and needs well under 2 GiB; the default
    config too."""
    monkeypatch.chdir(tmp_path)
    checker = cli.Checker()
    from tests.test_experiments import sweep_axes
    for name in ("compare", "waste", "window", "peers"):
        jobs = cli.compose_jobs(["-m", f"+experiment={name}"])
        assert len(jobs) == math.prod(len(v) for v in sweep_axes(name).values())
        cli.check_jobs(jobs, checker)
        for job in jobs[::3]:
            need = sum(estimate_memory(job.config, checker.data_size(job.config["data"])).values())
            assert need < 2 * 2 ** 30, (name, job.label, format_bytes(need))
    default = cli.compose_jobs([])[0].config
    assert sum(estimate_memory(default, data_size(default["data"])).values()) < 2 ** 30


# --------------------------------------------------------------------------- the option schemas
def _leaves(d, prefix=""):
    out = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


@pytest.mark.parametrize("group", ["backend", "data"])
def test_every_option_is_declared(group):
    """Each conf/backend and conf/data file declares the type of every option it has (``kernel``
    is checked against the names under ``kernels``), and only of options it has."""
    for name in registry.group_options(group):
        cfg = registry.group_config(group, name)
        assert "schema" in cfg, f"conf/{group}/{name}.yaml has no schema"
        options = _leaves({k: v for k, v in cfg.items() if k not in registry.META_KEYS}) - {"kernel"}
        schema = cfg["schema"] or {}
        assert _leaves(schema) == options, (name, _leaves(schema) ^ options)
        for key in _leaves(schema):
            node = schema
            for part in key.split("."):
                node = node[part]
            parse_type(node)
            value = cfg
            for part in key.split("."):
                value = value[part]
            if not (key == "path" and value is None):        # textfile's required path
                check_type(f"{group}.{key}", value, node)     # the defaults are valid


def test_schema_types():
    def ok(spec, value):
        try:
            check_type("k", value, spec)
            return True
        except ConfigError:
            return False
    assert ok("bool", True) and ok("bool", False) and not ok("bool", "no") and not ok("bool", 1)
    assert ok("int>=1", 3) and not ok("int>=1", 0) and not ok("int>=1", 1.5) and not ok("int>=1", True)
    assert not ok("int>=1", 2 ** 63) and ok("int>=0", 0) and not ok("int>=0", -1)
    assert ok("int>=1 or null", None) and not ok("int>=1", None) and not ok("int>=1 or null", "abc")
    assert ok("number>0", 0.5) and ok("number>0", 2) and not ok("number>0", 0) and not ok("number>0", float("nan"))
    assert not ok("number>0", float("inf")) and not ok("number>0", "1")
    assert ok("number>0 <1", 0.5) and not ok("number>0 <1", 1) and ok("number>=-2.5e1 <=3", -25)
    assert ok("str", "x") and not ok("str", 1)
    values = [["auto", True, False]]
    assert ok(values[0], "auto") and ok(values[0], True) and not ok(values[0], "true") and not ok(values[0], 1)
    assert ok([1, 2], 2) and not ok([1, 2], True) and not ok([1, 2], 2.0)
    descs = {spec: parse_type(spec)[0][2] for spec in ("int>=1", "int>=0", "number>0", "number>=0", "int>=2",
                                                       "number>0 <1", "bool")}
    assert descs == {"int>=1": "a positive integer", "int>=0": "a non-negative integer", "number>0": "a positive number",
                     "number>=0": "a non-negative number", "int>=2": "an integer >= 2",
                     "number>0 <1": "a number > 0 and < 1", "bool": "true or false"}
    with pytest.raises(ConfigError, match=r"^k='x': must be a positive integer or null$"):
        check_type("k", "x", "int>=1 or null")
    with pytest.raises(ConfigError, match=r"^k=1: allowed: auto, true, false$"):
        check_type("k", 1, ["auto", True, False])
    for bad in ("integer", "int>=x", "int >=1 ~2", "", 3, "bool or"):
        with pytest.raises(ValueError):
            parse_type(bad)


def test_file_type(tmp_path):
    (tmp_path / "f").write_text("x")
    check_type("k", str(tmp_path / "f"), "file")
    check_type("k", None, "file or null")
    for path, msg in ((tmp_path / "nope", "file not found"), (tmp_path, "is a directory"),
                      ("/proc/self/mem", "cannot be read")):
        with pytest.raises(ConfigError, match=msg):
            check_type("k", str(path), "file")


# --------------------------------------------------------------------------- the memory estimate
def _cfg(**over):
    cfg = {"model": {"embed": 64, "hidden": 256, "layers": 1}, "strategy": {"name": "packed"},
           "train": {"batch_size": 32, "window": 64, "optimizer": "adam"}, "eval": {"batch_size": 64, "window": 256},
           "data": {"name": "kjv"}}
    for dotted, value in over.items():
        section, key = dotted.split("__")
        cfg[section] = {**cfg[section], key: value}
    return cfg


SIZE = DataSize(train_sequences=1000, train_tokens=100_000, train_longest=500, eval_sequences=10,
                eval_tokens=1000, eval_longest=300, load_bytes=1_000_000)


def test_memory_estimate_parts():
    parts = estimate_memory(_cfg(), SIZE)
    P = count_params(64, 256, 1)
    assert P == 257 * 64 + (64 * 1024 + 256 * 1024 + 1024) + 256 * 257 + 257
    assert parts["weights"] == 8 * P and parts["gradients"] == 4 * P and parts["optimizer"] == 8 * P
    assert parts["data"] == 1_000_000
    eval_slots = 64 * 256 * 4 * (6 * 256 + 64 + 2 * 257)
    assert parts["activations"] == max(32 * 64 * 4 * (12 * 256 + 2 * 64 + 3 * 257), eval_slots)
    # streaming layouts: one batch held and gathered at a time (13 + 72 bytes per slot), plus an
    # index per sequence (packed 96 bytes, the others 32); the eval layout is packed at eval sizes
    held_eval = 13 * 64 * 256 + 96 * 10
    assert parts["layout"] == (13 + 72) * 32 * 64 + 96 * 1000 + held_eval
    assert estimate_memory(_cfg(train__optimizer="sgd"), SIZE)["optimizer"] == 0
    padded = estimate_memory(_cfg(strategy__name="padded", strategy__pad_multiple=16), SIZE)
    assert padded["layout"] == (13 + 72) * 32 * 512 + 32 * 1000 + held_eval    # one batch at the longest (500 -> 512)
    big = estimate_memory(_cfg(strategy__name="padded", strategy__pad_multiple=16, eval__batch_size=1), SIZE)
    assert big["activations"] == 32 * 512 * 4 * (12 * 256 + 2 * 64 + 3 * 257)


def test_memory_check_names_the_key():
    check_memory(_cfg(), SIZE, available=2 ** 30)
    for key, value in (("model__hidden", 10 ** 6), ("train__batch_size", 10 ** 8), ("model__layers", 10 ** 5),
                       ("model__embed", 10 ** 9), ("eval__window", 10 ** 9)):
        with pytest.raises(ConfigError) as err:
            check_memory(_cfg(**{key: value}), SIZE, available=2 ** 30)
        msg = str(err.value)
        assert msg.startswith(f"{key.replace('__', '.')}={value}: this config needs about "), msg
        assert msg.endswith("; 1 GiB are available") and "\n" not in msg
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2 ** 40) == "3 TiB"
    assert format_bytes(2 ** 70).endswith("EiB")


@pytest.mark.parametrize("unit", KJV.UNITS)
def test_kjv_size_matches_the_corpus(unit):
    for strip, heldout in ((False, "eval"), (True, "eval"), (False, "validation")):
        ds = KJV(strip_brackets=strip, unit=unit, heldout=heldout).load()
        for split, corpus in (("train", ds.train), (heldout, ds.eval)):
            n, tokens, longest = KJV.SIZES[(unit, split)]
            p = corpus.positions
            assert len(p) == n and int(p.sum()) <= tokens and int(p.max()) <= longest
            if not strip:
                assert (int(p.sum()), int(p.max())) == (tokens, longest)


def test_synthetic_size_matches_the_corpus():
    cfg = {"name": "synthetic", "train_sequences": 300, "eval_sequences": 20, "seed": 4,
           "length": {"dist": "lognormal", "median": 30, "sigma": 0.9, "min_len": 1, "max_len": 200},
           "max_train_sequences": 250, "max_eval_sequences": None}
    size = data_size(cfg)
    ds = Synthetic(300, 20, 4, cfg["length"]).load()
    train = ds.train.positions[:250]
    assert (size.train_sequences, size.train_tokens, size.train_longest) == (250, int(train.sum()), int(train.max()))
    assert (size.eval_sequences, size.eval_tokens) == (20, int(ds.eval.positions.sum()))


# --------------------------------------------------------------------------- bytes in, bytes out
def test_textfile_keeps_every_byte(tmp_path):
    raw = b"\xff\xfe abc\r\n  caf\xc3\xa9 \x80\x81\t\rlast\xa0\n\n\nx\xe2\x80"
    assert split_bytes(raw, "line") == [b"\xff\xfe abc", b"caf\xc3\xa9 \x80\x81", b"last\xa0", b"x\xe2\x80"]
    assert split_bytes(raw, "paragraph") == [b"\xff\xfe abc caf\xc3\xa9 \x80\x81 last\xa0", b"x\xe2\x80"]
    (tmp_path / "train.txt").write_bytes(raw)
    (tmp_path / "eval.txt").write_bytes(b"\xff\xfe abc\n")
    ds = TextFile(str(tmp_path / "train.txt"), str(tmp_path / "eval.txt")).load()
    assert [ds.train.sequence(k) for k in range(len(ds.train))] == split_bytes(raw, "line")
    assert ds.eval.sequence(0) == b"\xff\xfe abc"


def test_weights_errors_name_the_file(tmp_path):
    spec = ModelSpec(embed=4, hidden=8, layers=1)
    good = init_weights(spec, 1)
    path = tmp_path / "w.npz"
    np.savez(path, **{k: v.astype(np.float64) for k, v in good.items()})     # float64 is fine: cast
    loaded = load_weights(str(path), spec)
    assert all(loaded[k].dtype == np.float32 and np.array_equal(loaded[k], good[k]) for k in good)
    np.savez(path, **{**good, "lstm.0.b": np.full(32, np.nan, np.float32)})
    with pytest.raises(ConfigError, match=rf"^model.init='{path}': key 'lstm.0.b' contains NaN or inf$"):
        load_weights(str(path), spec)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="not an .npz archive"):
        load_weights(str(tmp_path / "text.npz"), spec)


# --------------------------------------------------------------------------- kernel declarations
@pytest.mark.parametrize("backend", registry.group_options("backend"))
def test_backend_declares_its_kernels(backend):
    """conf/backend/<backend>.yaml declares every kernel once under ``kernels:`` (the typed loader
    reads it): known roles, cells that exist in conf/cell, ``needs`` among the properties some
    strategy guarantees, a description each, and a default ``kernel`` with role exact. Exact
    kernels need nothing: they run the conformance suite's windows (mid-window resets, carried
    rows) and the packed eval streams."""
    from backends.cells import cell_names

    cfg = registry.group_config("backend", backend)
    assert not {"exact_kernels", "baseline_kernels"} & set(cfg), "the old kernel lists: use kernels:"
    decls = registry.kernel_decls(cfg)
    assert decls, f"{backend}: no kernels declared"
    known = registry.layout_properties()
    for name, d in decls.items():
        assert d.role in registry.ROLES, (name, d.role)
        assert d.cells and set(d.cells) <= set(cell_names()), (name, d.cells)
        assert set(d.needs) <= set(known), (name, sorted(set(d.needs) - set(known)), "known:", known)
        assert len(set(d.needs)) == len(d.needs), (name, d.needs)
        assert d.description.strip(), f"{backend}: kernel {name} has no description"
        assert d.role != "exact" or not d.needs, f"{backend}: exact kernel {name} needs {d.needs}"
    default = cfg.get("kernel")
    assert default in decls and decls[default].role == "exact", f"{backend}: default kernel {default!r}"
    assert registry.kernel_facts(cfg, default) == {"eval_kernel": default, "needs": ()}
    for name, d in decls.items():
        facts = registry.kernel_facts(cfg, name)
        assert facts == {"eval_kernel": name if d.role == "exact" else default, "needs": d.needs}


def test_kernel_declarations_are_parsed_strictly():
    for entry, message in (({"cells": ["lstm"]}, "at least a role"), ("exact", "at least a role"),
                           ({"role": "exact", "cell": ["lstm"]}, "unknown key 'cell'")):
        with pytest.raises(ValueError, match=message):
            registry.kernel_decls({"name": "fake", "kernels": {"k": entry}})
    with pytest.raises(ConfigError, match=r"backend.kernel='nope': allowed for backend=fake: k"):
        registry.kernel_decl({"name": "fake", "kernels": {"k": {"role": "exact"}}}, "nope")


def test_kernel_problem_compares_needs_with_guarantees():
    """The config check is a comparison of declarations: no kernel or strategy name in code."""
    from benchmarks.config import kernel_problem

    guarantees = {"a": ("p", "q"), "b": ("q",), "c": ()}
    decl = registry.KernelDecl("k", "peer", ("lstm",), needs=("q",))
    assert kernel_problem(decl, "lstm", "a", guarantees) is None
    assert kernel_problem(decl, "lstm", "c", guarantees) == \
        "needs q, which strategy=c does not guarantee; strategies that do: a, b"
    both = registry.KernelDecl("k", "peer", ("lstm",), needs=("p", "q", "r"))
    assert kernel_problem(both, "lstm", "a", guarantees) == \
        "needs r, which strategy=a does not guarantee; no strategy does"
    assert kernel_problem(decl, "gru", "a", guarantees) == "implements cells lstm, not model.cell=gru"
