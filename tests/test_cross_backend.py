"""Cross-backend: same seed and data -> the same losses step by step as torch for 10 SGD steps.

Batches come from the real layouts (synthetic data, every strategy), so they carry state across
windows and reset mid-window exactly as training does.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends.base import ModelSpec, OptimizerSpec, init_weights
from benchmarks.data import load_synthetic
from benchmarks.strategies import make_layout
from tests.helpers import assert_close, backend_names, make_backend

SPEC = ModelSpec(embed=16, hidden=32, layers=1)
OTHERS = [n for n in backend_names() if n != "torch"]


@pytest.mark.parametrize("strategy", ["packed", "reset_all", "padded"])
@pytest.mark.parametrize("name", OTHERS)
def test_ten_sgd_steps_match_torch(name, strategy):
    ds = load_synthetic(60, 5, seed=3, length={"dist": "lognormal", "median": 20, "sigma": 0.8})
    opts = {"pad_multiple": 32} if strategy == "padded" else {}  # few shapes: few compiles
    layout = make_layout(strategy, batch_size=4, window=12, seed=0, **opts)
    batches = list(itertools.islice(itertools.chain(layout.epoch(ds.train, 0), layout.epoch(ds.train, 1)), 10))
    assert len(batches) == 10
    if strategy == "packed":
        assert any(b.reset[:, 1:].any() for b in batches), "need mid-window resets"
    w = init_weights(SPEC, 0)
    opt = OptimizerSpec("sgd", lr=1.0, clip_norm=1.0)
    ref = make_backend("torch", SPEC, w, opt, 4)
    other = make_backend(name, SPEC, w, opt, 4)
    got = [float(other.train_step(b)) for b in batches]
    exp = [float(ref.train_step(b)) for b in batches]
    assert exp[0] != exp[-1]
    assert_close(np.array(got), np.array(exp), f"{name} vs torch losses", rtol=2e-4)
    wg, we = other.get_weights(), ref.get_weights()
    for k in we:
        assert_close(wg[k], we[k], f"{name} vs torch weights {k}", rtol=1e-3, atol_scale=1e-4)
