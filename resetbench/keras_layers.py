"""``ResetLSTM`` and ``ResetGRU``: Keras 3 recurrent layers with per-sample state resets at any timestep.

What Keras users asked for since 2016 (keras-team/keras#2750, #11175): a stateful RNN where each
row of the batch can be reset on its own, also in the middle of a window. Keras 3 only resets all
rows at once (``reset_state()``), and a Keras mask means "skip this step", not "reset".

Both layers take ``(inputs, resets)``: ``inputs`` [B, T, F] and ``resets`` [B, T] bool. Before
step ``t`` the state of every row ``b`` with ``resets[b, t]`` (``(h, c)`` for the LSTM, ``h`` for
the GRU) is replaced by zeros (resetbench's reset rule, docs/spec.md). The replacement is a select
(``where``), so it also clears a NaN or inf state and cuts the gradient: nothing after a reset
depends on anything before it. A layer returns the hidden states of every step, [B, T, H] (and the
final state with ``return_state=True``: ``h, c`` for the LSTM, ``h`` for the GRU).

With ``stateful=True`` a layer keeps its state per row across calls (a fixed batch size is
needed, as for ``keras.layers.LSTM(stateful=True)``): each row resumes from its own last state
unless its ``resets`` says otherwise; ``reset_state()`` zeros every row. The carried state is one
non-trainable variable per state component (``state_h``, ``state_c``), so it is updated under
``model.train_on_batch`` and ``model.fit`` on every Keras backend, saved with the model, and no
gradient crosses a call boundary.

Weights are Keras's own layouts, so Keras layers' weights load with ``set_weights`` as they are:

- ``ResetLSTM``: ``kernel`` [F, 4H], ``recurrent_kernel`` [H, 4H], ``bias`` [4H], gates i, f,
  g(=c), o: ``keras.layers.LSTM``'s layout, which is also resetbench's canonical one (``w_x``,
  ``w_h``, ``b``).
- ``ResetGRU``: ``keras.layers.GRU(reset_after=True)``'s: ``kernel`` [F, 3H], ``recurrent_kernel``
  [H, 3H], gate blocks z, r, n (Keras calls n "h"), ``bias`` [2, 3H] (input bias, recurrent bias).
  resetbench's canonical GRU (``w_x``, ``w_h``, ``b_x``, ``b_h``, nn.GRU's gate order r, z, n) is
  the same cell with the r and z blocks swapped; :meth:`ResetGRU.set_canonical` and
  :meth:`ResetGRU.canonical` convert (:func:`gru_from_canonical`, :func:`gru_to_canonical`).

The input projection of the whole window is one matmul outside the time loop; the loop runs only
the recurrent matmul and the gate arithmetic. A cell is one step function (:func:`lstm_cell`,
:func:`gru_cell`: ``cell(state, xp_t, *rec)`` with its recurrent parameters ``rec``); the time loop
and the reset are shared by every cell (:func:`layer_loop`). Loop implementations
(``implementation``):

- ``"scan"``: ``keras.ops.scan`` (every backend; any T, also unknown at trace time).
- ``"unroll"``: a Python loop over ``keras.ops.unstack`` steps (every backend; needs a static T,
  else it falls back to ``auto``'s choice). Large graphs: slow to compile under XLA.
- ``"tf_while"``: TensorFlow only: ``tf.while_loop`` over ``TensorArray`` steps (any T), gradient
  by TensorFlow's autodiff. Unlike Keras 3.15's TensorFlow ``scan`` it sets
  ``maximum_iterations``, so it compiles under XLA with T unknown at trace time.
- ``"tf_bptt"``: TensorFlow only: the ``tf_while`` forward with a hand-written backward pass
  (``tf.custom_gradient``: one reverse loop, the recurrent-kernel gradient as one matmul), one per
  cell (:func:`_tf_bptt_lstm`, :func:`_tf_bptt_gru`). Measured on 2 CPU cores (LSTM, B=32, E=64,
  H=256, train step): under XLA 37k/40k/35k tokens/s at T=64/256/512 vs 28k/24k/13k for
  ``tf_while`` (whose autodiff cost grows faster than T); in graph mode 25k vs 17k at T=64.
- ``"auto"`` (default): ``tf_bptt`` on the TensorFlow backend, ``scan`` elsewhere.

Written with ``keras.ops``; only the ``tf_*`` loops import TensorFlow. :func:`reset_rnn` is a
layer's computation as a function of its weights (for weights held by another layer, e.g.
``keras.layers.LSTM`` or ``GRU``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np

import keras
from keras import ops

IMPLEMENTATIONS = ("auto", "scan", "unroll", "tf_while", "tf_bptt")


# --------------------------------------------------------------------------- cells: one step each
def lstm_cell(state, xp_t, w_h):
    """The LSTM cell (``conf/cell/lstm.yaml``): ``(h, c)`` and the step's projected input ``xp_t``
    [B, 4H] (``x kernel + bias``) -> the new ``(h, c)`` and the gate activations ``(i, f, g, o)``."""
    h, c = state
    units = w_h.shape[0]
    z = xp_t + ops.matmul(h, w_h)
    i = ops.sigmoid(z[:, :units])
    f = ops.sigmoid(z[:, units:2 * units])
    g = ops.tanh(z[:, 2 * units:3 * units])
    o = ops.sigmoid(z[:, 3 * units:])
    c = f * c + i * g
    return (o * ops.tanh(c), c), (i, f, g, o)


def gru_cell(state, xp_t, w_h, b_h):
    """The GRU cell (``conf/cell/gru.yaml``, "reset after") in Keras's gate order z, r, n:
    ``(h,)`` and the step's projected input ``xp_t`` [B, 3H] (``x kernel + bias[0]``), the
    recurrent kernel and bias ``b_h`` (``bias[1]``) -> the new ``(h,)`` and, for a hand-written
    backward, ``(z, r, n, h w_hn + b_hn)``."""
    (h,) = state
    units = w_h.shape[0]
    hp = ops.matmul(h, w_h) + b_h
    z = ops.sigmoid(xp_t[:, :units] + hp[:, :units])
    r = ops.sigmoid(xp_t[:, units:2 * units] + hp[:, units:2 * units])
    hn = hp[:, 2 * units:]
    n = ops.tanh(xp_t[:, 2 * units:] + r * hn)
    return (z * h + (1.0 - z) * n,), (z, r, n, hn)


def reset_state(state, keep_t):
    """The reset rule for one step: rows with ``keep_t == 0`` ([B, 1]) get the zero state in every
    component. A select (``where``), not a multiply: a NaN or inf state is cleared too."""
    return tuple(ops.where(keep_t > 0, s, ops.zeros_like(s)) for s in state)


def _step(cell, state, xp_t, keep_t, rec):
    """The time loops' step for any cell: reset, then the cell."""
    return cell(reset_state(state, keep_t), xp_t, *rec)[0]


# --------------------------------------------------------------------------- time loops
def layer_loop(cell, xp, keep, state, rec: Sequence[Any], implementation: str):
    """One layer of any cell over a window with the time loop ``implementation`` (``tf_while``,
    ``unroll``, ``scan``): ``xp`` [B, T, G*H] projected inputs, ``keep`` [B, T, 1] (0: reset the
    row before step t), ``state`` a tuple of [B, H] tensors, ``rec`` the cell's recurrent
    parameters (LSTM ``(w_h,)``, GRU ``(w_h, b_h)``). Returns outputs [B, T, H] (the state's first
    component) and the final state."""
    rec = tuple(rec)
    if implementation == "tf_while":
        return _tf_while_loop(cell, xp, keep, tuple(state), rec)
    if implementation == "unroll":
        seq = []
        for xp_t, k_t in zip(ops.unstack(xp, axis=1), ops.unstack(keep, axis=1)):
            state = _step(cell, state, xp_t, k_t, rec)
            seq.append(state[0])
        return ops.stack(seq, axis=1), tuple(state)
    if implementation != "scan":
        raise ValueError(f"layer_loop: implementation={implementation!r}; allowed tf_while, unroll, scan")
    # One scanned tensor [T, B, G*H + 1] (projection and keep side by side): Keras 3.15's
    # TensorFlow scan fails on several scanned tensors when T is unknown at trace time.
    # Its outputs must be shaped like the carry, hence the first component repeated.
    G = xp.shape[-1]

    def step(carry, xk):
        new = _step(cell, carry, xk[:, :G], xk[:, G:], rec)
        return new, tuple(new[0] for _ in new)
    xk = ops.moveaxis(ops.concatenate([xp, keep], axis=-1), 1, 0)
    state, outs = ops.scan(step, tuple(state), xk)
    return ops.moveaxis(outs[0], 0, 1), tuple(state)


def _time_major_arrays(tf, *tensors):
    """``[B, T, ...]`` tensors -> ``(T, TensorArrays of their [T, B, ...] transposes)``."""
    n = tf.shape(tensors[0])[1]
    out = []
    for x in tensors:
        xs = tf.transpose(x, [1, 0, 2])
        out.append(tf.TensorArray(xs.dtype, size=n, element_shape=xs.shape[1:]).unstack(xs))
    return n, out


def _tf_while_loop(cell, xp, keep, state, rec):
    """TensorFlow fast path: ``tf.while_loop`` with ``TensorArray`` inputs and outputs.
    ``xp`` [B, T, G*H], ``keep`` [B, T, 1]. Returns outputs [B, T, H] and the final state."""
    import tensorflow as tf

    n, (xs_ta, ks_ta) = _time_major_arrays(tf, xp, keep)
    out_ta = tf.TensorArray(state[0].dtype, size=n, element_shape=state[0].shape)

    def body(t, state, out_ta):
        state = _step(cell, state, xs_ta.read(t), ks_ta.read(t), rec)
        return t + 1, state, out_ta.write(t, state[0])

    _, state, out_ta = tf.while_loop(lambda t, *_: t < n, body, (tf.constant(0), tuple(state), out_ta),
                                     maximum_iterations=n)
    outs = out_ta.stack()
    outs.set_shape(xp.shape[1:2].concatenate(xp.shape[:1]).concatenate(state[0].shape[1:]))
    return tf.transpose(outs, [1, 0, 2]), state


def _tf_forward_keeping(tf, cell, xp, keep, state, rec, n_acts: int):
    """The forward loop of a ``tf_bptt`` layer: like :func:`_tf_while_loop`, also stacking every
    state component and the cell's activations (concatenated, ``n_acts`` blocks of H) per step.
    Returns ``(outs [B, T, H], final state, [T, B, H] per component, acts [T, B, n_acts*H])``."""
    h0 = state[0]
    H = h0.shape[-1]
    n, (xs_ta, ks_ta) = _time_major_arrays(tf, xp, keep)
    s_tas = tuple(tf.TensorArray(h0.dtype, size=n, element_shape=h0.shape) for _ in state)
    a_ta = tf.TensorArray(h0.dtype, size=n, element_shape=h0.shape[:1].concatenate([n_acts * H]))

    def body(t, state, s_tas, a_ta):
        state, acts = cell(reset_state(state, ks_ta.read(t)), xs_ta.read(t), *rec)
        s_tas = tuple(ta.write(t, s) for ta, s in zip(s_tas, state))
        return t + 1, state, s_tas, a_ta.write(t, tf.concat(acts, 1))

    _, final, s_tas, a_ta = tf.while_loop(lambda t, *_: t < n, body, (tf.constant(0), tuple(state), s_tas, a_ta),
                                          maximum_iterations=n)
    seqs = [ta.stack() for ta in s_tas]
    for s in seqs:
        s.set_shape(xp.shape[1:2].concatenate(h0.shape))
    return tf.transpose(seqs[0], [1, 0, 2]), final, seqs, a_ta.stack()


def _tf_previous(tf, s0, seq, ks):
    """The state each step started from (after its reset): ``[s0, seq[:-1]]`` reset where ``ks``."""
    return reset_state((tf.concat([s0[None], seq[:-1]], 0),), ks)[0]


def _tf_bptt_lstm(xp, keep, state, w_h):
    """The LSTM's ``tf_bptt`` loop: :func:`_tf_forward_keeping` with a hand-written backward pass
    (``tf.custom_gradient``). Backward: one reverse ``tf.while_loop`` (the oracle's BPTT, reset
    rule included: ``dh``, ``dc`` set to zero at a reset before crossing to the previous step) that
    only writes each step's ``dz``; the recurrent-kernel gradient is then one [H, T*B] x
    [T*B, 4H] matmul instead of T small ones. TensorFlow's automatic gradient of a while loop
    stacks every intermediate, and under XLA its cost grows faster than T (measured 35k -> 15k
    tokens/s from T=64 to 512)."""
    import tensorflow as tf

    H = w_h.shape[0]

    @tf.custom_gradient
    def run(xp, keep, h0, c0, w_h):
        outs, (hT, cT), (hs, cs), acts = _tf_forward_keeping(tf, lstm_cell, xp, keep, (h0, c0), (w_h,), 4)

        def grad(d_outs, d_hT, d_cT):
            ks = tf.transpose(keep, [1, 0, 2])
            n = tf.shape(ks)[0]
            d_hs = tf.transpose(d_outs, [1, 0, 2]) if d_outs is not None else tf.zeros_like(hs)
            dh = d_hT if d_hT is not None else tf.zeros_like(h0)
            dc = d_cT if d_cT is not None else tf.zeros_like(c0)
            h_prev, c_prev = _tf_previous(tf, h0, hs, ks), _tf_previous(tf, c0, cs, ks)
            dh_ta, a_ta, tc_ta, cp_ta, ks_ta = (
                tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x)
                for x in (d_hs, acts, tf.tanh(cs), c_prev, ks))
            dz_ta = tf.TensorArray(h0.dtype, size=n, element_shape=acts.shape[1:])

            def back(t, dh_next, dc_next, dz_ta):
                a = a_ta.read(t)
                i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                tc, k = tc_ta.read(t), ks_ta.read(t)
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

    outs, h, c = run(xp, keep, *state, w_h)
    return outs, (h, c)


def _tf_bptt_gru(xp, keep, state, w_h, b_h):
    """The GRU's ``tf_bptt`` loop: :func:`_tf_forward_keeping` with a hand-written backward pass
    (``tf.custom_gradient``), as :func:`_tf_bptt_lstm`: one reverse ``tf.while_loop`` (``dh`` set
    to zero at a reset before crossing to the previous step) that writes each step's gradients
    w.r.t. the projected input (``dxp``) and the recurrent pre-activation ``h w_h + b_h`` (``dhp``,
    which differs from ``dxp`` in the n block by the factor r); then the recurrent kernel's
    gradient is one [H, T*B] x [T*B, 3H] matmul and the recurrent bias's one sum."""
    import tensorflow as tf

    H = w_h.shape[0]

    @tf.custom_gradient
    def run(xp, keep, h0, w_h, b_h):
        outs, (hT,), (hs,), acts = _tf_forward_keeping(tf, gru_cell, xp, keep, (h0,), (w_h, b_h), 4)

        def grad(d_outs, d_hT):
            ks = tf.transpose(keep, [1, 0, 2])
            n = tf.shape(ks)[0]
            d_hs = tf.transpose(d_outs, [1, 0, 2]) if d_outs is not None else tf.zeros_like(hs)
            dh = d_hT if d_hT is not None else tf.zeros_like(h0)
            h_prev = _tf_previous(tf, h0, hs, ks)
            dh_ta, a_ta, hprev_ta, ks_ta = (tf.TensorArray(x.dtype, size=n, element_shape=x.shape[1:]).unstack(x)
                                         for x in (d_hs, acts, h_prev, ks))
            shape = h0.shape[:1].concatenate([3 * H])
            dx_ta, dr_ta = (tf.TensorArray(h0.dtype, size=n, element_shape=shape) for _ in range(2))

            def back(t, dh_next, dx_ta, dr_ta):
                a = a_ta.read(t)
                z, r, nn, hn = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                dh = dh_ta.read(t) + dh_next
                da_n = dh * (1.0 - z) * (1.0 - nn * nn)
                da_z = dh * (hprev_ta.read(t) - nn) * z * (1.0 - z)
                da_r = da_n * hn * r * (1.0 - r)
                dhp = tf.concat([da_z, da_r, da_n * r], 1)
                dprev = dh * z + tf.matmul(dhp, w_h, transpose_b=True)
                (dh_next,) = reset_state((dprev,), ks_ta.read(t))      # cut at a reset
                return t - 1, dh_next, dx_ta.write(t, tf.concat([da_z, da_r, da_n], 1)), dr_ta.write(t, dhp)

            _, dh0, dx_ta, dr_ta = tf.while_loop(lambda t, *_: t >= 0, back, (n - 1, dh, dx_ta, dr_ta),
                                                 maximum_iterations=n)
            dhps = dr_ta.stack()                                # [T, B, 3H]
            dw_h = tf.matmul(tf.reshape(h_prev, [-1, H]), tf.reshape(dhps, [-1, 3 * H]), transpose_a=True)
            db_h = tf.reduce_sum(dhps, axis=[0, 1])
            return tf.transpose(dx_ta.stack(), [1, 0, 2]), tf.zeros_like(keep), dh0, dw_h, db_h

        return (outs, hT), grad

    outs, h = run(xp, keep, state[0], w_h, b_h)
    return outs, (h,)


# --------------------------------------------------------------------------- a layer's computation
# cell name -> (step function, tf_bptt loop, the bias's split into the input projection's part and
# the recurrent parameters after the recurrent kernel)
CELLS = {
    "lstm": (lstm_cell, _tf_bptt_lstm, lambda bias: (bias, ())),
    "gru": (gru_cell, _tf_bptt_gru, lambda bias: (bias[0], (bias[1],))),
}


def reset_rnn(cell: str, inputs, resets, state, kernel, recurrent_kernel, bias, implementation: str = "tf_bptt",
              dtype: str = "float32"):
    """The computation of a reset-aware layer of ``cell`` (``lstm``, ``gru``) as a function of its
    weights in Keras's layout (those of :class:`ResetLSTM` / :class:`ResetGRU`, or of
    ``keras.layers.LSTM`` / ``GRU(reset_after=True)``): ``inputs`` [B, T, F], ``resets`` [B, T]
    bool or None, ``state`` the initial state (a tuple of [B, H] in ``dtype``). ``implementation``
    is a resolved loop (not ``auto``; ``unroll`` needs a static T). Returns the hidden states
    [B, T, H] and the final state (a tuple)."""
    step, bptt, split = CELLS[cell]
    x_bias, rec_bias = split(ops.cast(bias, dtype))
    w_h = ops.cast(recurrent_kernel, dtype)
    xp = ops.matmul(inputs, ops.cast(kernel, dtype)) + x_bias  # [B, T, G*H], hoisted
    if resets is None:
        keep = ops.ones(ops.shape(xp)[:2] + (1,), dtype)
    else:
        keep = ops.expand_dims(1.0 - ops.cast(resets, dtype), -1)  # [B, T, 1]
    if implementation == "tf_bptt":
        return bptt(xp, keep, tuple(state), w_h, *rec_bias)
    return layer_loop(step, xp, keep, tuple(state), (w_h,) + rec_bias, implementation)


def reset_lstm(inputs, resets, h0, c0, kernel, recurrent_kernel, bias, implementation: str = "tf_bptt",
               dtype: str = "float32"):
    """:func:`reset_rnn` of the LSTM with the state as ``h0, c0``; returns ``(outs, h, c)``."""
    outs, (h, c) = reset_rnn("lstm", inputs, resets, (h0, c0), kernel, recurrent_kernel, bias, implementation, dtype)
    return outs, h, c


# --------------------------------------------------------------------------- GRU weight layouts
def _swap_rz(a: np.ndarray) -> np.ndarray:
    """Swap the first two gate blocks of the last axis (r, z, n <-> z, r, n); its own inverse."""
    a = np.asarray(a)
    H = a.shape[-1] // 3
    return np.concatenate([a[..., H:2 * H], a[..., :H], a[..., 2 * H:]], axis=-1)


def gru_from_canonical(w_x, w_h, b_x, b_h):
    """resetbench's canonical GRU (gate blocks r, z, n; ``b_x``, ``b_h`` [3H]) -> Keras's
    ``[kernel, recurrent_kernel, bias]`` (blocks z, r, n; ``bias`` [2, 3H]). A re-indexing, so it
    also converts gradients."""
    return [_swap_rz(w_x), _swap_rz(w_h), np.stack([_swap_rz(b_x), _swap_rz(b_h)])]


def gru_to_canonical(kernel, recurrent_kernel, bias) -> Dict[str, np.ndarray]:
    """The inverse of :func:`gru_from_canonical`: ``{"w_x", "w_h", "b_x", "b_h"}``."""
    bias = np.asarray(bias)
    return {"w_x": _swap_rz(kernel), "w_h": _swap_rz(recurrent_kernel), "b_x": _swap_rz(bias[0]),
            "b_h": _swap_rz(bias[1])}


# --------------------------------------------------------------------------- the layers
def _first_shape(input_shape):
    """The inputs' shape, also when called as ``layer([inputs, resets])``."""
    if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
        return input_shape[0]
    return input_shape


class ResetRNN(keras.layers.Layer):
    """What :class:`ResetLSTM` and :class:`ResetGRU` share: the call over ``(inputs, resets)``, the
    per-row carried state (``stateful``), ``return_state``, the loop choice and the config.
    A subclass names its ``cell_name`` (a key of :data:`CELLS`), its ``state_names`` and builds its
    weights (:meth:`_build_weights`: ``kernel``, ``recurrent_kernel``, ``bias`` in Keras's layout)."""

    cell_name: str = ""
    state_names: Tuple[str, ...] = ()

    def __init__(self, units: int, stateful: bool = False, return_state: bool = False,
                 implementation: str = "auto", kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", **kwargs: Any):
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
        for name in self.state_names:
            setattr(self, f"state_{name}", None)

    # -- weights -------------------------------------------------------------------------------
    def build(self, input_shape):
        input_shape = _first_shape(input_shape)
        self._build_weights(int(input_shape[-1]))
        if self.stateful:
            batch = input_shape[0]
            if batch is None:
                raise ValueError(f"{type(self).__name__}(stateful=True) needs a static batch size: use "
                                 "keras.Input(shape=..., batch_size=B) or call it on a concrete batch")
            for name in self.state_names:
                setattr(self, f"state_{name}", self.add_weight(shape=(int(batch), self.units), initializer="zeros",
                                                               trainable=False, name=f"state_{name}"))
        self.built = True

    def _build_weights(self, features: int) -> None:
        raise NotImplementedError

    def _add_kernels(self, features: int, gates: int) -> None:
        """``kernel`` [features, gates*H] and ``recurrent_kernel`` [H, gates*H], Keras's names and
        initializers."""
        H = self.units
        self.kernel = self.add_weight(shape=(features, gates * H), initializer=self.kernel_initializer,
                                      name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(H, gates * H), initializer=self.recurrent_initializer,
                                                name="recurrent_kernel")

    def _rnn_weights(self):
        return (self.kernel, self.recurrent_kernel, self.bias)

    def set_weights(self, weights):
        """Accept ``[kernel, recurrent_kernel, bias]`` (e.g. ``keras.layers.LSTM.get_weights()``)
        also on a stateful layer, whose ``get_weights()`` adds the carried state."""
        if self.stateful and len(weights) == 3:
            for var, val in zip(self._rnn_weights(), weights):
                val = np.asarray(val)
                if tuple(val.shape) != tuple(var.shape):
                    raise ValueError(f"{var.name}: shape {val.shape}, layer expects {tuple(var.shape)}")
                var.assign(val)
            return
        super().set_weights(weights)

    def _set_keras_weights(self, arrays, names) -> None:
        """Assign ``arrays`` (Keras layout) to kernel, recurrent kernel and bias; a wrong shape is
        refused naming the canonical weight ``names`` it came from."""
        for var, val, name in zip(self._rnn_weights(), arrays, names):
            val = np.asarray(val)
            if tuple(val.shape) != tuple(var.shape):
                raise ValueError(f"{name}: shape {val.shape}, layer expects {tuple(var.shape)}")
            var.assign(val.astype(var.dtype))

    def _keras_arrays(self):
        return [np.asarray(ops.convert_to_numpy(v), np.float32) for v in self._rnn_weights()]

    # -- state ---------------------------------------------------------------------------------
    def _state_vars(self):
        return tuple(getattr(self, f"state_{name}") for name in self.state_names)

    def reset_state(self) -> None:
        """Zero the carried state of every row (``stateful=True``)."""
        for v in self._state_vars():
            if v is not None:
                v.assign(ops.zeros(v.shape, v.dtype))

    reset_states = reset_state  # Keras 2 spelling

    def _initial_state(self, inputs, initial_state, dtype):
        """The state the window starts from: ``initial_state`` (a tensor or a tuple, one per state
        component), else the carried one (``stateful``), else zeros."""
        if initial_state is not None:
            if not isinstance(initial_state, (list, tuple)):
                initial_state = (initial_state,)
            if len(initial_state) != len(self.state_names):
                raise ValueError(f"initial_state: {len(initial_state)} tensors; {type(self).__name__} has "
                                 f"{len(self.state_names)} ({', '.join(self.state_names)})")
            return tuple(ops.cast(s, dtype) for s in initial_state)
        if self.stateful:
            expected, got = self._state_vars()[0].shape[0], inputs.shape[0]
            if got is not None and got != expected:
                raise ValueError(f"{type(self).__name__}(stateful=True) was built for batch size {expected}, "
                                 f"got {got}: rows are streams; build a new layer for another row count")
            # a copy, so that assigning the new state below cannot touch a tensor autograd saved
            return tuple(ops.cast(ops.copy(v.value), dtype) for v in self._state_vars())
        zero = ops.zeros((ops.shape(inputs)[0], self.units), dtype)
        return tuple(zero for _ in self.state_names)

    # -- computation ---------------------------------------------------------------------------
    def _impl(self, static_t) -> str:
        impl = self.implementation
        fallback = "tf_bptt" if keras.backend.backend() == "tensorflow" else "scan"
        if impl == "auto" or (impl == "unroll" and static_t is None):
            return fallback
        return impl

    def call(self, inputs, resets=None, initial_state=None, training=None):
        if resets is None and isinstance(inputs, (list, tuple)):
            inputs, resets = inputs
        dtype = self.compute_dtype
        state0 = self._initial_state(inputs, initial_state, dtype)
        outs, state = reset_rnn(self.cell_name, inputs, resets, state0, *self._rnn_weights(),
                                self._impl(inputs.shape[1]), dtype)
        if self.stateful and initial_state is None:
            for var, s in zip(self._state_vars(), state):
                var.assign(ops.stop_gradient(s))
        if self.return_state:
            return (outs,) + tuple(state)
        return outs

    def compute_output_shape(self, input_shape):
        input_shape = _first_shape(input_shape)
        seq = (input_shape[0], input_shape[1], self.units)
        if self.return_state:
            return (seq,) + tuple((input_shape[0], self.units) for _ in self.state_names)
        return seq

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update({
            "units": self.units, "stateful": self.stateful, "return_state": self.return_state,
            "implementation": self.implementation,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": keras.initializers.serialize(self.recurrent_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config


@keras.saving.register_keras_serializable(package="resetbench")
class ResetLSTM(ResetRNN):
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

    cell_name = "lstm"
    state_names = ("h", "c")

    def __init__(self, units: int, stateful: bool = False, return_state: bool = False,
                 implementation: str = "auto", kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias: bool = True, **kwargs: Any):
        super().__init__(units, stateful, return_state, implementation, kernel_initializer,
                         recurrent_initializer, bias_initializer, **kwargs)
        self.unit_forget_bias = bool(unit_forget_bias)

    def _build_weights(self, features: int) -> None:
        H = self.units
        self._add_kernels(features, 4)
        if self.unit_forget_bias:
            base = self.bias_initializer

            def bias_init(shape, dtype=None):
                return ops.concatenate([base((H,), dtype=dtype), ops.ones((H,), dtype=dtype),
                                        base((2 * H,), dtype=dtype)])
        else:
            bias_init = self.bias_initializer
        self.bias = self.add_weight(shape=(4 * H,), initializer=bias_init, name="bias")

    @staticmethod
    def from_canonical(p: Mapping[str, Any]):
        """Canonical layer weights ``{"w_x", "w_h", "b"}`` -> ``[kernel, recurrent_kernel, bias]``
        (the same arrays: the LSTM's canonical layout is Keras's)."""
        return [np.asarray(p["w_x"]), np.asarray(p["w_h"]), np.asarray(p["b"])]

    @staticmethod
    def to_canonical(kernel, recurrent_kernel, bias) -> Dict[str, np.ndarray]:
        """The inverse of :meth:`from_canonical`."""
        return {"w_x": np.asarray(kernel), "w_h": np.asarray(recurrent_kernel), "b": np.asarray(bias)}

    def set_canonical(self, w_x, w_h, b) -> None:
        """Load resetbench canonical weights (``lstm.{l}.w_x``, ``.w_h``, ``.b``)."""
        self._set_keras_weights(self.from_canonical({"w_x": w_x, "w_h": w_h, "b": b}), ("w_x", "w_h", "b"))

    def canonical(self) -> Dict[str, np.ndarray]:
        """``{"w_x", "w_h", "b"}`` as float32 NumPy arrays."""
        return self.to_canonical(*self._keras_arrays())

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config["unit_forget_bias"] = self.unit_forget_bias
        return config


@keras.saving.register_keras_serializable(package="resetbench")
class ResetGRU(ResetRNN):
    """GRU ("reset after", nn.GRU's and ``keras.layers.GRU(reset_after=True)``'s equations) over
    ``(inputs [B, T, F], resets [B, T] bool)`` with per-sample, per-step resets.

    Args:
        units: H, the width of the state.
        stateful: keep ``h`` per row across calls (needs a static batch size, e.g.
            ``keras.Input(shape=(T,), batch_size=B)``). ``reset_state()`` zeros every row.
        return_state: also return the final ``h`` ([B, H]), as ``keras.layers.GRU`` does.
        implementation: the time loop: ``auto``, ``scan``, ``unroll``, ``tf_while`` or ``tf_bptt``
            (see the module doc).
        kernel_initializer, recurrent_initializer, bias_initializer: as in ``keras.layers.GRU``.

    Weights: ``keras.layers.GRU(reset_after=True)``'s (``kernel`` [F, 3H], ``recurrent_kernel``
    [H, 3H], gate blocks z, r, n; ``bias`` [2, 3H]): ``set_weights(keras_gru.get_weights())`` loads
    a Keras GRU as it is. ``set_canonical`` / ``canonical``: resetbench's layout (r, z, n).

    Call: ``layer(inputs, resets, initial_state=None)`` or ``layer([inputs, resets])``.
    ``resets=None`` means no resets. ``initial_state=h0`` (or ``(h0,)``) overrides the carried/zero state.
    """

    cell_name = "gru"
    state_names = ("h",)

    def _build_weights(self, features: int) -> None:
        H = self.units
        self._add_kernels(features, 3)
        self.bias = self.add_weight(shape=(2, 3 * H), initializer=self.bias_initializer, name="bias")

    @staticmethod
    def from_canonical(p: Mapping[str, Any]):
        """Canonical layer weights ``{"w_x", "w_h", "b_x", "b_h"}`` -> ``[kernel, recurrent_kernel,
        bias]`` (:func:`gru_from_canonical`)."""
        return gru_from_canonical(p["w_x"], p["w_h"], p["b_x"], p["b_h"])

    @staticmethod
    def to_canonical(kernel, recurrent_kernel, bias) -> Dict[str, np.ndarray]:
        """The inverse of :meth:`from_canonical` (:func:`gru_to_canonical`)."""
        return gru_to_canonical(kernel, recurrent_kernel, bias)

    def set_canonical(self, w_x, w_h, b_x, b_h) -> None:
        """Load resetbench canonical weights (``gru.{l}.w_x``, ``.w_h``, ``.b_x``, ``.b_h``)."""
        arrays = self.from_canonical({"w_x": w_x, "w_h": w_h, "b_x": b_x, "b_h": b_h})
        self._set_keras_weights(arrays, ("w_x", "w_h", "b_x and b_h"))

    def canonical(self) -> Dict[str, np.ndarray]:
        """``{"w_x", "w_h", "b_x", "b_h"}`` as float32 NumPy arrays (gate blocks r, z, n)."""
        return self.to_canonical(*self._keras_arrays())


# the layer of each cell (by the cell's name in conf/cell/)
LAYERS = {cls.cell_name: cls for cls in (ResetLSTM, ResetGRU)}
