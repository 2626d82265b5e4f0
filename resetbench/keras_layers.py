"""``ResetLSTM``: a Keras 3 LSTM layer with per-sample state resets at any timestep.

What Keras users asked for since 2016 (keras-team/keras#2750, #11175): a stateful RNN where each
row of the batch can be reset on its own, also in the middle of a window. Keras 3 only resets all
rows at once (``reset_state()``), and a Keras mask means "skip this step", not "reset".

``ResetLSTM`` takes ``(inputs, resets)``: ``inputs`` [B, T, F] and ``resets`` [B, T] bool. Before
step ``t`` the state ``(h, c)`` of every row ``b`` with ``resets[b, t]`` is replaced by zeros
(resetbench's reset rule, docs/spec.md). The replacement is a select (``where``), so it also clears
a NaN or inf state and cuts the gradient: nothing after a reset depends on anything before it. The layer returns the hidden
states of every step, [B, T, H] (and the final ``h, c`` with ``return_state=True``).

With ``stateful=True`` the layer keeps ``(h, c)`` per row across calls (a fixed batch size is
needed, as for ``keras.layers.LSTM(stateful=True)``): each row resumes from its own last state
unless its ``resets`` says otherwise; ``reset_state()`` zeros every row. The carried state is a
pair of non-trainable variables, so it is updated under ``model.train_on_batch`` on every Keras
backend, and no gradient crosses a call boundary.

Weights: ``kernel`` [F, 4H], ``recurrent_kernel`` [H, 4H], ``bias`` [4H], gates in the order
i, f, g(=c), o: exactly the layout and gate order of ``keras.layers.LSTM`` (whose weights load with
``set_weights``) and resetbench's canonical weights (``w_x``, ``w_h``, ``b``;
:meth:`ResetLSTM.set_canonical` / :meth:`ResetLSTM.canonical`).

The input projection of the whole window is one matmul outside the time loop; the loop runs only
the recurrent matmul and the gate arithmetic. Loop implementations (``implementation``):

- ``"scan"``: ``keras.ops.scan`` (every backend; any T, also unknown at trace time).
- ``"unroll"``: a Python loop over ``keras.ops.unstack`` steps (every backend; needs a static T,
  else it falls back to ``auto``'s choice). Large graphs: slow to compile under XLA.
- ``"tf_while"``: TensorFlow only: ``tf.while_loop`` over ``TensorArray`` steps (any T), gradient
  by TensorFlow's autodiff. Unlike Keras 3.15's TensorFlow ``scan`` it sets
  ``maximum_iterations``, so it compiles under XLA with T unknown at trace time.
- ``"tf_bptt"``: TensorFlow only: the ``tf_while`` forward with a hand-written backward pass
  (``tf.custom_gradient``: one reverse loop, the recurrent-kernel gradient as one matmul).
  Measured on 2 CPU cores (B=32, E=64, H=256, train step): under XLA 37k/40k/35k tokens/s at
  T=64/256/512 vs 28k/24k/13k for ``tf_while`` (whose autodiff cost grows faster than T); in
  graph mode 25k vs 17k at T=64.
- ``"auto"`` (default): ``tf_bptt`` on the TensorFlow backend, ``scan`` elsewhere.

Written with ``keras.ops``; only the ``tf_*`` loops import TensorFlow. :func:`reset_lstm` is the
layer's computation as a function of its weights (for weights held by another layer).
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

import keras
from keras import ops

IMPLEMENTATIONS = ("auto", "scan", "unroll", "tf_while", "tf_bptt")


def lstm_cell(state, xp_t, w_h):
    """The LSTM cell (``conf/cell/lstm.yaml``): ``(h, c)`` and the step's projected input ``xp_t``
    [B, 4H] -> the new ``(h, c)`` and the gate activations ``(i, f, g, o)``."""
    h, c = state
    units = w_h.shape[0]
    z = xp_t + ops.matmul(h, w_h)
    i = ops.sigmoid(z[:, :units])
    f = ops.sigmoid(z[:, units:2 * units])
    g = ops.tanh(z[:, 2 * units:3 * units])
    o = ops.sigmoid(z[:, 3 * units:])
    c = f * c + i * g
    return (o * ops.tanh(c), c), (i, f, g, o)


def reset_state(state, keep_t):
    """The reset rule for one step: rows with ``keep_t == 0`` ([B, 1]) get the zero state in every
    component. A select (``where``), not a multiply: a NaN or inf state is cleared too."""
    return tuple(ops.where(keep_t > 0, s, ops.zeros_like(s)) for s in state)


def _step(cell, state, xp_t, keep_t, w_h):
    """The time loops' step for any cell: reset, then the cell."""
    return cell(reset_state(state, keep_t), xp_t, w_h)[0]


def _tf_while_loop(cell, xp, keep, state, w_h):
    """TensorFlow fast path: ``tf.while_loop`` with ``TensorArray`` inputs and outputs.
    ``xp`` [B, T, G*H], ``keep`` [B, T, 1]. Returns outputs [B, T, H] and the final state."""
    import tensorflow as tf

    xs = tf.transpose(xp, [1, 0, 2])
    ks = tf.transpose(keep, [1, 0, 2])
    n = tf.shape(xs)[0]
    xs_ta = tf.TensorArray(xs.dtype, size=n, element_shape=xs.shape[1:]).unstack(xs)
    ks_ta = tf.TensorArray(ks.dtype, size=n, element_shape=ks.shape[1:]).unstack(ks)
    out_ta = tf.TensorArray(state[0].dtype, size=n, element_shape=state[0].shape)

    def body(t, state, out_ta):
        state = _step(cell, state, xs_ta.read(t), ks_ta.read(t), w_h)
        return t + 1, state, out_ta.write(t, state[0])

    _, state, out_ta = tf.while_loop(lambda t, *_: t < n, body, (tf.constant(0), tuple(state), out_ta),
                                     maximum_iterations=n)
    outs = out_ta.stack()
    outs.set_shape(xs.shape[:2].concatenate(state[0].shape[1:]))
    return tf.transpose(outs, [1, 0, 2]), state


def _tf_bptt_loop(xp, keep, h0, c0, w_h, units: int):
    """TensorFlow fast path with a hand-written backward pass (``tf.custom_gradient``).

    Forward: the loop of :func:`_tf_while_loop`, also keeping each step's ``c`` and gate
    activations. Backward: one reverse ``tf.while_loop`` (the oracle's BPTT, reset rule included:
    ``dh``, ``dc`` set to zero at a reset before crossing to the previous step) that only writes each
    step's ``dz``; the recurrent-kernel gradient is then one [H, T*B] x [T*B, 4H] matmul instead of
    T small ones. TensorFlow's automatic gradient of a while loop stacks every intermediate, and
    under XLA its cost grows faster than T (measured 35k -> 15k tokens/s from T=64 to 512)."""
    import tensorflow as tf

    H = units

    def ta(x, n):
        return tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x)

    @tf.custom_gradient
    def run(xp, keep, h0, c0, w_h):
        xs = tf.transpose(xp, [1, 0, 2])                        # [T, B, 4H]
        ks = tf.transpose(keep, [1, 0, 2])                      # [T, B, 1]
        n = tf.shape(xs)[0]
        xs_ta, ks_ta = ta(xs, n), ta(ks, n)
        h_ta = tf.TensorArray(h0.dtype, size=n, element_shape=h0.shape)
        c_ta = tf.TensorArray(h0.dtype, size=n, element_shape=h0.shape)
        a_ta = tf.TensorArray(h0.dtype, size=n, element_shape=xs.shape[1:])

        def body(t, h, c, h_ta, c_ta, a_ta):
            (h, c), gates = lstm_cell(reset_state((h, c), ks_ta.read(t)), xs_ta.read(t), w_h)
            return t + 1, h, c, h_ta.write(t, h), c_ta.write(t, c), a_ta.write(t, tf.concat(gates, 1))

        _, hT, cT, h_ta, c_ta, a_ta = tf.while_loop(
            lambda t, *_: t < n, body, (tf.constant(0), h0, c0, h_ta, c_ta, a_ta), maximum_iterations=n)
        hs, cs, acts = h_ta.stack(), c_ta.stack(), a_ta.stack()  # [T, B, H], [T, B, H], [T, B, 4H]
        hs.set_shape(xs.shape[:2].concatenate(h0.shape[1:]))
        outs = tf.transpose(hs, [1, 0, 2])

        def grad(d_outs, d_hT, d_cT):
            d_hs = tf.transpose(d_outs, [1, 0, 2]) if d_outs is not None else tf.zeros_like(hs)
            dh = d_hT if d_hT is not None else tf.zeros_like(h0)
            dc = d_cT if d_cT is not None else tf.zeros_like(c0)
            # the state each step started from (after its reset)
            h_prev, c_prev = reset_state((tf.concat([h0[None], hs[:-1]], 0), tf.concat([c0[None], cs[:-1]], 0)), ks)
            dh_ta, a_ta2, tc_ta, cp_ta, ks_ta2 = (ta(x, n) for x in (d_hs, acts, tf.tanh(cs), c_prev, ks))
            dz_ta = tf.TensorArray(h0.dtype, size=n, element_shape=xs.shape[1:])

            def back(t, dh_next, dc_next, dz_ta):
                a = a_ta2.read(t)
                i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                tc, k = tc_ta.read(t), ks_ta2.read(t)
                dh = dh_ta.read(t) + dh_next
                dc = dc_next + dh * o * (1.0 - tc * tc)
                dz = tf.concat([dc * g * i * (1.0 - i), dc * cp_ta.read(t) * f * (1.0 - f),
                                dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], 1)
                dh_next, dc_next = reset_state((tf.matmul(dz, w_h, transpose_b=True), dc * f), k)  # cut at a reset
                return t - 1, dh_next, dc_next, dz_ta.write(t, dz)

            _, dh0, dc0, dz_ta = tf.while_loop(lambda t, *_: t >= 0, back, (n - 1, dh, dc, dz_ta),
                                               maximum_iterations=n)
            dzs = dz_ta.stack()                                 # [T, B, 4H]
            dw_h = tf.matmul(tf.reshape(h_prev, [-1, H]), tf.reshape(dzs, [-1, 4 * H]), transpose_a=True)
            return tf.transpose(dzs, [1, 0, 2]), tf.zeros_like(keep), dh0, dc0, dw_h

        return (outs, hT, cT), grad

    return run(xp, keep, h0, c0, w_h)


def reset_lstm(inputs, resets, h0, c0, kernel, recurrent_kernel, bias, implementation: str = "tf_bptt",
               dtype: str = "float32"):
    """The computation of :class:`ResetLSTM` as a function of its weights (``kernel`` [F, 4H],
    ``recurrent_kernel`` [H, 4H], ``bias`` [4H]): ``inputs`` [B, T, F], ``resets`` [B, T] bool or
    None, initial state ``h0, c0`` [B, H] in ``dtype``. ``implementation`` is a resolved loop (not
    ``auto``; ``unroll`` needs a static T). Returns the hidden states [B, T, H] and the final
    ``h, c``."""
    impl, H = implementation, int(recurrent_kernel.shape[0])
    w_x = ops.cast(kernel, dtype)
    w_h = ops.cast(recurrent_kernel, dtype)
    b = ops.cast(bias, dtype)
    xp = ops.matmul(inputs, w_x) + b                         # [B, T, 4H], hoisted
    if resets is None:
        keep = ops.ones(ops.shape(xp)[:2] + (1,), dtype)
    else:
        keep = ops.expand_dims(1.0 - ops.cast(resets, dtype), -1)  # [B, T, 1]
    if impl == "tf_bptt":
        return _tf_bptt_loop(xp, keep, h0, c0, w_h, H)
    outs, (h, c) = layer_loop(lstm_cell, xp, keep, (h0, c0), w_h, impl)
    return outs, h, c


def layer_loop(cell, xp, keep, state, w_h, implementation: str):
    """One layer of any cell over a window with the time loop ``implementation`` (``tf_while``,
    ``unroll``, ``scan``): ``xp`` [B, T, G*H] projected inputs, ``keep`` [B, T, 1] (0: reset the
    row before step t). Returns outputs [B, T, H] (the state's first component) and the final state."""
    if implementation == "tf_while":
        return _tf_while_loop(cell, xp, keep, state, w_h)
    if implementation == "unroll":
        seq = []
        for xp_t, k_t in zip(ops.unstack(xp, axis=1), ops.unstack(keep, axis=1)):
            state = _step(cell, state, xp_t, k_t, w_h)
            seq.append(state[0])
        return ops.stack(seq, axis=1), state
    # One scanned tensor [T, B, G*H + 1] (projection and keep side by side): Keras 3.15's
    # TensorFlow scan fails on several scanned tensors when T is unknown at trace time.
    # Its outputs must be shaped like the carry, hence the first component repeated.
    G = xp.shape[-1]

    def step(carry, xk):
        new = _step(cell, carry, xk[:, :G], xk[:, G:], w_h)
        return new, tuple(new[0] for _ in new)
    xk = ops.moveaxis(ops.concatenate([xp, keep], axis=-1), 1, 0)
    state, outs = ops.scan(step, tuple(state), xk)
    return ops.moveaxis(outs[0], 0, 1), state


@keras.saving.register_keras_serializable(package="resetbench")
class ResetLSTM(keras.layers.Layer):
    """LSTM over ``(inputs [B, T, F], resets [B, T] bool)`` with per-sample, per-step resets.

    Args:
        units: H, the width of the state.
        stateful: keep ``(h, c)`` per row across calls (needs a static batch size, e.g.
            ``keras.Input(shape=(T,), batch_size=B)``). ``reset_state()`` zeros every row.
        return_state: also return the final ``h`` and ``c`` ([B, H] each).
        implementation: the time loop: ``auto``, ``scan``, ``unroll``, ``tf_while`` or ``tf_bptt``
            (see the module doc).
        kernel_initializer, recurrent_initializer, bias_initializer, unit_forget_bias: as in
            ``keras.layers.LSTM`` (a fresh layer starts like one).

    Call: ``layer(inputs, resets, initial_state=None)`` or ``layer([inputs, resets])``.
    ``resets=None`` means no resets. ``initial_state=(h0, c0)`` overrides the carried/zero state.
    """

    def __init__(self, units: int, stateful: bool = False, return_state: bool = False,
                 implementation: str = "auto", kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}: allowed {', '.join(IMPLEMENTATIONS)}")
        if implementation.startswith("tf_") and keras.backend.backend() != "tensorflow":
            raise ValueError(f"implementation={implementation!r} needs KERAS_BACKEND=tensorflow")
        self.units = int(units)
        self.stateful = bool(stateful)
        self.return_state = bool(return_state)
        self.implementation = implementation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.unit_forget_bias = bool(unit_forget_bias)
        self.state_h = self.state_c = None

    # -- weights -------------------------------------------------------------------------------
    def build(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]            # called as layer([inputs, resets])
        features, H = int(input_shape[-1]), self.units
        self.kernel = self.add_weight(shape=(features, 4 * H), initializer=self.kernel_initializer,
                                      name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(H, 4 * H), initializer=self.recurrent_initializer,
                                                name="recurrent_kernel")
        if self.unit_forget_bias:
            base = self.bias_initializer

            def bias_init(shape, dtype=None):
                return ops.concatenate([base((H,), dtype=dtype), ops.ones((H,), dtype=dtype),
                                        base((2 * H,), dtype=dtype)])
        else:
            bias_init = self.bias_initializer
        self.bias = self.add_weight(shape=(4 * H,), initializer=bias_init, name="bias")
        if self.stateful:
            batch = input_shape[0]
            if batch is None:
                raise ValueError("ResetLSTM(stateful=True) needs a static batch size: use "
                                 "keras.Input(shape=..., batch_size=B) or call it on a concrete batch")
            self.state_h = self.add_weight(shape=(int(batch), H), initializer="zeros",
                                           trainable=False, name="state_h")
            self.state_c = self.add_weight(shape=(int(batch), H), initializer="zeros",
                                           trainable=False, name="state_c")
        self.built = True

    def set_weights(self, weights):
        """Accept ``[kernel, recurrent_kernel, bias]`` (e.g. ``keras.layers.LSTM.get_weights()``)
        also on a stateful layer, whose ``get_weights()`` adds the carried ``h, c``."""
        if self.stateful and len(weights) == 3:
            for var, val in zip((self.kernel, self.recurrent_kernel, self.bias), weights):
                var.assign(val)
            return
        super().set_weights(weights)

    def set_canonical(self, w_x, w_h, b) -> None:
        """Load resetbench canonical weights (``lstm.{l}.w_x``, ``.w_h``, ``.b``)."""
        for var, val, name in ((self.kernel, w_x, "w_x"), (self.recurrent_kernel, w_h, "w_h"),
                               (self.bias, b, "b")):
            val = np.asarray(val)
            if tuple(val.shape) != tuple(var.shape):
                raise ValueError(f"{name}: shape {val.shape}, layer expects {tuple(var.shape)}")
            var.assign(val.astype(var.dtype))

    def canonical(self) -> Dict[str, np.ndarray]:
        """``{"w_x", "w_h", "b"}`` as float32 NumPy arrays."""
        return {k: np.asarray(ops.convert_to_numpy(v), np.float32)
                for k, v in (("w_x", self.kernel), ("w_h", self.recurrent_kernel), ("b", self.bias))}

    # -- state ---------------------------------------------------------------------------------
    def reset_state(self) -> None:
        """Zero the carried state of every row (``stateful=True``)."""
        for v in (self.state_h, self.state_c):
            if v is not None:
                v.assign(ops.zeros(v.shape, v.dtype))

    reset_states = reset_state  # Keras 2 spelling

    # -- computation ---------------------------------------------------------------------------
    def _impl(self, static_t) -> str:
        impl = self.implementation
        if impl == "auto":
            impl = "tf_bptt" if keras.backend.backend() == "tensorflow" else "scan"
        if impl == "unroll" and static_t is None:
            impl = "tf_bptt" if keras.backend.backend() == "tensorflow" else "scan"
        return impl

    def call(self, inputs, resets=None, initial_state=None, training=None):
        if resets is None and isinstance(inputs, (list, tuple)):
            inputs, resets = inputs
        H = self.units
        dtype = self.compute_dtype
        batch = ops.shape(inputs)[0]
        if initial_state is not None:
            h0, c0 = (ops.cast(s, dtype) for s in initial_state)
        elif self.stateful:
            expected, got = self.state_h.shape[0], inputs.shape[0]
            if got is not None and got != expected:
                raise ValueError(f"ResetLSTM(stateful=True) was built for batch size {expected}, got "
                                 f"{got}: rows are streams; build a new layer for another row count")
            # a copy, so that assigning the new state below cannot touch a tensor autograd saved
            h0, c0 = ops.copy(self.state_h.value), ops.copy(self.state_c.value)
            h0, c0 = ops.cast(h0, dtype), ops.cast(c0, dtype)
        else:
            h0 = c0 = ops.zeros((batch, H), dtype)
        outs, h, c = reset_lstm(inputs, resets, h0, c0, self.kernel, self.recurrent_kernel, self.bias,
                                self._impl(inputs.shape[1]), dtype)
        if self.stateful and initial_state is None:
            self.state_h.assign(ops.stop_gradient(h))
            self.state_c.assign(ops.stop_gradient(c))
        if self.return_state:
            return outs, h, c
        return outs

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            input_shape = input_shape[0]
        seq = (input_shape[0], input_shape[1], self.units)
        if self.return_state:
            st = (input_shape[0], self.units)
            return seq, st, st
        return seq

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update({
            "units": self.units, "stateful": self.stateful, "return_state": self.return_state,
            "implementation": self.implementation,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": keras.initializers.serialize(self.recurrent_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
        })
        return config
