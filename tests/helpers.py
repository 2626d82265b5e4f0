"""Shared test helpers: tiny models, batches with mid-window resets, the oracle, tolerances."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Tuple

import numpy as np
import pytest

from backends import reference as ref
from backends.base import Batch, ModelSpec, OptimizerSpec, init_weights
from benchmarks import registry

TINY = ModelSpec(embed=8, hidden=16, layers=2)
REQUIRE_ALL = os.environ.get("RESETBENCH_REQUIRE_ALL") == "1"


def backend_names(include_oracle: bool = False):
    """Registered backends; the oracle (``oracle: true``: what the others are tested against) only
    with ``include_oracle``."""
    configs = registry.backend_configs()
    return [n for n in sorted(configs) if include_oracle or not registry.is_oracle(configs[n])]


# the roles whose kernels obey the reset rule everywhere: checked against the oracle on every layout
RESET_AWARE = ("exact", "peer_reset")


def backend_variants():
    """``"backend:kernel:cell"`` for every reset-aware kernel (role ``exact``, or ``peer_reset``:
    another library's) each registered backend declares and every cell it runs, except kernels
    ``slow_to_build`` (minutes of compilation per window shape: their own test files run the
    oracle parity on one shape, e.g. tests/test_torch_kernels.py)."""
    out = []
    for name in backend_names():
        decls = registry.kernel_decls(registry.backend_configs()[name])
        out += [f"{name}:{k}:{cell}" for k, d in decls.items() if d.role in RESET_AWARE and not d.slow_to_build
                for cell in d.cells]
    return out


def variant_spec(variant: str, spec: ModelSpec = None) -> ModelSpec:
    """``spec`` (default :data:`TINY`) with the cell of a ``"backend:kernel:cell"`` variant."""
    parts = variant.split(":")
    spec = spec or TINY
    return dataclasses.replace(spec, cell=parts[2]) if len(parts) > 2 else spec


def make_variant(variant: str, spec: ModelSpec, weights, optimizer: OptimizerSpec, batch_size: int, **kw):
    """:func:`make_backend` for a ``"backend:kernel[:cell]"`` string from :func:`backend_variants`
    (the cell is ``spec``'s: see :func:`variant_spec`)."""
    name, kernel = variant.split(":")[:2]
    return make_backend(name, spec, weights, optimizer, batch_size, kernel=kernel, **kw)


def make_backend(name: str, spec: ModelSpec, weights, optimizer: OptimizerSpec, batch_size: int, **kw):
    """Build a registered backend on the CPU. A missing framework, or a missing package of the
    kernel (``requires`` in its declaration), skips the test, except under
    RESETBENCH_REQUIRE_ALL=1 (CI), where it fails."""
    cfg = registry.backend_configs()[name]
    missing = registry.missing_requirements(cfg)
    if missing:
        if REQUIRE_ALL:
            pytest.fail(f"backend {name} needs {missing} (RESETBENCH_REQUIRE_ALL=1)")
        pytest.skip(f"backend {name} needs {missing}")
    kernel = kw.get("kernel")
    if isinstance(kernel, str) and registry.kernel_missing(cfg, kernel):
        reason = f"{name} kernel {kernel} {registry.kernel_missing_reason(cfg, kernel)}"
        if REQUIRE_ALL:
            pytest.fail(f"{reason} (RESETBENCH_REQUIRE_ALL=1)")
        pytest.skip(reason)
    return registry.build_backend(cfg, spec, weights, optimizer, batch_size, device="cpu", **kw)


def random_batch(rng: np.random.Generator, B: int, T: int, resets=(), pad_tail: int = 0,
                 vocab: int = 257) -> Batch:
    """Random ids; ``resets`` is a list of (row, t) positions; the last ``pad_tail`` columns of
    row 0 are padding (mask 0)."""
    x = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    y = rng.integers(0, vocab, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    if pad_tail:
        mask[0, T - pad_tail:] = 0.0
    reset = np.zeros((B, T), bool)
    for b, t in resets:
        reset[b, t] = True
    return Batch(x, y, mask, reset).check()


def mid_reset_batches(seed: int, B: int = 4, T: int = 9, n: int = 3):
    """``n`` consecutive windows, each with mid-window resets in some rows and a row reset at
    column 0 in the second window; no row resets everywhere, so state is carried."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        resets = [(0, 3 + k), (2, T - 2), (1, 5)]
        if k == 1:
            resets.append((3, 0))
        resets = [(b, t) for b, t in resets if b < B and t < T]
        out.append(random_batch(rng, B, T, resets, pad_tail=2 if k == 2 else 0))
    return out


def random_state(seed: int, spec: ModelSpec, B: int, scale: float = 0.5) -> Tuple[np.ndarray, ...]:
    """A random carried state: one ``[L, B, H]`` array per state component of the spec's cell."""
    rng = np.random.default_rng(seed)
    shape = (spec.layers, B, spec.hidden)
    return tuple((rng.standard_normal(shape) * scale).astype(np.float32) for _ in spec.state_names)


def oracle(spec: ModelSpec, weights, optimizer: OptimizerSpec, B: int) -> ref.NumpyBackend:
    """The NumPy reference in float64 (so its own rounding does not eat the tolerance)."""
    return ref.NumpyBackend(spec, weights, optimizer, B, dtype="float64")


def assert_close(actual, expected, name: str, rtol: float = 1e-4, atol_scale: float = 2e-5):
    """float32 tolerance: |a - e| <= atol + rtol |e| with atol relative to the array's scale."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    atol = atol_scale * max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    worst = float(err.max(initial=-1.0))
    assert worst <= 0, (f"{name}: max abs diff {np.abs(actual - expected).max():.3g} "
                        f"exceeds tolerance (atol {atol:.2g}, rtol {rtol})")


def tiny_weights(seed: int = 0, spec: ModelSpec = TINY) -> Dict[str, np.ndarray]:
    """Canonical weights with non-trivial biases (so a gate-order slip cannot hide)."""
    w = init_weights(spec, seed)
    rng = np.random.default_rng(seed + 1)
    for k in w:
        if k.rsplit(".", 1)[-1].startswith("b"):          # every bias (lstm .b, gru .b_x .b_h, head.b)
            w[k] = (w[k] + rng.normal(0, 0.3, size=w[k].shape)).astype(np.float32)
    return w


def check_parity(backend: str, kernel: str, spec: ModelSpec, batches, state=None,
                 optimizer: OptimizerSpec = OptimizerSpec("sgd", lr=0.5), padded: bool = False, prepare=None):
    """One kernel of a backend against the oracle, from the same weights and carried state:
    logits (and state) on batches[0], loss and every gradient on batches[1], the loss of a train
    step per batch and the weights after them. ``state``: the carried state to start from (one
    ``[L, B, H]`` array per state component of ``spec.cell``), else zeros. ``padded``: logits compared where the mask counts,
    the state not (a peer kernel stops each row at its length). ``prepare(backend)`` runs first
    (e.g. precompile). Returns the backend and the oracle, for more checks."""
    B = batches[0].x.shape[0]
    w = tiny_weights(2, spec)
    be = make_backend(backend, spec, w, optimizer, B, kernel=kernel)
    orc = oracle(spec, w, optimizer, B)
    if prepare is not None:
        prepare(be)
    if state is not None:
        for target in (be, orc):
            target.set_state(*state)
    valid = batches[0].mask.astype(bool) if padded else np.ones(batches[0].x.shape, bool)
    assert_close(be.forward(batches[0])[valid], orc.forward(batches[0])[valid], "logits")
    if not padded:
        for got, exp, what in zip(be.get_state(), orc.get_state(), spec.state_names):
            assert_close(got, exp, f"state {what} after the window")
    loss, grads = be.gradients(batches[1])
    loss_ref, grads_ref = orc.gradients(batches[1])
    assert_close(loss, loss_ref, "loss")
    assert sorted(grads) == sorted(grads_ref)
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], f"grad {k}")
    for b in batches:
        assert_close(float(be.train_step(b)), orc.train_step(b), "train loss")
    got, exp = be.get_weights(), orc.get_weights()
    for k in exp:
        assert_close(got[k], exp[k], f"weights {k}", rtol=5e-4, atol_scale=5e-5)
    return be, orc


def layer_case(seed: int, cell: str = "lstm", B: int = 4, T: int = 9, resets=((0, 3), (2, 7), (1, 5), (3, 0)),
               spec: ModelSpec = ModelSpec(embed=8, hidden=16, layers=1)):
    """One layer alone: its inputs (embedded ids) [B, T, E], resets, canonical weights (keys without
    the ``<cell>.0.`` prefix), a carried state (a tuple, one [B, H] per state component), and the
    oracle's (float64) hidden sequence followed by its final state: ``(seq, h, c)`` for the LSTM,
    ``(seq, h)`` for the GRU."""
    spec = dataclasses.replace(spec, cell=cell)
    rng = np.random.default_rng(seed)
    w = {k: v.astype(np.float64) for k, v in tiny_weights(seed, spec).items()}
    x = rng.integers(0, 257, size=(B, T)).astype(np.int32)
    reset = np.zeros((B, T), bool)
    for b, t in resets:
        reset[b, t] = True
    state = random_state(seed + 1, spec, B)
    _, cache, final = ref.forward(w, Batch(x, x, np.ones((B, T), np.float32), reset),
                                  tuple(s.astype(np.float64) for s in state), spec)
    inputs = w["embedding"][x].astype(np.float32)
    prefix = f"{cell}.0."
    lw = {k[len(prefix):]: v.astype(np.float32) for k, v in w.items() if k.startswith(prefix)}
    return inputs, reset, lw, tuple(s[0] for s in state), (cache["top"],) + tuple(f[0] for f in final)
