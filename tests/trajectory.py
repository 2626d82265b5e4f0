"""``python -m tests.trajectory BACKEND OUT.npz``: 10 SGD steps of one backend on every strategy's
real batches (synthetic data), saved as ``<strategy>/losses`` and ``<strategy>/w/<key>``.

Run in a process of its own by tests/test_cross_backend.py, which compares backends."""

from __future__ import annotations

import itertools
import sys

import numpy as np

from backends.base import ModelSpec, OptimizerSpec, init_weights
from benchmarks import registry
from benchmarks.data import Synthetic

SPEC = ModelSpec(embed=16, hidden=32, layers=1)
STRATEGIES = registry.group_options("strategy")


def batches(strategy: str):
    ds = Synthetic(60, 5, seed=3, length={"dist": "lognormal", "median": 20, "sigma": 0.8}).load()
    cfg = registry.group_config("strategy", strategy)
    if "pad_multiple" in cfg:
        cfg["pad_multiple"] = 32      # few shapes: few compiles
    layout = registry.build_layout(cfg, batch_size=4, window=12, seed=0)
    out = list(itertools.islice(itertools.chain(layout.epoch(ds.train, 0), layout.epoch(ds.train, 1)), 10))
    assert len(out) == 10
    if "no_mid_reset" not in (cfg.get("guarantees") or []):
        assert any(b.reset[:, 1:].any() for b in out), "need mid-window resets"
    return out


def main(name: str, path: str) -> None:
    cfg = registry.backend_configs()[name]
    result = {}
    for strategy in STRATEGIES:
        be = registry.build_backend(cfg, SPEC, init_weights(SPEC, 0), OptimizerSpec("sgd", lr=1.0, clip_norm=1.0),
                                    4, device="cpu")
        result[f"{strategy}/losses"] = np.array([float(be.train_step(b)) for b in batches(strategy)])
        result.update({f"{strategy}/w/{k}": v for k, v in be.get_weights().items()})
    np.savez(path, **result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
