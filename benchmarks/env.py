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


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def environment() -> Dict[str, Any]:
    return {"host_cpu": cpu_model(), "host_cores": usable_cores(), "host_memory_bytes": memory_bytes(),
            "platform": platform.platform(), "python_version": platform.python_version(),
            "numpy_version": np.__version__}
