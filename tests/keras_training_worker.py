"""The Keras layers trained under one Keras backend, in a process of their own (the Keras backend is
fixed at Keras's first import): ``KERAS_BACKEND=<name> python -m tests.keras_training_worker CASE OUT
DIR``, run by tests/test_keras_backends.py, which compares what this writes with the NumPy oracle.

With ``readme`` in the case file, the README's Keras example (tests/test_keras_example.py) runs first,
before anything here imports Keras (as in a fresh process), and its losses go into OUT as
``readme/losses``.

For each cell in the case file (``ResetLSTM``, ``ResetGRU``) and each loop this backend runs
(TensorFlow: tf_bptt, tf_while, scan, unroll; JAX and torch: scan, unroll), a tiny Keras model
``Embedding -> Reset<CELL>(stateful=True) -> Dense`` from the case's canonical weights, compiled
with SGD and the masked-mean loss (``mean_with_sample_weight``, the contract's), starting each
check from the case's carried state:

- ``fwd``: logits and the carried state after window 0 (a direct call);
- ``grad``: the loss and every gradient on window 0 (this backend's own autodiff);
- ``tob``: the losses, weights and carried state after ``train_on_batch`` on every window;
- with the default loop only: ``fit`` (the same windows as one epoch of ``model.fit``), then
  ``save``: ``model.save`` / ``keras.models.load_model`` and both models on window ``next``.

Then, from the case's ``layer/*`` arrays, ``ResetLSTM`` alone (``layer/<loop>/...``): its sequence
and final state called with ``initial_state`` and ``return_state=True``, for each loop; and two
calls of a stateful layer against one call over both windows (``layer/stateful/...``). Last,
``adapter``: what ``import backends.keras_lstm`` (``backend=keras``) does under this Keras backend.

Everything goes into the ``.npz`` OUT as ``<cell>/<loop>/<check>/<name>`` (canonical keys for
weights and gradients); this module compares nothing itself.
"""

from __future__ import annotations

import os
import sys
from typing import Dict

import numpy as np

LOOPS = {"tensorflow": ("tf_bptt", "tf_while", "scan", "unroll")}
OTHER_LOOPS = ("scan", "unroll")


def build(keras, cell: str, loop: str, w: Dict[str, np.ndarray], B: int, T: int, lr: float):
    """The model from canonical weights ``w``, compiled with SGD and the contract's loss."""
    from resetbench.keras_layers import LAYERS

    V, E = w["embedding"].shape
    H = w["head.w"].shape[0]
    ids = keras.Input(shape=(T,), batch_size=B, dtype="int32")
    resets = keras.Input(shape=(T,), batch_size=B, dtype="bool")
    rnn = LAYERS[cell](H, stateful=True, implementation=loop, name="rnn")
    out = keras.layers.Dense(V, name="head")(rnn(keras.layers.Embedding(V, E, name="embedding")(ids), resets))
    model = keras.Model([ids, resets], out)
    model.get_layer("embedding").embeddings.assign(w["embedding"])
    prefix = f"{cell}.0."
    rnn.set_canonical(**{k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)})
    model.get_layer("head").kernel.assign(w["head.w"])
    model.get_layer("head").bias.assign(w["head.b"])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss=loss_object(keras))
    return model


def loss_object(keras):
    """The contract's loss: ``sum(ce * mask) / sum(mask)`` (the mask as the sample weight)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")


def canonical(keras, model, cell: str, arrays=None) -> Dict[str, np.ndarray]:
    """The model's weights (or ``arrays``, one per trainable variable: its gradients) by canonical key."""
    layers = {name: model.get_layer(name) for name in ("embedding", "rnn", "head")}
    variables = [layers["embedding"].embeddings, layers["rnn"].kernel, layers["rnn"].recurrent_kernel,
                 layers["rnn"].bias, layers["head"].kernel, layers["head"].bias]
    if arrays is None:
        values = [keras.ops.convert_to_numpy(v) for v in variables]
    else:
        by_id = {id(v): a for v, a in zip(model.trainable_variables, arrays)}
        values = [by_id[id(v)] for v in variables]
    out = {"embedding": values[0], "head.w": values[4], "head.b": values[5]}
    out.update({f"{cell}.0.{k}": v for k, v in type(layers["rnn"]).to_canonical(*values[1:4]).items()})
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def case_weights(case, cell: str) -> Dict[str, np.ndarray]:
    """The case's canonical weights of ``cell`` (keys ``<cell>/w/<canonical key>``)."""
    return {k.split("/", 2)[2]: case[k] for k in case.files if k.startswith(f"{cell}/w/")}


def case_state(case, cell: str):
    """The case's carried state of ``cell`` ([B, H] per state component, ``<cell>/state0/<name>``)."""
    from resetbench.keras_layers import LAYERS
    return [case[f"{cell}/state0/{name}"] for name in LAYERS[cell].state_names]


def set_state(model, state) -> None:
    rnn = model.get_layer("rnn")
    for name, value in zip(rnn.state_names, state):
        getattr(rnn, f"state_{name}").assign(value)


def get_state(keras, model) -> Dict[str, np.ndarray]:
    rnn = model.get_layer("rnn")
    return {name: keras.ops.convert_to_numpy(getattr(rnn, f"state_{name}")) for name in rnn.state_names}


def gradients(keras, model, x, y, mask, reset):
    """Loss and the gradient of every trainable variable, by this backend's own autodiff."""
    backend = keras.backend.backend()
    loss_fn = loss_object(keras)
    tvars = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model([x, reset], training=True), sample_weight=mask)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, [v.value for v in tvars])]
    elif backend == "jax":
        import jax
        frozen = [v.value for v in model.non_trainable_variables]

        def f(values):
            logits, _ = model.stateless_call(values, frozen, [x, reset], training=True)
            return loss_fn(y, logits, sample_weight=mask)
        loss, grads = jax.value_and_grad(f)([v.value for v in tvars])
    else:
        for v in tvars:
            v.value.grad = None
        loss = loss_fn(y, model([x, reset], training=True), sample_weight=mask)
        loss.backward()
        grads = [v.value.grad for v in tvars]
    return float(keras.ops.convert_to_numpy(loss)), [keras.ops.convert_to_numpy(g) for g in grads]


def check_loop(keras, case, cell: str, loop: str, out: Dict[str, np.ndarray]) -> None:
    """``fwd``, ``grad`` and ``tob`` of one cell and loop (see the module doc)."""
    w, state0 = case_weights(case, cell), case_state(case, cell)
    x, y, mask, reset = (case[k] for k in ("x", "y", "mask", "reset"))
    B, T = x.shape[1:]
    model = build(keras, cell, loop, w, B, T, float(case["lr"]))
    key = f"{cell}/{loop}"
    set_state(model, state0)
    out[f"{key}/fwd/logits"] = keras.ops.convert_to_numpy(model([x[0], reset[0]]))
    out.update({f"{key}/fwd/state/{n}": s for n, s in get_state(keras, model).items()})
    set_state(model, state0)
    loss, grads = gradients(keras, model, x[0], y[0], mask[0], reset[0])
    out[f"{key}/grad/loss"] = np.float64(loss)
    out.update({f"{key}/grad/{k}": g for k, g in canonical(keras, model, cell, grads).items()})
    set_state(model, state0)
    out[f"{key}/tob/loss"] = np.array([float(model.train_on_batch([x[i], reset[i]], y[i], sample_weight=mask[i]))
                                       for i in range(len(x))])
    out.update({f"{key}/tob/w/{k}": v for k, v in canonical(keras, model, cell).items()})
    out.update({f"{key}/tob/state/{n}": s for n, s in get_state(keras, model).items()})


def check_fit_and_save(keras, case, cell: str, workdir: str, out: Dict[str, np.ndarray]) -> None:
    """``fit`` on every window as one epoch (rows of window i are batch i: shuffle off), then
    ``save``: the model saved and loaded, both run on window ``next`` (see the module doc)."""
    w, state0 = case_weights(case, cell), case_state(case, cell)
    x, y, mask, reset = (case[k] for k in ("x", "y", "mask", "reset"))
    n, B, T = x.shape
    model = build(keras, cell, "auto", w, B, T, float(case["lr"]))
    set_state(model, state0)
    flat = [a.reshape(n * B, T) for a in (x, reset, y, mask)]
    history = model.fit(flat[:2], flat[2], sample_weight=flat[3], batch_size=B, epochs=1, shuffle=False, verbose=0)
    out[f"{cell}/fit/loss"] = np.float64(history.history["loss"][0])
    out.update({f"{cell}/fit/w/{k}": v for k, v in canonical(keras, model, cell).items()})
    out.update({f"{cell}/fit/state/{k}": s for k, s in get_state(keras, model).items()})
    path = os.path.join(workdir, f"{cell}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    rnn = loaded.get_layer("rnn")
    out[f"{cell}/save/layer"] = np.array(f"{type(rnn).__name__} stateful={rnn.stateful}")
    out[f"{cell}/save/same_variables"] = np.array(all(
        np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        for a, b in zip(model.weights, loaded.weights)) and len(model.weights) == len(loaded.weights))
    for name, m in (("saved", model), ("loaded", loaded)):
        out[f"{cell}/save/{name}/logits"] = keras.ops.convert_to_numpy(m([case["next_x"], case["next_reset"]]))
        out.update({f"{cell}/save/{name}/state/{k}": s for k, s in get_state(keras, m).items()})
    rnn.reset_state()
    out[f"{cell}/save/zero_after_reset_state"] = np.array(not any(s.any() for s in get_state(keras, loaded).values()))


def check_layer_calls(keras, case, loops, out: Dict[str, np.ndarray]) -> None:
    """``ResetLSTM`` alone on the case's ``layer/*`` arrays (see the module doc)."""
    from resetbench.keras_layers import ResetLSTM

    inputs, reset = case["layer/inputs"], case["layer/reset"]
    state0 = (case["layer/h0"], case["layer/c0"])
    lw = {k: case[f"layer/{k}"] for k in ("w_x", "w_h", "b")}
    H, E = lw["w_h"].shape[0], lw["w_x"].shape[0]
    for loop in loops:
        layer = ResetLSTM(H, return_state=True, implementation=loop)
        layer.build((None, None, E))
        layer.set_canonical(**lw)
        for name, value in zip(("seq", "h", "c"), layer(inputs, reset, initial_state=state0)):
            out[f"layer/{loop}/{name}"] = keras.ops.convert_to_numpy(value)

    B, T = reset.shape

    def stateful():
        layer = ResetLSTM(H, stateful=True)
        layer.build((B, T, E))
        layer.set_canonical(**lw)
        return layer
    out["layer/stateful/whole"] = keras.ops.convert_to_numpy(
        stateful()(np.concatenate([inputs, inputs], 1), np.concatenate([reset, reset], 1)))
    layer = stateful()
    out["layer/stateful/parts"] = np.concatenate([keras.ops.convert_to_numpy(layer(inputs, reset))
                                                  for _ in range(2)], 1)


def check_adapter(out: Dict[str, np.ndarray]) -> None:
    """``backend=keras`` imported under this Keras backend: ``imported``, or the error it raised."""
    import importlib
    try:
        importlib.import_module("backends.keras_lstm")
        out["adapter"] = np.array("imported")
    except Exception as exc:  # noqa: BLE001 - the error is the result
        out["adapter"] = np.array(f"{type(exc).__name__}: {exc}")


def main(case_path: str, out_path: str, workdir: str) -> None:
    case = np.load(case_path)
    out: Dict[str, np.ndarray] = {}
    if "readme" in case.files:          # first, as in a fresh process: the example imports keras itself
        from tests.test_keras_example import readme_example
        out["readme/losses"] = np.array(readme_example(), np.float64)

    import keras
    backend = keras.backend.backend()
    out["backend"] = np.array(backend)
    loops = LOOPS.get(backend, OTHER_LOOPS)
    for cell in [str(c) for c in case["cells"]]:
        for loop in loops:
            check_loop(keras, case, cell, loop, out)
        check_fit_and_save(keras, case, cell, workdir, out)
    check_layer_calls(keras, case, loops, out)
    check_adapter(out)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
