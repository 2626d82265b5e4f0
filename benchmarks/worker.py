"""The process that trains one job: ``python -m benchmarks.worker`` (started by :mod:`benchmarks.jobs`).

It reads ``{"config": <composed config>, "out_dir": <run directory>}`` as JSON on stdin, runs
:func:`benchmarks.harness.run` under a :class:`benchmarks.signals.StopGuard`, prints one line when
the run does not complete, and exits with the run's code (:data:`EXIT_CODES`). It is the only
process that imports a framework, and it ends when its parent does (Linux: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_CODES = {"completed": EXIT_OK, "failed": EXIT_FAILED, "diverged": EXIT_DIVERGED}   # + 128+N for signals
PARENT_ENV = "RESETBENCH_PARENT_PID"


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent ends (a SIGKILLed ``run.py`` must
    not leave an orphan training on the cores); then stop at once if the parent is already gone."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    expected = os.environ.get(PARENT_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def _steps_done(out_dir: str) -> str:
    try:
        with open(os.path.join(out_dir, "summary.json")) as fh:
            return f"after step {json.load(fh).get('steps')}"
    except (OSError, ValueError):
        return "before training"


def _record_exit_code(out_dir: str, code: int) -> None:
    """Write this process's exit code into the run's summary (the parent does it again; this one
    counts if the parent is gone)."""
    from benchmarks.summary import RunSummary
    from benchmarks.writer import WriteError, write_summary
    try:
        with open(os.path.join(out_dir, "summary.json")) as fh:
            summary = RunSummary.from_dict(json.load(fh))
        write_summary(out_dir, summary.update(exit_code=code))
    except (OSError, ValueError, TypeError, WriteError):
        pass


def main() -> int:
    payload = json.load(sys.stdin)
    cfg, out_dir = payload["config"], payload["out_dir"]
    code = run_job(cfg, out_dir)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # the run is over: nothing left to stop
        signal.signal(sig, signal.SIG_IGN)
    _record_exit_code(out_dir, code)
    return code


def run_job(cfg, out_dir: str) -> int:
    """Run the job; one line on stderr unless it completed; the exit code."""
    from backends.base import ConfigError
    from benchmarks.harness import Diverged, run
    from benchmarks.signals import StopGuard, Stopped, signal_name
    from benchmarks.writer import WriteError

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with StopGuard() as guard:
        try:
            run(cfg, out_dir, guard=guard)
            return EXIT_OK
        except Stopped as exc:
            say(f"{exc.status}: stopped by {signal_name(exc.signum)} {_steps_done(out_dir)}; files kept in {out_dir}")
            return exc.exit_code
        except ConfigError as exc:
            say(f"error: {exc}")
            return EXIT_USER_ERROR
        except Diverged as exc:
            say(f"error: {exc} (files kept in {out_dir})")
            return EXIT_DIVERGED
        except WriteError as exc:
            say(f"error: {exc} (run marked failed; files kept in {out_dir})")
            return EXIT_FAILED
        except Exception as exc:  # noqa: BLE001 - a bug or a framework error: show where, then one line
            traceback.print_exc()
            say(f"error: the run failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                f"files kept in {out_dir}")
            return EXIT_FAILED


if __name__ == "__main__":
    die_with_parent()
    sys.exit(main())
