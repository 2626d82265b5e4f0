"""Run directories are owned: one live run per directory, finished runs are not overwritten.

A run holds ``<run dir>/.lock`` (JSON: process id, host, process start time) from before its
first file is written until its summary is final. :func:`claim` refuses a directory whose lock
belongs to a live process, or that holds a finished run (a ``summary.json`` whose status is not
``running``, or any run files) unless ``overwrite`` is set; a lock left by a process that is gone
is taken over.
:func:`process_alive` is how the collector tells a ``running`` run from a ``stale`` one.

Nothing here imports a framework.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Dict, Optional

from backends.base import ConfigError

LOCK = ".lock"
RUN_FILES = ("summary.json", "steps.csv", "evals.csv", "weights.npz")


def hostname() -> str:
    return socket.gethostname()


def process_start_ticks(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc/PID/stat`` field
    22), or None where that cannot be read. With the pid it identifies a process even after the
    pid has been reused."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    try:                                    # the command name (field 2) may contain spaces: skip past ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def identity(pid: Optional[int] = None) -> Dict[str, Any]:
    """``{"pid", "host", "start_ticks"}`` of this (or process ``pid``)."""
    pid = os.getpid() if pid is None else int(pid)
    return {"pid": pid, "host": hostname(), "start_ticks": process_start_ticks(pid)}


def process_alive(pid: Any, host: Any = None, start_ticks: Any = None) -> Optional[bool]:
    """True if the process is running, False if it is gone, None if this machine cannot tell
    (another host, or no pid)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if host is not None and host != hostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # exists, owned by someone else
        pass
    if start_ticks is not None:
        now = process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False                    # the pid was reused by another process
    return True


def read_lock(run_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(run_dir, LOCK)) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}                           # unreadable: treated as left by a process that is gone


def lock_alive(run_dir: str) -> Optional[bool]:
    """Whether the run directory's lock belongs to a live process (None: no lock, or unknown)."""
    lock = read_lock(run_dir)
    if lock is None:
        return None
    return process_alive(lock.get("pid"), lock.get("host"), lock.get("start_ticks")) if lock else False


def existing_run(run_dir: str) -> Optional[str]:
    """What ``run_dir`` already holds of an earlier run: its status (``completed``, ``running`` for
    one whose process is gone, ...), ``files`` for run files without a readable summary, or None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            status = json.load(fh).get("status")
        return status if isinstance(status, str) else "files"
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        return "files"
    return "files" if any(os.path.exists(os.path.join(run_dir, f)) for f in RUN_FILES) else None


def _refuse_existing(run_dir: str, what: str) -> ConfigError:
    held = "an earlier run's files" if what == "files" else f"an earlier run (status {what})"
    return ConfigError("hydra.run.dir", run_dir, f"holds {held}; choose another directory, or pass "
                       f"overwrite=true to replace it")


def check(run_dir: str, overwrite: bool = False) -> None:
    """Raise :class:`ConfigError` (key ``hydra.run.dir``) if a run may not start in ``run_dir``:
    another live run holds it, or it holds an earlier run's files and ``overwrite`` is false."""
    if not os.path.isdir(run_dir):
        return
    if lock_alive(run_dir):
        raise _refuse_live(run_dir)
    what = existing_run(run_dir)
    if what and not overwrite:
        raise _refuse_existing(run_dir, what)


def _refuse_live(run_dir: str) -> ConfigError:
    lock = read_lock(run_dir) or {}
    return ConfigError("hydra.run.dir", run_dir, f"another run (process {lock.get('pid')}) is writing "
                       f"there; choose another directory")


class RunLock:
    """The lock of one run directory, held by this process (:func:`claim` takes it)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self.held = False

    def acquire(self) -> None:
        """Create the lock file exclusively; a lock of a process that is gone is replaced."""
        data = json.dumps(identity()).encode()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if lock_alive(self.run_dir):
                    raise _refuse_live(self.run_dir) from None
                try:
                    os.unlink(self.path)     # left by a process that is gone
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.held = True
            return
        raise ConfigError("hydra.run.dir", self.run_dir, "another run took the directory at the same time")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def claim(run_dir: str, overwrite: bool = False) -> RunLock:
    """Take ``run_dir`` for a new run: :func:`check`, the lock, and with ``overwrite`` the old run's
    files removed. Returns the held :class:`RunLock`; raises :class:`ConfigError` otherwise."""
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        what = existing_run(run_dir)
        if what and not overwrite:
            raise _refuse_existing(run_dir, what)
        for name in RUN_FILES:
            try:
                os.unlink(os.path.join(run_dir, name))
            except FileNotFoundError:
                pass
    except BaseException:
        lock.release()
        raise
    return lock
