"""Runs you can trust: every run in its own process (checked on a sweep of every framework in
test_experiments.py), sweeps that survive their jobs, stop signals and failed writes that leave
valid files with a final status, owned run directories, busy machines flagged. Signal tests send
real signals to a real ``run.py`` process."""

from __future__ import annotations

import csv
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_cli import ROOT, read_steps, run_cli

# backend=numpy (the oracle) needs no framework: these runs start in about a second
NUMPY = ["backend=numpy", "model.embed=4", "model.hidden=8", "train.batch_size=4", "train.window=8",
         "data.max_eval_sequences=8", "eval.batch_size=4", "eval.window=32", "train.progress=false"]


def summary(run_dir) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh, parse_constant=lambda c: pytest.fail(f"summary.json is not strict JSON: {c}"))


def leftovers(run_dir) -> list:
    return [f for f in os.listdir(run_dir) if f.endswith(".tmp") or f == ".lock"]


def start(*args: str, preexec=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def steps_rows(run_dir) -> list:
    try:
        return read_steps(str(run_dir))
    except (OSError, csv.Error):
        return []


# --------------------------------------------------------------------------- one process per run
# A sweep over every framework runs each job in a worker of its own and its parent imports no
# framework: tests/test_experiments.py (test_sweep_runs_each_framework_in_its_own_process) checks it
# on the compare_debug sweep, which starts those framework jobs anyway.


def test_sweep_survives_a_diverging_job(tmp_path):
    """Job 0 diverges (exit 3), job 1 still runs and completes; the sweep exits 1 with one line."""
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "train.lr=1e38,0.002", "train.optimizer=sgd", "train.clip_norm=null", "train.steps=20",
                "data=synthetic", "data.train_sequences=40", "data.eval_sequences=4",
                *[a for a in NUMPY if not a.startswith("data.")], f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: 1 of 2 jobs did not complete: job 0 diverged (exit 3)", last
    first, second = (summary(p) for p in sorted(p for p in sweep.iterdir() if p.is_dir()))
    assert (first["status"], first["exit_code"], first["train_loss_last"]) == ("diverged", 3, None)
    assert (second["status"], second["exit_code"]) == ("completed", 0)
    assert first["process_id"] != second["process_id"]


# --------------------------------------------------------------------------- stop signals
PHASES = {
    # phase: (extra args, predicate on the run dir that says the phase has begun)
    "warm-up": (["train.warmup_steps=100000", "train.steps=1000000", "train.time_budget_s=null"],
                lambda d: len(steps_rows(d)) >= 2),
    "training": (["train.steps=1000000", "train.time_budget_s=null"],
                 lambda d: sum(r["timed"] == "1" for r in steps_rows(d)) >= 2),
    # eval.batch_size=1: one stream of every eval token, a few seconds for the oracle
    "periodic eval": (["train.steps=1000000", "train.time_budget_s=null", "eval.every_steps=3", "eval.batch_size=1",
                       "data.max_eval_sequences=400"], lambda d: len(steps_rows(d)) >= 3),
    "final eval": (["train.steps=3", "eval.batch_size=1", "data.max_eval_sequences=400"],
                   lambda d: len(steps_rows(d)) >= 3),
}
CASES = [("training", signal.SIGINT), ("training", signal.SIGTERM), ("training", signal.SIGHUP),
         ("warm-up", signal.SIGTERM), ("periodic eval", signal.SIGINT), ("final eval", signal.SIGINT)]


@pytest.mark.slow
@pytest.mark.parametrize("phase,sig", CASES, ids=[f"{p}-{s.name}" for p, s in CASES])
def test_stop_signal_leaves_valid_files(tmp_path, phase, sig):
    out = tmp_path / "run"
    extra, begun = PHASES[phase]
    base = [a for a in NUMPY if not (a.startswith("eval.batch_size") or a.startswith("data.max_eval"))]
    proc = start(*base, *extra, f"hydra.run.dir={out}")
    try:
        wait_for(lambda: begun(out), what=phase)
        t0 = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.monotonic() - t0
    status = "interrupted" if sig == signal.SIGINT else "terminated"
    assert proc.returncode == 128 + sig, (proc.returncode, stderr[-2000:])
    assert took < 10, f"took {took:.1f} s to stop"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{status}: stopped by {sig.name}"), stderr
    s = summary(out)
    assert (s["status"], s["exit_code"]) == (status, 128 + sig)
    rows = steps_rows(out)
    assert s["steps"] == len(rows) and s["valid_tokens"] == sum(int(r["valid_tokens"]) for r in rows)
    if phase.endswith("eval"):                    # stopped inside the evaluation at step 3: it left no row
        with open(out / "evals.csv") as fh:
            assert "3" not in [r["step"] for r in csv.DictReader(fh)], "the signal came after the evaluation"
        assert s["steps"] == 3
    if phase == "warm-up":
        assert {r["timed"] for r in rows} == {"0"}
    with np.load(out / "weights.npz") as w:
        assert w["lstm.0.w_h"].shape == (8, 32) and all(np.isfinite(w[k]).all() for k in w.files)
    assert leftovers(out) == []


def test_stop_guard_defers_signals_inside_a_critical_section():
    from benchmarks.signals import StopGuard, Stopped
    with StopGuard() as guard:
        with pytest.raises(Stopped) as stopped:
            with guard.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done = True                       # still running: the signal waits for the block's end
        assert done and stopped.value.status == "terminated" and stopped.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_killed_worker_is_recorded_by_the_parent(tmp_path):
    """A worker killed outright (SIGKILL, as by the OOM killer) cannot write anything: the parent
    marks the run failed with its exit code and the totals of steps.csv."""
    out = tmp_path / "run"
    proc = start(*NUMPY, "train.steps=1000000", "train.time_budget_s=null", f"hydra.run.dir={out}")
    try:
        wait_for(lambda: len(steps_rows(out)) >= 3, what="training")
        worker = summary(out)["process_id"]
        os.kill(worker, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 137, stderr[-2000:]
    assert "the worker process ended by SIGKILL" in stderr.strip().splitlines()[-1]
    s = summary(out)
    assert (s["status"], s["exit_code"]) == ("failed", 137) and s["steps"] == len(steps_rows(out))
    assert leftovers(out) == []


# --------------------------------------------------------------------------- failed writes
def _file_size_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("what", ["steps.csv", "weights.npz"])
def test_failed_write_marks_the_run_failed(tmp_path, what):
    """A file that cannot be written (here: a file size limit, as a full disk) ends the run with
    status failed and one line naming the file; the files already written stay valid."""
    out = tmp_path / "run"
    if what == "steps.csv":       # ~45 bytes a row: the limit is reached after some hundred steps
        args, limit = ["train.steps=1000000", "train.time_budget_s=null", "model.hidden=2"], 20_000
    else:                         # weights of H=64 are ~270 kB
        args, limit = ["train.steps=3", "model.hidden=64"], 100_000
    proc = start(*[a for a in NUMPY if a != "model.hidden=8"], *args, f"hydra.run.dir={out}",
                 preexec=_file_size_limit(limit))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: could not write ") and what in lines[0], stderr
    s = summary(out)
    assert s["status"] == "failed" and what in s["error"] and s["exit_code"] == 1
    assert s["steps"] == len(steps_rows(out))
    assert leftovers(out) == [] and not (out / "weights.npz").exists()


# --------------------------------------------------------------------------- run directories
def test_run_directory_is_owned(tmp_path):
    out = tmp_path / "run"
    args = [*NUMPY, "train.steps=2", f"hydra.run.dir={out}"]
    assert run_cli(*args).returncode == 0
    first = summary(out)
    again = run_cli(*args)
    assert again.returncode == 2 and "holds an earlier run (status completed)" in again.stderr
    assert summary(out) == first, "a refused run must not touch the earlier one"
    assert run_cli(*args, "overwrite=true").returncode == 0
    assert summary(out)["process_id"] != first["process_id"]


def test_live_lock_refuses_and_stale_lock_is_taken_over(tmp_path):
    from benchmarks import rundir
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps(rundir.identity()))          # this test process: alive
    r = run_cli(*NUMPY, "train.steps=2", f"hydra.run.dir={out}")
    assert r.returncode == 2 and f"another run (process {os.getpid()})" in r.stderr, r.stderr
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": rundir.hostname(), "start_ticks": 1}))
    r = run_cli(*NUMPY, "train.steps=2", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert summary(out)["status"] == "completed" and leftovers(out) == []


def test_collector_marks_running_runs_of_gone_processes_stale(tmp_path):
    from benchmarks import results
    from benchmarks.summary import RunSummary
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("alive", os.getpid()), ("gone", dead.pid)):
        d = tmp_path / name
        d.mkdir()
        s = RunSummary(backend="numpy", strategy="packed", data="kjv", process_id=pid, host=None)
        (d / "summary.json").write_text(s.to_json())
    runs, _, _, _ = results.collect(str(tmp_path), warn=False)
    assert dict(zip(runs["run_dir"], runs["status"])) == {"alive": "running", "gone": "stale"}


# --------------------------------------------------------------------------- busy machines
@pytest.mark.slow
def test_busy_machine_is_flagged(tmp_path):
    """Other processes spinning on every core during the timed steps: the run says so on screen
    and flags itself busy in summary.json."""
    out = tmp_path / "run"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        r = run_cli(*NUMPY, "train.steps=40", "train.time_budget_s=null", f"hydra.run.dir={out}")
    finally:
        for h in hogs:
            h.kill()
    assert r.returncode == 0, r.stderr[-2000:]
    s = summary(out)
    assert s["busy"] is True and s["other_cpu_during"] > 0.25, s["other_cpu_during"]
    assert "warning: other processes used" in r.stdout and "busy: true" in r.stdout
