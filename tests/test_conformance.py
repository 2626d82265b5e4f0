"""Backend conformance: every registered adapter against the NumPy oracle, in float32 tolerance.

Parametrized over ``conf/backend/*.yaml``, every kernel with role ``exact`` or ``peer_reset`` (another
library's reset-aware layer, skipped when its package is not installed) each declares (except
those ``slow_to_build``) and every cell the kernel runs (its ``cells``): adding a backend, a kernel
or a cell adds it here. Every batch has
mid-window resets and starts from a carried (non-zero) state.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backends import reference as ref
from backends.base import Batch, OptimizerSpec, canonical_shapes
from resetbench.corpus import Corpus
from resetbench.layouts import Packed
from backends.cells import cell_names
from benchmarks import registry
from tests.helpers import (TINY, assert_close, backend_variants, make_variant, mid_reset_batches,
                           oracle, random_batch, random_state, tiny_weights, variant_spec)

BACKENDS = backend_variants()
SGD = OptimizerSpec("sgd", lr=0.5)
B, T = 4, 9


@pytest.fixture(params=BACKENDS)
def name(request):
    return request.param


def _pair(name, optimizer=SGD, batch_size=B, seed=0, **kw):
    spec = variant_spec(name)
    w = tiny_weights(seed, spec)
    return make_variant(name, spec, w, optimizer, batch_size, **kw), oracle(spec, w, optimizer, batch_size)


def _state(seed, name, rows=B, scale=0.5):
    """A random carried state for the variant's cell (one array per state component)."""
    return random_state(seed, variant_spec(name), rows, scale)


def test_weights_roundtrip(name):
    be, _ = _pair(name)
    w = tiny_weights(0, variant_spec(name))
    got = be.get_weights()
    assert set(got) == set(canonical_shapes(variant_spec(name)))
    for k in w:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_forward_logits_and_carried_state(name):
    be, orc = _pair(name)
    state = _state(1, name)
    for i, batch in enumerate(mid_reset_batches(2)):
        if i == 0:
            be.set_state(*state)
            orc.set_state(*state)
        assert_close(be.forward(batch), orc.forward(batch), f"logits window {i}")
        for got, exp, what in zip(be.get_state(), orc.get_state(), variant_spec(name).state_names):
            assert_close(got, exp, f"state {what} after window {i}")


def test_loss_and_every_gradient(name):
    be, orc = _pair(name)
    state = _state(3, name)
    be.set_state(*state)
    orc.set_state(*state)
    for i, batch in enumerate(mid_reset_batches(4)):
        loss, grads = be.gradients(batch)
        loss_ref, grads_ref = orc.gradients(batch)
        assert_close(loss, loss_ref, f"loss window {i}")
        assert set(grads) == set(grads_ref)
        for k in grads_ref:
            assert_close(grads[k], grads_ref[k], f"grad {k} window {i}")
    assert any(np.abs(g).max() > 1e-4 for g in grads_ref.values())


@pytest.mark.parametrize("optimizer", [OptimizerSpec("sgd", lr=0.5),
                                       OptimizerSpec("adam", lr=0.01, clip_norm=0.5)],
                         ids=["sgd", "adam_clip"])
def test_weights_after_three_steps(name, optimizer):
    be, orc = _pair(name, optimizer)
    state = _state(5, name)
    be.set_state(*state)
    orc.set_state(*state)
    w0 = tiny_weights(0, variant_spec(name))
    for i, batch in enumerate(mid_reset_batches(6)):
        assert_close(float(be.train_step(batch)), orc.train_step(batch), f"loss step {i}")
    got, exp = be.get_weights(), orc.get_weights()
    moved = max(float(np.abs(exp[k] - w0[k]).max()) for k in exp)
    assert moved > 1e-3, "the optimizer did not move the weights: the test would be vacuous"
    for k in exp:
        assert_close(got[k], exp[k], f"weights {k} after 3 {optimizer.name} steps", rtol=5e-4, atol_scale=5e-5)


def test_eval_step_is_masked_sum(name):
    be, orc = _pair(name)
    state = _state(7, name)
    be.set_state(*state)
    orc.set_state(*state)
    batch = mid_reset_batches(8)[2]  # has padding in row 0
    assert_close(be.eval_step(batch), orc.eval_step(batch), "eval sum of ce * mask")


def test_two_windows_equal_one(name):
    """State carried across a window boundary equals running the concatenated window."""
    be, _ = _pair(name)
    rng = np.random.default_rng(9)
    long = random_batch(rng, B, 2 * T, resets=[(0, 4), (1, T), (2, T + 3)])
    state = _state(10, name)
    be.set_state(*state)
    whole = be.forward(long)
    be.set_state(*state)
    halves = [be.forward(Batch(long.x[:, s], long.y[:, s], long.mask[:, s], long.reset[:, s]))
              for s in (slice(0, T), slice(T, 2 * T))]
    assert_close(np.concatenate(halves, axis=1), whole, "two windows vs one")


def test_packed_outputs_equal_each_sequence_alone(name):
    """Packed streams over several windows give every sequence the logits it gets alone."""
    rng = np.random.default_rng(11)
    seqs = [bytes(rng.integers(97, 123, size=n, dtype=np.uint8)) for n in (3, 11, 6, 14, 1, 8, 5)]
    corpus = Corpus.from_sequences(seqs)
    layout = Packed(batch_size=2, window=5)
    grid = layout.layout(corpus, np.arange(len(seqs)))
    assert grid["reset"][:, 1:].any(), "need a reset that is not at column 0"
    be, _ = _pair(name, batch_size=2)
    be.reset_state(2)
    be.set_state(*_state(12, name, 2, scale=2.0))   # garbage carried state: resets must erase it
    W = grid["x"].shape[1]
    packed = np.concatenate([be.forward(Batch(grid["x"][:, s:s + 5], grid["y"][:, s:s + 5],
                                              grid["mask"][:, s:s + 5], grid["reset"][:, s:s + 5]))
                             for s in range(0, W, 5)], axis=1)
    checked = 0
    for row in range(2):
        starts = list(np.flatnonzero(grid["reset"][row])) + [int(grid["mask"][row].sum())]
        for a, b in zip(starts[:-1], starts[1:]):
            alone = Batch(grid["x"][row:row + 1, a:b], grid["y"][row:row + 1, a:b],
                          grid["mask"][row:row + 1, a:b], grid["reset"][row:row + 1, a:b])
            be.reset_state(1)
            assert_close(packed[row, a:b], be.forward(alone)[0], f"sequence at row {row} col {a}")
            checked += 1
    assert checked == len(seqs)


def test_no_gradient_crosses_a_reset(name):
    """With the loss counted only after row 0's reset, inputs before it get exactly zero gradient
    and the carried state does not change the loss."""
    r = 4
    x = np.full((B, T), 20, np.int32)
    x[0, :r] = [1, 2, 3, 4]            # ids used only before the reset
    x[0, r:] = 10
    y = np.full((B, T), 11, np.int32)
    mask = np.zeros((B, T), np.float32)
    mask[0, r:] = 1.0
    reset = np.zeros((B, T), bool)
    reset[0, r] = True
    batch = Batch(x, y, mask, reset).check()
    be, _ = _pair(name)
    losses = []
    for seed in (13, 14):
        be.set_state(*_state(seed, name, scale=3.0))
        loss, grads = be.gradients(batch)
        losses.append(loss)
        assert np.all(grads["embedding"][1:5] == 0), "gradient leaked across the reset"
        assert np.abs(grads["embedding"][10]).max() > 0
    assert_close(losses[0], losses[1], "loss independent of the state before the reset")
    # control: without the reset, the same inputs do get a gradient (the test can fail)
    be.set_state(*_state(13, name, scale=3.0))
    _, grads = be.gradients(Batch(x, y, mask, np.zeros_like(reset)))
    assert np.abs(grads["embedding"][1:5]).max() > 0


def test_set_state_changes_row_count(name):
    be, _ = _pair(name)
    be.reset_state(3)
    state = be.get_state()
    assert len(state) == len(variant_spec(name).state_names)
    assert all(s.shape == (TINY.layers, 3, TINY.hidden) and not s.any() for s in state)


@pytest.mark.parametrize("cell", cell_names())
def test_oracle_float32_matches_float64(cell):
    """The float32 oracle (``backend=numpy``) agrees with its float64 self."""
    spec = dataclasses.replace(TINY, cell=cell)
    w = tiny_weights(0, spec)
    a = ref.NumpyBackend(spec, w, SGD, B)
    b = oracle(spec, w, SGD, B)
    state = random_state(15, spec, B)
    a.set_state(*state)
    b.set_state(*state)
    for i, batch in enumerate(mid_reset_batches(16)):
        la, ga = a.gradients(batch)
        lb, gb = b.gradients(batch)
        assert_close(la, lb, "loss")
        for k in gb:
            assert_close(ga[k], gb[k], f"grad {k}")


def test_a_reset_clears_a_nan_state(name):
    """The reset selects the zero state, it does not multiply by 0: a NaN carried state is gone
    after the row's reset, mid-window (row 0, column 6) and at column 0 (row 1); rows without a
    NaN stay finite everywhere. Row 0 before its reset shows the NaN, so the check can fail."""
    be, orc = _pair(name)
    state = _state(17, name)
    for component in state:
        component[:, :2] = np.nan                   # rows 0 and 1 carry NaN in every layer
    batch = random_batch(np.random.default_rng(18), B, T, resets=[(0, 6), (1, 0), (2, 4)])
    for target in (be, orc):
        target.set_state(*state)
    logits, expected = be.forward(batch), orc.forward(batch)
    assert not np.isfinite(logits[0, :6]).all(), "row 0 must be poisoned before its reset"
    assert np.isfinite(logits[0, 6:]).all(), "a NaN state crossed a mid-window reset"
    assert np.isfinite(logits[1:]).all(), "a NaN state crossed a reset at column 0"
    assert_close(logits[0, 6:], expected[0, 6:], "row 0 after its reset")
    assert_close(logits[1:], expected[1:], "rows 1-3")
    assert all(np.isfinite(s).all() for s in be.get_state())


# each backend's default kernel, every cell: layer_timer is one code path per adapter, built on the
# same layer stack the other tests check for every kernel (and each variant would compile once more)
DEFAULT_VARIANTS = [v for v in BACKENDS
                    if v.split(":")[1] == registry.default_kernel(registry.backend_configs()[v.split(":")[0]])]


@pytest.mark.parametrize("name", DEFAULT_VARIANTS)
def test_layer_timer_runs_the_layers_without_side_effects(name):
    """The kernel benchmark's layer-only call (Backend.layer_timer, optional): an adapter that
    overrides it returns a call giving a finite scalar, the same on a second call, weights and
    carried state untouched; the value depends on the carried state (the layers really run from
    it). One that does not gets the base's None (the benchmark then writes no layer rows)."""
    from backends.base import Backend
    be, _ = _pair(name)
    batch = mid_reset_batches(19)[0]
    be.set_state(*_state(20, name))
    weights, state = be.get_weights(), be.get_state()
    run = be.layer_timer(batch)
    if type(be).layer_timer is Backend.layer_timer:
        assert run is None
        return
    assert run is not None, f"{name}: its layer_timer returned None"
    first = float(run())
    be.synchronize()
    assert np.isfinite(first) and float(run()) == pytest.approx(first, rel=1e-6)
    for k, v in be.get_weights().items():
        np.testing.assert_array_equal(v, weights[k], err_msg=k)
    for a, b in zip(be.get_state(), state):
        np.testing.assert_array_equal(a, b)
    be.set_state(*_state(21, name, scale=3.0))
    assert float(be.layer_timer(batch)()) != pytest.approx(first, rel=1e-6)
