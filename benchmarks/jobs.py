"""Every run in its own process: what ``@hydra.main`` calls for a run, and for each job of a sweep.

``run.py`` (the parent) never imports a framework. For each job, :func:`task` takes the run
directory (:func:`benchmarks.rundir.claim`), starts ``python -m benchmarks.worker`` with the
composed config, forwards SIGINT, SIGTERM and SIGHUP to it, waits, and makes sure the run ends
with a final status: if the worker died without writing one (killed, crashed), the parent writes
it, with the step count of ``steps.csv``. The exit code of every job is recorded in its summary.

Jobs of a sweep run one after another (timings stay clean). A job that diverges, fails or is
killed does not stop the sweep; the sweep exits non-zero at the end with one line counting what
did not complete (:func:`sweep_exit_code`). A stop signal (Ctrl-C, SIGTERM, SIGHUP) stops the
current job cleanly and the sweep with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

from backends.base import ConfigError
from benchmarks import registry, rundir
from benchmarks.signals import HANDLED, STATUS, exit_code, signal_name
from benchmarks.summary import RunSummary
from benchmarks.worker import EXIT_USER_ERROR, PARENT_ENV
from benchmarks.writer import WriteError, write_summary

GRACE_S = 20.0      # after forwarding a stop signal, how long the worker may take to save its files


@dataclasses.dataclass
class Outcome:
    """How one job ended."""

    num: Optional[int]
    status: str
    exit_code: int
    out_dir: str
    stop_signal: Optional[int] = None      # the stop signal this process received and forwarded


@dataclasses.dataclass
class _Sweep:
    """The jobs of this process's sweep so far."""

    outcomes: List[Outcome] = dataclasses.field(default_factory=list)


SWEEP = _Sweep()


def task(cfg) -> Optional[float]:
    """Hydra's task function: run one job in a child process; return its eval loss (for sweepers).
    A single run exits with the job's code; in a sweep, a failed job is recorded and the sweep goes
    on, while a stop signal ends the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    num = int(hc.job.num) if sweep else None
    outcome = run_job(OmegaConf.to_container(cfg, resolve=True), hc.runtime.output_dir, num)
    SWEEP.outcomes.append(outcome)
    if outcome.stop_signal is not None or (not sweep and outcome.exit_code != 0):
        sys.exit(outcome.exit_code)
    return _eval_loss(outcome.out_dir) if outcome.status == "completed" else None


def run_job(cfg: Mapping[str, Any], out_dir: str, num: Optional[int] = None) -> Outcome:
    """Claim ``out_dir``, run the job in a worker process, finalize its summary."""
    try:
        lock = rundir.claim(out_dir, bool(cfg.get("overwrite", False)))
    except ConfigError as exc:
        print(f"error: {'' if num is None else f'job {num}: '}{exc}", file=sys.stderr, flush=True)
        return Outcome(num, "refused", EXIT_USER_ERROR, out_dir)
    try:
        code, forwarded = _supervise(cfg, out_dir)
        status = _finalize(cfg, out_dir, code, forwarded)
    finally:
        lock.release()
    return Outcome(num, status, code, out_dir, forwarded)


class _Forwarder:
    """While a worker runs, stop signals to this process go to the worker (once each kind)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.first, self.at = proc, None, None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "_Forwarder":
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)

    def _handle(self, signum, frame) -> None:
        if self.first is None:
            self.first, self.at = signum, time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signum)


def _supervise(cfg: Mapping[str, Any], out_dir: str):
    """Start the worker, feed it the job, wait for it; after a stop signal give it ``GRACE_S``
    seconds to save its files, then kill it. Returns (exit code, the stop signal received)."""
    env = {**os.environ, PARENT_ENV: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(p for p in (registry.ROOT, os.environ.get("PYTHONPATH")) if p)}
    # its own session: a terminal's Ctrl-C reaches this process only, which forwards it once
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker"], stdin=subprocess.PIPE, env=env,
                            start_new_session=True)
    with _Forwarder(proc) as fwd:
        try:
            proc.stdin.write(json.dumps({"config": cfg, "out_dir": out_dir}).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        while True:
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if fwd.at is not None and time.monotonic() - fwd.at > GRACE_S:
                    proc.kill()
    return (exit_code(-code) if code < 0 else code), fwd.first


def _finalize(cfg: Mapping[str, Any], out_dir: str, code: int, forwarded: Optional[int]) -> str:
    """Record the exit code in the summary; if the worker left none or left it ``running``, write
    the final status here (the steps count from steps.csv) with a one-line message. Returns the status."""
    summary = _read_summary(out_dir) or RunSummary.from_config(cfg).update(
        parent_process_id=os.getpid(), kernel_role=_kernel_role(cfg))
    died = summary.status == "running"
    if died:
        summary.update(**_steps_csv_totals(out_dir))
        how = (f"killed after {GRACE_S:.0f} s" if forwarded is not None else "ended") + \
              (f" by {signal_name(code - 128)}" if code > 128 else f" with exit code {code}")
        summary.status = STATUS.get(signal.Signals(forwarded), "terminated") if forwarded is not None else "failed"
        summary.stop_reason = summary.status if forwarded is not None else "error"
        summary.error = f"the worker process {how} before finishing its files"
    summary.exit_code = code
    try:
        write_summary(out_dir, summary)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if died and code > 128:       # a worker that exits by itself has printed its own line
        print(f"{'error' if forwarded is None else summary.status}: {summary.error}; files kept in {out_dir}",
              file=sys.stderr, flush=True)
    return summary.status


def _kernel_role(cfg: Mapping[str, Any]) -> Optional[str]:
    try:
        return registry.kernel_decl(cfg["backend"], cfg["backend"]["kernel"]).role
    except (KeyError, ConfigError):
        return None


def _read_summary(out_dir: str) -> Optional[RunSummary]:
    try:
        with open(os.path.join(out_dir, "summary.json")) as fh:
            return RunSummary.from_dict(json.load(fh))
    except (OSError, ValueError, TypeError):
        return None


def _steps_csv_totals(out_dir: str) -> Dict[str, Any]:
    """Totals over the complete rows of steps.csv (a torn last line is not counted): what the run
    had done when its worker died."""
    import csv
    try:
        with open(os.path.join(out_dir, "steps.csv"), newline="") as fh:
            text = fh.read()
    except OSError:
        return {}
    lines = text.split("\n")[:-1]                    # the part after the last newline is torn
    rows = list(csv.DictReader(lines))
    try:
        valid = sum(int(r["valid_tokens"]) for r in rows)
        slots = sum(int(r["total_slots"]) for r in rows)
        return {"steps": len(rows), "valid_tokens": valid, "total_slots": slots,
                "pad_fraction": 1.0 - valid / slots if slots else None,
                "train_loss_last": float(rows[-1]["loss"]) if rows else None}
    except (KeyError, ValueError, TypeError):
        return {"steps": len(rows)}


def _eval_loss(out_dir: str) -> Optional[float]:
    s = _read_summary(out_dir)
    return s.eval_loss if s is not None else None


def sweep_exit_code() -> int:
    """After a sweep: 0 if every job completed, else 1 with one line counting the others."""
    bad = [o for o in SWEEP.outcomes if o.status != "completed"]
    if not bad:
        return 0
    detail = ", ".join(f"job {o.num} {o.status} (exit {o.exit_code})" for o in bad)
    print(f"error: {len(bad)} of {len(SWEEP.outcomes)} jobs did not complete: {detail}", file=sys.stderr, flush=True)
    return 1
