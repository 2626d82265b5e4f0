"""The machine a run happened on: CPU model, cores, memory, Python and NumPy versions."""

from __future__ import annotations

import os
import platform
import resource
import sys
from typing import Any, Dict

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


def environment() -> Dict[str, Any]:
    return {"host_cpu": cpu_model(), "host_cores": usable_cores(), "host_memory_bytes": memory_bytes(),
            "platform": platform.platform(), "python_version": platform.python_version(),
            "numpy_version": np.__version__}
