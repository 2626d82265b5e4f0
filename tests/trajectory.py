"""``python -m tests.trajectory BACKEND OUT.npz``: for every cell the backend's default kernel runs,
10 SGD steps on every strategy's real batches (synthetic data), then one evaluation on held-out
sequences; saved as ``<cell>/<strategy>/losses``, ``<cell>/<strategy>/w/<key>`` (the trained
weights) and ``<cell>/<strategy>/eval`` (mean eval loss of those weights).

Run in a process of its own by tests/test_cross_backend.py, which compares the backends with each
other and each evaluation with the NumPy oracle's on the same weights."""

from __future__ import annotations

import dataclasses
import itertools
import sys

import numpy as np

from backends.base import ModelSpec, OptimizerSpec, init_weights
from benchmarks import registry
from benchmarks.data import Synthetic
from benchmarks.harness import evaluate
from resetbench.layouts import eval_batches

SPEC = ModelSpec(embed=16, hidden=32, layers=1)
STRATEGIES = registry.group_options("strategy")
EVAL_B, EVAL_T = 4, 16


def dataset():
    """60 training and 5 held-out synthetic sequences (lengths 2 to ~100)."""
    return Synthetic(60, 5, seed=3, length={"dist": "lognormal", "median": 20, "sigma": 0.8}).load()


def batches(strategy: str):
    cfg = registry.group_config("strategy", strategy)
    if "pad_multiple" in cfg:
        cfg["pad_multiple"] = 64      # two window lengths here (64 and 128 columns): few compiles
    layout = registry.build_layout(cfg, batch_size=4, window=12, seed=0)
    train = dataset().train
    out = list(itertools.islice(itertools.chain(layout.epoch(train, 0), layout.epoch(train, 1)), 10))
    assert len(out) == 10
    if "no_mid_reset" not in (cfg.get("guarantees") or []):
        assert any(b.reset[:, 1:].any() for b in out), "need mid-window resets"
    return out


def held_out():
    """The held-out sequences in the harness's eval layout (each from a zero state)."""
    return eval_batches(dataset().eval, EVAL_B, EVAL_T)


def cells(name: str) -> list:
    """The cells the backend's default kernel runs."""
    cfg = registry.backend_configs()[name]
    return list(registry.kernel_decl(cfg, registry.default_kernel(cfg)).cells)


def main(name: str, path: str) -> None:
    cfg = registry.backend_configs()[name]
    result = {}
    for cell, strategy in itertools.product(cells(name), STRATEGIES):
        spec = dataclasses.replace(SPEC, cell=cell)
        be = registry.build_backend(cfg, spec, init_weights(spec, 0), OptimizerSpec("sgd", lr=1.0, clip_norm=1.0),
                                    4, device="cpu")
        key = f"{cell}/{strategy}"
        result[f"{key}/losses"] = np.array([float(be.train_step(b)) for b in batches(strategy)])
        result.update({f"{key}/w/{k}": v for k, v in be.get_weights().items()})
        result[f"{key}/eval"] = np.array(evaluate(be, held_out())[0])
    np.savez(path, **result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
