"""Cross-backend: same seed and data -> the same losses step by step as torch for 10 SGD steps.

Batches come from the real layouts (synthetic data, every strategy), so they carry state across
windows and reset mid-window exactly as training does. Each backend trains in a process of its own
(``python -m tests.trajectory``: two frameworks never share a process); this test only compares.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REQUIRE_ALL, assert_close, backend_names
from tests.trajectory import STRATEGIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHERS = [n for n in backend_names() if n != "torch"]


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Backend -> its trajectories (``python -m tests.trajectory``), computed once per session."""
    from benchmarks import registry
    folder = tmp_path_factory.mktemp("trajectories")
    out = {}
    for name in ["torch"] + OTHERS:
        missing = registry.missing_requirements(registry.backend_configs()[name])
        if missing:
            if REQUIRE_ALL:
                pytest.fail(f"backend {name} needs {missing} (RESETBENCH_REQUIRE_ALL=1)")
            continue
        path = folder / f"{name}.npz"
        r = subprocess.run([sys.executable, "-m", "tests.trajectory", name, str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        with np.load(path) as npz:
            out[name] = {k: npz[k] for k in npz.files}
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("other", OTHERS)
def test_ten_sgd_steps_match_torch(trajectories, other, strategy):
    if "torch" not in trajectories or other not in trajectories:
        pytest.skip("backend not installed")
    got, exp = trajectories[other], trajectories["torch"]
    losses = f"{strategy}/losses"
    assert exp[losses][0] != exp[losses][-1]
    assert_close(got[losses], exp[losses], f"{other} vs torch losses ({strategy})", rtol=2e-4)
    keys = [k for k in exp if k.startswith(f"{strategy}/w/")]
    assert keys
    for k in keys:
        assert_close(got[k], exp[k], f"{other} vs torch weights {k}", rtol=1e-3, atol_scale=1e-4)
