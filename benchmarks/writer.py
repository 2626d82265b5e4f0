"""The run's files (``steps.csv``, ``evals.csv``, ``summary.json``, ``weights.npz``), written so that
every file on disk is valid at every moment.

CSV rows are appended and flushed one by one; a row that cannot be written whole (disk full) is cut
off again, so the file ends at the last complete row. The summary and the weights are written to a
temporary file and renamed over the old one; a failed write removes the temporary file. Any
failure raises :class:`WriteError`, a one-line message naming the file.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from backends.base import save_weights
from benchmarks.summary import RunSummary

STEP_COLUMNS = ("step", "epoch", "loss", "valid_tokens", "total_slots", "step_time_s", "elapsed_s", "timed")
EVAL_COLUMNS = ("step", "valid_tokens_seen", "elapsed_s", "eval_loss", "eval_tokens", "eval_time_s")


class WriteError(RuntimeError):
    """A run file could not be written (disk full, read-only directory, ...)."""

    def __init__(self, path: str, exc: BaseException):
        self.path = path
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        super().__init__(f"could not write {path}: {reason}")


class _CsvFile:
    """An append-only CSV file: each row reaches the disk whole, or not at all."""

    def __init__(self, path: str, columns: Sequence[str]):
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise WriteError(path, exc) from None
        self._size = 0
        self.append(columns)

    def append(self, row: Sequence[Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        data = buf.getvalue().encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)       # back to the last whole row
            except OSError:
                pass
            raise WriteError(self.path, exc) from None
        self._size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _replace_atomically(path: str, write) -> None:
    """``write(tmp_path)``, then rename over ``path``; the temporary file never stays behind."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise WriteError(path, exc) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class RunWriter:
    """Owns the run directory's files (the directory must exist: :func:`benchmarks.rundir.claim`)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self._steps = _CsvFile(os.path.join(out_dir, "steps.csv"), STEP_COLUMNS)
        self._evals = _CsvFile(os.path.join(out_dir, "evals.csv"), EVAL_COLUMNS)

    def step(self, row: Sequence[Any]) -> None:
        self._steps.append(row)

    def eval(self, row: Sequence[Any]) -> None:
        self._evals.append(row)

    def summary(self, summary: RunSummary) -> None:
        write_summary(self.out_dir, summary)

    def weights(self, weights: Mapping[str, np.ndarray]) -> None:
        _replace_atomically(os.path.join(self.out_dir, "weights.npz"),
                            lambda tmp: save_weights(tmp, weights, atomic=False))

    def close(self) -> None:
        self._steps.close()
        self._evals.close()


def write_summary(out_dir: str, summary: RunSummary) -> None:
    """Write ``summary.json`` atomically (also used by the parent process to finalize a run)."""
    text = summary.to_json()

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
    _replace_atomically(os.path.join(out_dir, "summary.json"), write)
