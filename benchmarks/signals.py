"""Stopping a run cleanly on SIGINT, SIGTERM and SIGHUP.

Ctrl-C sends SIGINT; ``timeout``, ``kill``, SLURM preemption and ``docker stop`` send SIGTERM; a
closed terminal sends SIGHUP. :class:`StopGuard` turns each into a :class:`Stopped` exception,
raised at once, except inside a :meth:`StopGuard.critical` section (a training step with its
``steps.csv`` row, a file being written, a compilation that restores weights afterwards), where
it is held back and raised when the section ends. A run therefore stops between two steps, with
weights, ``steps.csv`` and ``summary.json`` describing the same completed step.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Dict, Iterator, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STATUS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated", signal.SIGHUP: "terminated"}


def exit_code(signum: int) -> int:
    """The shell's exit code for a process stopped by signal ``signum`` (128 + N)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(BaseException):
    """A stop signal arrived. A BaseException like KeyboardInterrupt, so that ``except
    Exception`` in library code does not swallow it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.status = STATUS.get(signal.Signals(self.signum), "terminated")
        self.exit_code = exit_code(self.signum)
        super().__init__(f"{self.status} by {signal_name(self.signum)}")


class StopGuard:
    """Signal handlers that raise :class:`Stopped`, deferred inside critical sections.

    Use ``with StopGuard() as guard:`` around the run; ``with guard.critical():`` around work that
    must not be cut in half. After the first signal the guard stops listening (a second Ctrl-C
    does not interrupt the clean-up)."""

    def __init__(self):
        self.depth = 0
        self.pending: Optional[int] = None
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    # -- installation -----------------------------------------------------------------------
    def __enter__(self) -> "StopGuard":
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):      # not the main thread, or not supported
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    # -- handling -----------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if self.received is not None:           # already stopping: finish the clean-up
            return
        self.received = signum
        if self.depth > 0:
            self.pending = signum
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Hold stop signals back until the block ends (then raise :class:`Stopped`)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Stopped(signum)


class _NoGuard:
    """Stand-in when a run is driven in-process without signal handling (tests, notebooks)."""

    received = None

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        yield


NO_GUARD = _NoGuard()
