"""The JAX backend's baseline kernels (``backend.kernel=native`` and ``peer``, flax ``nn.RNN``)
against the NumPy oracle on the layouts they accept, their refusals of every other layout, and
their option handling. The exact ``scan`` kernel is covered by test_conformance.py and
test_jax.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backends.base import Batch, ConfigError, ModelSpec, OptimizerSpec
from benchmarks import registry
from tests.helpers import (REQUIRE_ALL, assert_close, make_backend, oracle, random_batch, random_state,
                           tiny_weights)

if not REQUIRE_ALL:
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    pytest.importorskip("flax")

from tests.test_jax import count_compilations  # noqa: E402

SPEC = ModelSpec(embed=6, hidden=8, layers=2)
ADAM = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)
B, T = 4, 7


def _pair(kernel, optimizer=ADAM, seed=0):
    """The JAX backend with ``kernel`` and the oracle, from the same weights."""
    w = tiny_weights(seed, SPEC)
    return make_backend("jax", SPEC, w, optimizer, B, kernel=kernel), oracle(SPEC, w, optimizer, B)


def _assert_state(be, orc, what):
    for got, exp, part in zip(be.get_state(), orc.get_state(), "hc"):
        assert_close(got, exp, f"{what}: state {part}")


def _assert_grads(be, orc, batch, what):
    loss, grads = be.gradients(batch)
    loss_ref, grads_ref = orc.gradients(batch)
    assert set(grads) == set(grads_ref)
    assert_close(loss, loss_ref, f"{what}: loss")
    for k in grads_ref:
        assert grads[k].shape == grads_ref[k].shape, k
        assert_close(grads[k], grads_ref[k], f"{what}: grad {k}")


def _assert_weights(be, orc, what):
    got, exp = be.get_weights(), orc.get_weights()
    assert set(got) == set(exp)
    for k in exp:
        assert_close(got[k], exp[k], f"{what}: weights {k}", rtol=5e-4, atol_scale=5e-5)


# --------------------------------------------------------------------------- native
def native_windows(seed: int, n: int = 3):
    """Consecutive windows without mid-window resets: state carried into every row of the first,
    a column-0 reset in rows 1 and 3 of the second, padding (mask 0) in the third."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        batch = random_batch(rng, B, T, resets=[(1, 0), (3, 0)] if k == 1 else (),
                             pad_tail=3 if k == 2 else 0)
        if k == 2:
            batch.mask[2, 1] = 0.0                         # a masked position inside a row too
        out.append(batch)
    return out


def _native_pair(seed=0, optimizer=ADAM):
    be, orc = _pair("native", optimizer, seed)
    h0, c0 = random_state(31, SPEC, B)                     # non-zero carried state
    be.set_state(h0, c0)
    orc.set_state(h0, c0)
    return be, orc


def test_native_forward_state_loss_and_gradients_match_oracle():
    be, orc = _native_pair()
    assert be.kernel == "jax.native.flax_OptimizedLSTMCell"
    first, second, third = native_windows(32)
    assert_close(be.forward(first), orc.forward(first), "logits window 0")
    _assert_state(be, orc, "after window 0")
    for i, batch in ((1, second), (2, third)):
        _assert_grads(be, orc, batch, f"window {i}")
        _assert_state(be, orc, f"after window {i}")


def test_native_adam_steps_match_oracle():
    be, orc = _native_pair()
    for i, batch in enumerate(native_windows(33)):
        assert_close(float(be.train_step(batch)), orc.train_step(batch), f"loss step {i}")
        _assert_state(be, orc, f"after step {i}")
    _assert_weights(be, orc, "after 3 Adam steps")


def test_native_refuses_a_mid_window_reset_before_touching_anything():
    be, _ = _native_pair()
    batch = random_batch(np.random.default_rng(34), B, T, resets=[(0, 0), (2, 4)])
    before = (be.get_weights(), be.get_state())
    for call in (be.train_step, be.gradients, be.forward):
        with pytest.raises(ValueError, match=r"mid-window \(row 2, column 4\)"):
            call(batch)
    weights, state = before
    for k, v in be.get_weights().items():
        np.testing.assert_array_equal(v, weights[k])
    for got, exp in zip(be.get_state(), state):
        np.testing.assert_array_equal(got, exp)


def test_baseline_eval_runs_the_exact_kernel():
    """Eval batches are packed streams with mid-window resets: every kernel evaluates them with
    the exact scan, so the eval loss is the oracle's whatever kernel trained."""
    rng = np.random.default_rng(35)
    batch = random_batch(rng, B, T, resets=[(0, 0), (1, 0), (2, 0), (3, 0), (0, 3), (2, 5)], pad_tail=2)
    for kernel in ("native", "peer"):
        be, orc = _pair(kernel)
        assert_close(be.eval_step(batch), orc.eval_step(batch), f"{kernel}: eval total")
        _assert_state(be, orc, f"{kernel}: after eval")


# --------------------------------------------------------------------------- peer
def padded_batch(rng: np.random.Generator, lengths, T_: int = T) -> Batch:
    """The ``padded`` layout: every row resets at column 0, mask = a prefix of ``lengths[b]``."""
    batch = random_batch(rng, len(lengths), T_, resets=[(b, 0) for b in range(len(lengths))])
    batch.mask[:] = (np.arange(T_)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    return batch


PEER_LENGTHS = ([7, 3, 5, 1], [2, 7, 7, 4], [6, 1, 3, 7])


def test_peer_loss_gradients_and_state_match_oracle():
    be, orc = _pair("peer")
    assert be.kernel == "jax.peer.flax_rnn_seq_lengths"
    be.set_state(*random_state(36, SPEC, B))               # reset[:, 0] must discard it
    rng = np.random.default_rng(37)
    for i, lengths in enumerate(PEER_LENGTHS):
        batch = padded_batch(rng, lengths)
        _assert_grads(be, orc, batch, f"batch {i}")
        # the state left is each row's state after its last valid token
        h, c = be.get_state()
        for b, n in enumerate(lengths):
            row = Batch(batch.x[b:b + 1, :n], batch.y[b:b + 1, :n], batch.mask[b:b + 1, :n],
                        batch.reset[b:b + 1, :n])
            one = oracle(SPEC, tiny_weights(0, SPEC), ADAM, 1)
            one.forward(row)
            h_ref, c_ref = one.get_state()
            assert_close(h[:, b], h_ref[:, 0], f"batch {i} row {b}: state h")
            assert_close(c[:, b], c_ref[:, 0], f"batch {i} row {b}: state c")


def test_peer_adam_steps_match_oracle():
    be, orc = _pair("peer")
    rng = np.random.default_rng(38)
    for i, lengths in enumerate(PEER_LENGTHS):
        batch = padded_batch(rng, lengths)
        assert_close(float(be.train_step(batch)), orc.train_step(batch), f"loss step {i}")
    _assert_weights(be, orc, "after 3 Adam steps")


@pytest.mark.parametrize("layout", ["carried_row", "mid_reset", "mask_hole"])
def test_peer_refuses_non_padded_batches(layout):
    be, _ = _pair("peer")
    batch = padded_batch(np.random.default_rng(39), [7, 3, 5, 1])
    if layout == "carried_row":
        batch.reset[1, 0] = False
        match = r"row 1 carries state"
    elif layout == "mid_reset":
        batch.reset[2, 3] = True
        match = r"mid-window \(row 2, column 3\)"
    else:
        batch.mask[0, 2] = 0.0
        match = r"row 0's mask is not a prefix"
    for call in (be.train_step, be.gradients, be.forward):
        with pytest.raises(ValueError, match=match):
            call(batch)


# --------------------------------------------------------------------------- options
def test_kernel_config_and_names():
    cfg = registry.backend_configs()["jax"]
    assert cfg["kernel"] == "scan"
    assert {k: d.role for k, d in registry.kernel_decls(cfg).items()} == {"scan": "exact", "native": "native",
                                                                          "peer": "peer", "haiku": "peer_reset"}
    w = tiny_weights(0, SPEC)
    expected = [("scan", 1, "jax.scan"), ("native", 1, "jax.native.flax_OptimizedLSTMCell"),
                ("peer", 1, "jax.peer.flax_rnn_seq_lengths"),
                ("native", 4, "jax.native.flax_OptimizedLSTMCell.unroll4")]
    for kernel, unroll, name in expected:
        assert make_backend("jax", SPEC, w, ADAM, B, kernel=kernel, unroll=unroll).kernel == name
    assert "flax" in make_backend("jax", SPEC, w, ADAM, B, kernel="peer").versions()


@pytest.mark.parametrize("value", ["loop", "Native", "", None])
def test_bad_kernel_is_a_config_error(value):
    with pytest.raises(ConfigError) as err:
        make_backend("jax", SPEC, tiny_weights(0, SPEC), ADAM, B, kernel=value)
    assert err.value.key == "backend.kernel"
    assert "allowed for backend=jax: scan, native, peer" in str(err.value)


@pytest.mark.parametrize("kernel", ["native", "peer"])
def test_precompile_covers_the_baseline_kernels(kernel):
    be, _ = _pair(kernel)
    rng = np.random.default_rng(40)
    batches = [padded_batch(rng, [t, 2, t, 1], t) for t in (5, 9, 5)]
    eval_batch = random_batch(rng, B, 5, resets=[(0, 0), (1, 3)])
    be.precompile(train_shapes=[(B, 5), (B, 9)], eval_shapes=[(B, 5)])
    assert be.compile_count == 3
    with count_compilations() as compiles:
        losses = [float(be.train_step(b)) for b in batches]
        be.eval_step(eval_batch)
        be.synchronize()
    assert compiles == [], f"{len(compiles)} compilation(s) after precompile"
    assert all(np.isfinite(losses))


# --------------------------------------------------------------------------- scan, hoisted projection
@pytest.mark.parametrize("option,name", [("hoist", "jax.scan.hoisted"), ("autodiff", "jax.scan.autodiff")])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_scan_variants_match_oracle_with_mid_window_resets(option, name, cell):
    """``hoist=true`` (the whole window's input projection before the loop) and ``autodiff=true``
    (JAX's autodiff instead of the hand-written backward) are exact too, for every cell; the
    default (hand-written backward) runs the shared conformance suite."""
    spec = dataclasses.replace(SPEC, cell=cell)
    be = make_backend("jax", spec, tiny_weights(0, spec), ADAM, B, **{option: True})
    orc = oracle(spec, tiny_weights(0, spec), ADAM, B)
    assert be.kernel == name
    state = random_state(41, spec, B)
    be.set_state(*state)
    orc.set_state(*state)
    rng = np.random.default_rng(42)
    windows = [random_batch(rng, B, T, resets=[(0, 3), (2, 0), (1, 5)], pad_tail=2 * (k == 2))
               for k in range(3)]
    assert_close(be.forward(windows[0]), orc.forward(windows[0]), "logits")
    _assert_state(be, orc, "after window 0")
    _assert_grads(be, orc, windows[1], "window 1")
    assert_close(float(be.train_step(windows[2])), orc.train_step(windows[2]), "loss step")
    _assert_weights(be, orc, "after an Adam step")
    assert_close(be.eval_step(windows[0]), orc.eval_step(windows[0]), "eval total")


@pytest.mark.parametrize("key", ["hoist", "autodiff"])
@pytest.mark.parametrize("value", [1, "true", None])
def test_bad_boolean_option_is_a_config_error(key, value):
    with pytest.raises(ConfigError) as err:
        make_backend("jax", SPEC, tiny_weights(0, SPEC), ADAM, B, **{key: value})
    assert err.value.key == f"backend.{key}"
