"""The machine a run happened on: CPU model, cores, memory, Python and NumPy versions, and whether
other processes shared its cores while it ran (:class:`CpuMonitor`)."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``), so that a
    run inside a multirun sweep (one process, jobs one after another) reports its own peak.
    Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


MALLOC_THRESHOLD = 1 << 30          # bytes
_MALLOC: Dict[str, str] = {"state": "default"}


def tune_malloc(threshold: int = MALLOC_THRESHOLD) -> str:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes for this process.

    glibc serves large blocks with ``mmap`` and hands them back to the OS on ``free``; a training
    step that frees and reallocates the same large tensors then pays page faults and zeroing for
    fresh pages every step, and glibc's adaptive threshold makes the cost depend on the history
    of allocations. Measured here (2-core EPYC, torch 2.13 fused LSTM, forward + backward, B=32
    H=256): 0.37 ms per time step at T=64 but 0.51 ms at T=69..128 with the defaults, 0.36 ms at
    every T with 1 GiB thresholds; B=64 T=128 H=512: 3.1 vs 2.3 ms per step. The price: memory
    freed by the process stays mapped (the peak RSS is what the run needed anyway). Returns the
    state recorded as ``malloc`` in the environment; a no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, ctypes.c_int(threshold)) == 1 and libc.mallopt(-1, ctypes.c_int(threshold)) == 1
    except (OSError, AttributeError):
        ok = False
    if ok:
        _MALLOC["state"] = f"glibc mmap_threshold=trim_threshold={threshold}"
    return _MALLOC["state"]


def malloc_state() -> str:
    """``default``, or the thresholds :func:`tune_malloc` set in this process (they stay set)."""
    return _MALLOC["state"]


def environment() -> Dict[str, Any]:
    return {"host_cpu": cpu_model(), "host_cores": usable_cores(), "host_memory_bytes": memory_bytes(),
            "platform": platform.platform(), "python_version": platform.python_version(),
            "numpy_version": np.__version__, "malloc": malloc_state()}


# --------------------------------------------------------------------------- other processes
BUSY_CORES = 0.25    # other processes using more than this many cores make timings unreliable


def _cpu_busy_seconds(cpus) -> Optional[float]:
    """CPU seconds spent busy (not idle, not waiting for I/O) since boot on the CPUs ``cpus``,
    from ``/proc/stat``; None off Linux."""
    try:
        with open("/proc/stat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in rest.split()]
        busy += sum(v[:8]) - v[3] - v[4]          # user nice system idle iowait irq softirq steal
    return busy / tick


class CpuMonitor:
    """How many cores other processes used, between marks: the CPU time the machine's usable cores
    (this process's affinity set) spent busy, minus this process's own CPU time, over wall time.
    On a quiet machine it is ~0; another benchmark on the same 2 cores shows as ~1 core."""

    def __init__(self):
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = set(range(os.cpu_count() or 1))
        self._mark = self._sample()

    def _sample(self) -> Tuple[float, Optional[float], float]:
        t = os.times()
        return time.perf_counter(), _cpu_busy_seconds(self.cpus), t.user + t.system + t.children_user + t.children_system

    def since_mark(self, remark: bool = True) -> Optional[float]:
        """Cores used by other processes since the last mark (None where /proc/stat is missing or
        no time passed); ``remark`` starts a new interval."""
        now = self._sample()
        (w0, b0, o0), (w1, b1, o1) = self._mark, now
        if remark:
            self._mark = now
        if b0 is None or b1 is None or w1 - w0 <= 0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0))


def is_busy(other_cores: Optional[float]) -> bool:
    return other_cores is not None and other_cores > BUSY_CORES
