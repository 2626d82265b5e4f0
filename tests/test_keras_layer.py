"""ResetLSTM and ResetGRU (resetbench/keras_layers.py) and the Keras adapter's own choices
(backends/keras_lstm.py).

The generic checks of ``backend=keras`` against the NumPy oracle live in test_conformance.py; here:
each layer alone against the oracle (every loop implementation), the hand-written backward against
TensorFlow's autodiff, statefulness per row, weights (canonical and Keras's layouts), equality with
``keras.layers.LSTM`` / ``GRU`` from their own weights, PyTorch-style Adam epsilon, the non-default
compile settings, and ``precompile``. Under KERAS_BACKEND=jax and torch (subprocesses: the Keras
backend is fixed at Keras's first import), the layers alone and their training are checked by
test_keras_backends.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
    pytest.skip("backend keras needs tensorflow and keras", allow_module_level=True)

from backends import keras_lstm  # noqa: E402  (sets KERAS_BACKEND=tensorflow before keras loads)
from backends.base import Batch, ConfigError, ModelSpec, OptimizerSpec, init_weights  # noqa: E402
from resetbench.keras_layers import LAYERS  # noqa: E402
from tests.helpers import (TINY, assert_close, layer_case, mid_reset_batches, oracle,  # noqa: E402
                           random_state, tiny_weights)

import keras  # noqa: E402

SPEC1 = ModelSpec(embed=8, hidden=16, layers=1)
B, T = 4, 9
CELLS = sorted(LAYERS)
KERAS_LAYERS = {"lstm": lambda H: keras.layers.LSTM(H, return_sequences=True, return_state=True),
                "gru": lambda H: keras.layers.GRU(H, return_sequences=True, return_state=True, reset_after=True)}


def _case(seed: int, cell: str = "lstm", B: int = B, T: int = T, **kw):
    """:func:`tests.helpers.layer_case` at this module's shape."""
    return layer_case(seed, cell, B, T, spec=SPEC1, **kw)


def _layer(lw, B=None, T=None, cell: str = "lstm", **kw):
    layer = LAYERS[cell](lw["w_h"].shape[0], **kw)
    layer.build((B, T, lw["w_x"].shape[0]))
    layer.set_canonical(**lw)
    return layer


def _np(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def _carried(layer):
    """A stateful layer's carried state, one array per state component."""
    return [_np(getattr(layer, f"state_{name}")) for name in layer.state_names]


# --------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("impl", ["auto", "tf_bptt", "tf_while", "scan", "unroll"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_oracle(cell, impl):
    inputs, reset, lw, state0, exp = _case(0, cell)
    layer = _layer(lw, cell=cell, return_state=True, implementation=impl)
    got = layer(inputs, reset, initial_state=state0)
    assert len(got) == len(exp) == 1 + len(layer.state_names)
    for g, e, what in zip(got, exp, ("sequence",) + layer.state_names):
        assert_close(_np(g), e, f"{cell} {impl}: {what}")
    # the list form layer([inputs, resets]) is the same call
    assert_close(_np(layer([inputs, reset], initial_state=state0)[0]), exp[0], f"{impl}: list call")


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("cell", CELLS)
def test_hand_written_backward_equals_autodiff(cell, jit):
    """tf_bptt's custom gradient against TensorFlow's autodiff of the scan loop: w.r.t. the
    inputs, the initial state and every weight, with upstream gradients on the sequence and on
    every final state component, across mid-window resets."""
    tf = keras_lstm.tf
    inputs, reset, lw, state0, _ = _case(6, cell)
    rng = np.random.default_rng(7)
    H = lw["w_h"].shape[0]
    shapes = [(B, T, H)] + [(B, H)] * len(state0)
    probes = [tf.constant(rng.standard_normal(s).astype(np.float32)) for s in shapes]

    def grads(impl, jit_compile):
        layer = _layer(lw, cell=cell, return_state=True, implementation=impl)

        @tf.function(jit_compile=jit_compile)
        def f(x, *s0):
            with tf.GradientTape() as tape:
                tape.watch([x, *s0])
                outs = layer(x, reset, initial_state=s0)
                loss = tf.add_n([tf.reduce_sum(o * p) for o, p in zip(outs, probes)])
            return [loss] + tape.gradient(loss, [x, *s0] + [v.value for v in layer.trainable_weights])
        return [g.numpy() for g in f(tf.constant(inputs), *(tf.constant(s) for s in state0))]

    exp = grads("scan", False)
    got = grads("tf_bptt", jit)
    names = ("loss", "d inputs") + tuple(f"d {n}0" for n in LAYERS[cell].state_names) + (
        "d kernel", "d recurrent", "d bias")
    assert len(got) == len(exp) == len(names)
    for g, e, what in zip(got, exp, names):
        assert_close(g, e, f"{cell} tf_bptt vs autodiff: {what}")


@pytest.mark.parametrize("cell", CELLS)
def test_stateful_two_calls_equal_one_call(cell):
    inputs, reset, lw, _, _ = _case(1, cell, T=2 * T, resets=((0, 4), (1, T), (2, T + 3), (3, 2 * T - 1)))
    whole = _layer(lw, B=B, cell=cell, stateful=True)
    full = _np(whole(inputs, reset))
    halves = _layer(lw, B=B, cell=cell, stateful=True)
    parts = [_np(halves(inputs[:, s], reset[:, s])) for s in (slice(0, T), slice(T, 2 * T))]
    assert_close(np.concatenate(parts, axis=1), full, "two stateful calls vs one")
    for got, exp, name in zip(_carried(halves), _carried(whole), halves.state_names):
        assert np.abs(exp).max() > 0.01
        assert_close(got, exp, f"carried {name}")
    halves.reset_state()
    assert not any(s.any() for s in _carried(halves))


@pytest.mark.parametrize("cell", CELLS)
def test_stateful_row_reset_at_first_position_ignores_only_that_row(cell):
    inputs, reset, lw, _, _ = _case(2, cell, T=2 * T, resets=())
    cont = _layer(lw, B=B, cell=cell, stateful=True)
    full = _np(cont(inputs, reset))                         # no resets: every row continues
    layer = _layer(lw, B=B, cell=cell, stateful=True)
    layer(inputs[:, :T], reset[:, :T])
    second = reset[:, T:].copy()
    second[1, 0] = True                                     # only row 1 starts over
    out = _np(layer(inputs[:, T:], second))
    fresh = _np(_layer(lw, cell=cell)(inputs[1:2, T:]))     # row 1's window from a zero state
    assert_close(out[1], fresh[0], "reset row equals a fresh start")
    assert np.abs(out[1] - full[1, T:]).max() > 1e-3, "the reset row still saw its carried state"
    for row in (0, 2, 3):
        assert_close(out[row], full[row, T:], f"row {row} kept its state")


def _keras_layout(cell, lw):
    """The expected Keras arrays of canonical layer weights, written out gate block by gate block:
    the LSTM's are the same arrays; the GRU's kernels reorder r, z, n to z, r, n and its biases
    stack as [b_x; b_h]."""
    if cell == "lstm":
        return [lw["w_x"], lw["w_h"], lw["b"]]
    H = lw["w_h"].shape[0]

    def zrn(a):
        r, z, n = a[..., :H], a[..., H:2 * H], a[..., 2 * H:]
        return np.concatenate([z, r, n], axis=-1)
    return [zrn(lw["w_x"]), zrn(lw["w_h"]), np.stack([zrn(lw["b_x"]), zrn(lw["b_h"])])]


@pytest.mark.parametrize("cell", CELLS)
def test_canonical_weights_roundtrip(cell):
    _, _, lw, _, _ = _case(3, cell)
    layer = _layer(lw, B=B, cell=cell, stateful=True)
    got = layer.canonical()
    assert sorted(got) == sorted(lw)
    for k in lw:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], lw[k], err_msg=k)
    keras_arrays = layer.get_weights()[:3]                  # Keras order: kernel, recurrent, bias
    for a, e, name in zip(keras_arrays, _keras_layout(cell, lw), ("kernel", "recurrent_kernel", "bias")):
        np.testing.assert_array_equal(a, e, err_msg=name)
    other = _layer({k: np.zeros_like(v) for k, v in lw.items()}, B=B, cell=cell, stateful=True)
    other.set_weights(keras_arrays)                         # 3 arrays also on a stateful layer
    for k in lw:
        np.testing.assert_array_equal(other.canonical()[k], lw[k], err_msg=k)
    with pytest.raises(ValueError, match="w_h"):
        layer.set_canonical(**{**lw, "w_h": lw["w_h"][:, :6]})


@pytest.mark.parametrize("cell", CELLS)
def test_no_resets_equals_keras_layer_from_its_own_weights(cell):
    """``set_weights(keras_layer.get_weights())`` as they are: keras.layers.LSTM / GRU
    (reset_after=True) initialized by Keras (the biases made non-zero, so that a mix-up of bias
    rows or gate blocks shows), equal outputs and final state without resets."""
    inputs, _, lw, state0, _ = _case(4, cell, resets=())
    H, F = lw["w_h"].shape[0], inputs.shape[-1]
    theirs = KERAS_LAYERS[cell](H)
    theirs.build((None, T, F))
    bias = theirs.cell.bias
    bias.assign(np.random.default_rng(5).normal(0.0, 0.5, bias.shape).astype(np.float32))
    layer = LAYERS[cell](H, return_state=True)
    layer.build((None, T, F))
    layer.set_weights(theirs.get_weights())
    exp = [_np(t) for t in theirs(inputs, initial_state=list(state0))]
    calls = [(None, state0), (np.zeros((B, T), bool), state0)]
    if cell == "gru":
        calls.append((None, state0[0]))                     # a bare tensor, as keras.layers.GRU takes
    for resets, initial in calls:
        got = [_np(t) for t in layer(inputs, resets, initial_state=initial)]
        assert len(got) == len(exp)
        for g, e, what in zip(got, exp, ("sequence",) + layer.state_names):
            assert_close(g, e, f"vs keras.layers.{type(theirs).__name__}: {what}")
    # and from a zero state
    assert_close(_np(layer(inputs)[0]), _np(theirs(inputs)[0]), "from zero")


# --------------------------------------------------------------------------- other Keras backends
# The layer under KERAS_BACKEND=jax and torch (every loop against the oracle, a stateful layer's two
# calls against one, backend=keras refusing them) is checked by tests/test_keras_backends.py, in
# the same process as its training checks on that backend.


# --------------------------------------------------------------------------- the adapter
def _backend(optimizer, spec=TINY, batch_size=B, seed=0, **kw):
    w = tiny_weights(seed, spec)
    return (keras_lstm.KerasBackend(spec, w, optimizer, batch_size, device="cpu", **kw),
            oracle(spec, w, optimizer, batch_size))


def _three_steps(be, orc, seed):
    state = random_state(seed, be.spec, B)
    be.set_state(*state)
    orc.set_state(*state)
    for i, batch in enumerate(mid_reset_batches(seed + 1)):
        assert_close(float(be.train_step(batch)), orc.train_step(batch), f"loss step {i}")
    got, exp = be.get_weights(), orc.get_weights()
    for k in exp:
        assert_close(got[k], exp[k], f"weights {k}", rtol=5e-4, atol_scale=5e-5)


def test_adam_epsilon_is_pytorchs():
    """eps added to sqrt(v_hat) (PyTorch), not to sqrt(v) before bias correction (Keras's Adam).
    A large eps makes the two differ; the adapter matches the oracle, keras.optimizers.Adam not."""
    opt = OptimizerSpec("adam", lr=0.01, eps=1e-3)
    be, orc = _backend(opt, jit_compile=False)   # the same update code runs under XLA (conformance)
    _three_steps(be, orc, 20)
    # control: keras.optimizers.Adam with the same settings on the same gradients does not match
    w0 = tiny_weights(0)
    h0, c0 = random_state(20, TINY, B)
    orc2 = oracle(TINY, w0, opt, B)
    orc2.set_state(h0, c0)
    var = keras.Variable(w0["lstm.0.w_h"])
    kadam = keras.optimizers.Adam(learning_rate=opt.lr, beta_1=opt.beta1, beta_2=opt.beta2, epsilon=opt.eps)
    for batch in mid_reset_batches(21):
        _, grads = orc2.gradients(batch)
        kadam.apply_gradients([(keras.ops.convert_to_tensor(grads["lstm.0.w_h"].astype(np.float32)), var)])
        orc2.opt.step(orc2.w, grads)
    diff = np.abs(_np(var) - orc2.w["lstm.0.w_h"]).max()
    assert diff > 1e-4, f"keras Adam matched PyTorch's eps placement ({diff:.2g}): the test above is vacuous"


@pytest.mark.parametrize("jit, loop, kernel", [(False, "auto", "keras.tf_function"),
                                               (True, "tf_while", "keras.xla.tf_while"),
                                               (False, "scan", "keras.tf_function.scan")])
@pytest.mark.parametrize("cell", CELLS)
def test_non_default_compile_settings_match_oracle(cell, jit, loop, kernel):
    spec = dataclasses.replace(TINY, cell=cell)
    be, orc = _backend(OptimizerSpec("adam", lr=0.01, clip_norm=0.5), spec, jit_compile=jit, loop=loop)
    assert be.kernel == kernel
    _three_steps(be, orc, 22)


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_precompile_changes_nothing_and_nothing_retraces(jit):
    """precompile runs dummy steps and restores weights, Adam's moments and step count, and the
    carried state; one trace serves every (B, T). (The XLA case uses one shape: XLA compiles once
    per shape, about 2 s each on a CPU.)"""
    opt = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)
    be, orc = _backend(opt, jit_compile=jit)
    h0, c0 = random_state(24, TINY, B)
    be.set_state(h0, c0)
    orc.set_state(h0, c0)
    w_before = be.get_weights()
    train_shapes = [(B, T)] if jit else [(B, T), (B, 2 * T), (3, T)]
    be.precompile(train_shapes, [(B, T)])
    for k, v in be.get_weights().items():
        np.testing.assert_array_equal(v, w_before[k], err_msg=k)
    for got, exp in zip(be.get_state(), (h0, c0)):
        np.testing.assert_array_equal(got, exp)
    assert be._train_fn.experimental_get_tracing_count() == 1
    # Adam's moments and step count were restored: the steps still match the oracle's first ones
    for i, batch in enumerate(mid_reset_batches(25)[:2]):
        assert_close(float(be.train_step(batch)), orc.train_step(batch), f"loss step {i}")
    for k, v in orc.get_weights().items():
        assert_close(be.get_weights()[k], v, f"weights {k}", rtol=5e-4, atol_scale=5e-5)
    if not jit:
        rng = np.random.default_rng(26)
        for b, t in train_shapes[1:]:                       # other window lengths and row counts
            be.reset_state(b)
            x = rng.integers(0, 257, (b, t)).astype(np.int32)
            be.train_step(Batch(x, x, np.ones((b, t), np.float32), np.zeros((b, t), bool)))
        assert be._train_fn.experimental_get_tracing_count() == 1, "train step retraced"


def test_adapter_options_and_device():
    w = init_weights(TINY, 0)
    sgd = OptimizerSpec("sgd", lr=0.1)
    with pytest.raises(ConfigError, match="jit_compile"):
        keras_lstm.KerasBackend(TINY, w, sgd, B, device="cpu", jit_compile="maybe")
    with pytest.raises(ConfigError, match="loop=scan"):
        keras_lstm.KerasBackend(TINY, w, sgd, B, device="cpu", jit_compile=True, loop="scan")
    with pytest.raises(ConfigError, match="backend.loop"):
        keras_lstm.KerasBackend(TINY, w, sgd, B, device="cpu", loop="fast")
    with pytest.raises(ConfigError, match="backend.colour"):
        keras_lstm.KerasBackend(TINY, w, sgd, B, device="cpu", colour="red")
    if not keras_lstm.tf.config.list_physical_devices("GPU"):
        with pytest.raises(ConfigError, match="TensorFlow sees no GPU"):
            keras_lstm.KerasBackend(TINY, w, sgd, B, device="cuda")
    be = keras_lstm.KerasBackend(TINY, w, sgd, B, device="auto")
    assert be.device in ("cpu", "cuda")
    assert set(be.versions()) == {"tensorflow", "keras", "numpy"}
    assert be.peak_memory_bytes() is None if be.device == "cpu" else be.peak_memory_bytes() >= 0
