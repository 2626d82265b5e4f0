"""JAX-specific checks (the generic ones are in test_conformance.py and test_cross_backend.py):
scan unrolling against the oracle, ahead-of-time compilation per shape, device-resident state,
buffer donation, option validation, and the optimizer's exact meaning."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from backends.base import ConfigError, OptimizerSpec
from benchmarks import registry
from tests.helpers import (REQUIRE_ALL, TINY, assert_close, make_backend, mid_reset_batches, oracle,
                           random_batch, random_state, tiny_weights)

if not REQUIRE_ALL:
    pytest.importorskip("jax")
    pytest.importorskip("optax")

import jax  # noqa: E402

from backends import jax_lstm  # noqa: E402

SGD = OptimizerSpec("sgd", lr=0.5)
B, T = 4, 9


def _backend(optimizer=SGD, batch_size=B, **kw):
    return make_backend("jax", TINY, tiny_weights(0), optimizer, batch_size, **kw)


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations in the block (any jit, not only the adapter's)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _leaves(tree):
    return [np.array(a) for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize("unroll", [2, 4, 16])
def test_unrolled_scan_matches_oracle(unroll):
    """Unroll factors that do and do not divide T (16 > T = 9) give the oracle's logits, state,
    loss and gradients."""
    be = _backend(unroll=unroll)
    assert be.kernel == f"jax.scan.unroll{unroll}"
    orc = oracle(TINY, tiny_weights(0), SGD, B)
    h0, c0 = random_state(21, TINY, B)
    be.set_state(h0, c0)
    orc.set_state(h0, c0)
    first, second, third = mid_reset_batches(22)
    assert_close(be.forward(first), orc.forward(first), "logits")
    for got, exp, what in zip(be.get_state(), orc.get_state(), "hc"):
        assert_close(got, exp, f"state {what}")
    for i, batch in enumerate((second, third)):
        loss, grads = be.gradients(batch)
        loss_ref, grads_ref = orc.gradients(batch)
        assert_close(loss, loss_ref, f"loss window {i}")
        for k in grads_ref:
            assert_close(grads[k], grads_ref[k], f"grad {k} window {i}")


def test_default_kernel_and_config():
    cfg = registry.backend_configs()["jax"]
    assert cfg["requires"] == ["jax", "optax"]
    be = _backend()
    assert be.kernel == ("jax.scan" if cfg.get("unroll", 1) == 1 else f"jax.scan.unroll{cfg['unroll']}")
    assert be.device == "cpu"
    assert set(be.versions()) == {"jax", "jaxlib", "optax", "numpy"}
    assert be.peak_memory_bytes() is None


def test_precompile_changes_nothing_and_covers_the_timed_loop():
    be = _backend(OptimizerSpec("adam", lr=0.01, clip_norm=0.5))
    be.set_state(*random_state(23, TINY, B))
    rng = np.random.default_rng(24)
    batches = [random_batch(rng, B, t, resets=[(1, 2)]) for t in (9, 16, 9, 16)]
    before = _leaves((be.params, be.opt_state, be.state))
    be.precompile(train_shapes=[(B, 9), (B, 16)], eval_shapes=[(B, 9)])
    assert be.compile_count == 3
    after = _leaves((be.params, be.opt_state, be.state))
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)

    twin = _backend(OptimizerSpec("adam", lr=0.01, clip_norm=0.5))   # never precompiled
    twin.set_state(*random_state(23, TINY, B))
    with count_compilations() as compiles:
        losses = [float(be.train_step(b)) for b in batches]
        total = be.eval_step(batches[0])
        be.synchronize()
    assert compiles == [], f"{len(compiles)} compilation(s) in the timed loop after precompile"
    assert be.compile_count == 3
    assert_close(losses, [float(twin.train_step(b)) for b in batches], "precompiled vs lazy losses")
    assert_close(total, twin.eval_step(batches[0]), "precompiled vs lazy eval")


def test_repeated_shape_compiles_once_and_new_row_count_works():
    be = _backend()
    rng = np.random.default_rng(25)
    be.train_step(random_batch(rng, B, T))
    n = be.compile_count
    with count_compilations() as compiles:
        for _ in range(3):
            be.train_step(random_batch(rng, B, T))
    assert compiles == [] and be.compile_count == n
    be.reset_state(3)                                    # set_state may change B
    loss = be.train_step(random_batch(rng, 3, T))
    assert np.isfinite(float(loss)) and be.compile_count == n + 1
    assert be.get_state()[0].shape == (TINY.layers, 3, TINY.hidden)
    with pytest.raises(ValueError, match="reset_state"):
        be.train_step(random_batch(rng, B, T))          # 4 rows against a 3-row state


def test_state_and_loss_stay_on_the_device_and_buffers_are_donated():
    be = _backend()
    old_w, old_h = be.params["head.w"], be.state[0]
    loss = be.train_step(mid_reset_batches(26)[0])
    assert isinstance(loss, jax.Array) and loss.shape == ()
    for arr in (*be.state, *be.params.values()):
        assert isinstance(arr, jax.Array) and arr.devices() == {be.dev}
    assert old_w.is_deleted() and old_h.is_deleted(), "train step did not donate its buffers"
    assert np.isfinite(float(loss))


def test_reset_state_gives_two_buffers():
    """``reset_state`` passes one zero array for h and c; they must not alias (both are donated)."""
    be = _backend()
    be.reset_state(B)
    assert be.state[0] is not be.state[1]
    be.train_step(mid_reset_batches(27)[0])           # would fail on donating one buffer twice
    assert be.get_state()[0].shape == (TINY.layers, B, TINY.hidden)


@pytest.mark.parametrize("optimizer", [OptimizerSpec("adam", lr=0.05, eps=0.1, clip_norm=0.05),
                                       OptimizerSpec("adam", lr=0.02, beta1=0.5, beta2=0.9),
                                       OptimizerSpec("sgd", lr=0.3, clip_norm=0.01)],
                         ids=["adam_big_eps_clip", "adam_betas", "sgd_clip"])
def test_optimizer_meaning_matches_oracle(optimizer):
    """A large eps tells ``eps`` outside the square root (PyTorch) from inside (eps_root); a small
    clip_norm makes clipping act on every step."""
    be = _backend(optimizer)
    orc = oracle(TINY, tiny_weights(0), optimizer, B)
    for i, batch in enumerate(mid_reset_batches(28)):
        assert_close(float(be.train_step(batch)), orc.train_step(batch), f"loss step {i}")
    got, exp = be.get_weights(), orc.get_weights()
    for k in exp:
        assert_close(got[k], exp[k], f"weights {k}", rtol=5e-4, atol_scale=5e-5)


def test_clip_formula():
    g = {"a": jax.numpy.array([3.0, 0.0]), "b": jax.numpy.array([4.0])}   # global norm 5
    clipped = jax_lstm.clip_by_global_norm(g, 2.0)
    np.testing.assert_allclose(np.array(clipped["a"]), [1.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(np.array(clipped["b"]), [1.6], rtol=1e-6)
    same = jax_lstm.clip_by_global_norm(g, 10.0)
    np.testing.assert_array_equal(np.array(same["b"]), [4.0])
    assert jax_lstm.clip_by_global_norm(g, None) is g


@pytest.mark.parametrize("value", [0, -2, True, 1.5, "4", None])
def test_bad_unroll_is_a_config_error(value):
    with pytest.raises(ConfigError) as err:
        _backend(unroll=value)
    assert err.value.key == "backend.unroll"


def test_unknown_option_and_bad_device_are_config_errors():
    with pytest.raises(ConfigError) as err:
        _backend(unrol=4)
    assert err.value.key == "backend.unrol"
    with pytest.raises(ConfigError) as err:
        jax_lstm.resolve_device("tpu")
    assert err.value.key == "device"
    with pytest.raises(ConfigError) as err:
        jax_lstm.JaxBackend(TINY, tiny_weights(0), OptimizerSpec("rmsprop"), B, device="cpu")
    assert err.value.key == "train.optimizer"


def test_cuda_without_a_gpu_is_a_config_error():
    if jax_lstm._gpus():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="JAX sees no GPU"):
        jax_lstm.JaxBackend(TINY, tiny_weights(0), SGD, B, device="cuda")
    assert jax_lstm.resolve_device("auto")[1] == "cpu"
