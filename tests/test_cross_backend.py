"""Cross-backend: same seed and data -> the same losses step by step as torch for 10 SGD steps, for
every cell; and every backend x strategy x cell evaluates its trained weights on held-out sequences
to the NumPy oracle's eval loss for the same weights.

Batches come from the real layouts (synthetic data, every strategy), so they carry state across
windows and reset mid-window exactly as training does. Each backend trains in a process of its own
(``python -m tests.trajectory``: two frameworks never share a process); this process runs only the
oracle, which imports no framework. The trajectory processes use JAX's persistent compilation
cache (in the trajectories' folder): the cells and strategies of one backend repeat the same
computations on the same shapes, which jax then compiles once (nothing here counts compilations).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.base import OptimizerSpec
from backends.cells import cell_names
from benchmarks import registry
from benchmarks.harness import evaluate
from tests.conftest import SHARED_ENV, jax_cache
from tests.helpers import REQUIRE_ALL, assert_close, backend_names, oracle
from tests.trajectory import SPEC, STRATEGIES, held_out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHERS = [n for n in backend_names() if n != "torch"]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """``trajectory(name)``: that backend's results (``python -m tests.trajectory``), computed on
    first use, once per test process (a framework group needs only its own backend and torch), or
    once per run where the run's processes share a folder (tests/conftest.py: the framework
    groups all need torch's)."""
    shared = os.environ.get(SHARED_ENV)
    folder, cache = (Path(shared) / "trajectories" if shared else tmp_path_factory.mktemp("trajectories")), {}
    folder.mkdir(exist_ok=True)

    def get(name):
        if name not in cache:
            missing = registry.missing_requirements(registry.backend_configs()[name])
            if missing:
                if REQUIRE_ALL:
                    pytest.fail(f"backend {name} needs {missing} (RESETBENCH_REQUIRE_ALL=1)")
                pytest.skip(f"backend {name} not installed")
            path = folder / f"{name}.npz"
            if not path.exists():
                env = {**os.environ, **jax_cache(folder / "jax_cache")}
                part = folder / f"{name}.{os.getpid()}.npz"         # complete before it gets its name
                r = subprocess.run([sys.executable, "-m", "tests.trajectory", name, str(part)], cwd=ROOT,
                                   capture_output=True, text=True, timeout=600, env=env)
                assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
                os.replace(part, path)
            with np.load(path) as npz:
                cache[name] = {k: npz[k] for k in npz.files}
        return cache[name]
    return get


def _cells(got, name, cell):
    if not any(k.startswith(f"{cell}/") for k in got):
        pytest.skip(f"{name}'s default kernel does not run the {cell} cell")


@pytest.mark.parametrize("cell", cell_names())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("other", OTHERS)
def test_ten_sgd_steps_match_torch(trajectory, other, strategy, cell):
    got, exp = trajectory(other), trajectory("torch")
    _cells(exp, "torch", cell)
    _cells(got, other, cell)
    losses = f"{cell}/{strategy}/losses"
    assert exp[losses][0] != exp[losses][-1]
    assert_close(got[losses], exp[losses], f"{other} vs torch losses ({cell}, {strategy})", rtol=2e-4)
    keys = [k for k in exp if k.startswith(f"{cell}/{strategy}/w/")]
    assert keys
    for k in keys:
        assert_close(got[k], exp[k], f"{other} vs torch weights {k}", rtol=1e-3, atol_scale=1e-4)


@pytest.mark.parametrize("cell", cell_names())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", backend_names())
def test_held_out_eval_loss_matches_the_oracle(trajectory, name, strategy, cell):
    """The backend's weights after training on the strategy's batches, evaluated by the backend
    and by the float64 oracle on sequences neither trained on: the same mean eval loss."""
    got = trajectory(name)
    _cells(got, name, cell)
    key = f"{cell}/{strategy}"
    weights = {k[len(key) + 3:]: v for k, v in got.items() if k.startswith(f"{key}/w/")}
    ref = oracle(dataclasses.replace(SPEC, cell=cell), weights, OptimizerSpec("sgd", lr=1.0), 4)
    expected, tokens = evaluate(ref, held_out())
    assert tokens > 20 and expected > 0
    assert_close(got[f"{key}/eval"], expected, f"{name} eval loss ({cell}, {strategy})", rtol=1e-5)
