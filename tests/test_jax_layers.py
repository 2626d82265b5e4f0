"""The JAX layers for users: flax modules ``ResetLSTM`` and ``ResetGRU`` taking ``(inputs, resets)``
equal the NumPy oracle (forward and gradients, two consecutive windows with mid-window resets and
a carried state) inside ``jax.jit``; and the README example."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402

from backends import reference as ref  # noqa: E402
from backends.base import Batch, ModelSpec  # noqa: E402
from resetbench import jax_layers  # noqa: E402
from tests.helpers import assert_close  # noqa: E402


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_flax_module_matches_the_oracle(cell):
    Module = jax_layers.ResetLSTM if cell == "lstm" else jax_layers.ResetGRU
    layer = Module(features=6)
    rng = np.random.default_rng(0)
    B, T, F = 2, 10, 4
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    reset = np.zeros((B, T), bool)
    reset[0, 3] = reset[1, 7] = True
    spec = ModelSpec(F, 6, 1, cell=cell)
    state = tuple(rng.standard_normal((B, 6)).astype(np.float32) for _ in spec.state_names)
    init_state = state if cell == "lstm" else state[0]
    params = layer.init(jax.random.PRNGKey(0), x, reset, init_state)
    # the oracle with an identity "embedding": row k of the embedding is input k
    w = {"embedding": np.zeros((257, F), np.float32), "head.w": np.eye(6, 257, dtype=np.float32),
         "head.b": np.zeros(257, np.float32)}
    w.update({f"{cell}.0.{k}": np.asarray(v) for k, v in params["params"].items()})
    ids = np.arange(B * T, dtype=np.int32).reshape(B, T)
    w["embedding"][ids.reshape(-1)] = x.reshape(-1, F)
    batch = Batch(ids, ids, np.ones((B, T), np.float32), reset)
    logits, cache, final = ref.forward(w, batch, tuple(s[None] for s in state), spec)

    @jax.jit
    def run(params, x, reset, s):
        out1, s = layer.apply(params, x[:, :5], reset[:, :5], s)
        out2, s = layer.apply(params, x[:, 5:], reset[:, 5:], s)
        return jnp.concatenate([out1, out2], 1), s
    out, got = run(params, x, reset, init_state)
    assert_close(np.asarray(out), logits[..., :6], "outputs vs oracle")
    for g, e in zip(got if cell == "lstm" else (got,), final):
        assert_close(np.asarray(g), e[0], "final state")
    # gradients: the masked-mean cross-entropy of the outputs (the oracle's head is the identity
    # onto the first 6 of 257 logits), against the oracle's BPTT
    y = rng.integers(0, 257, (B, T)).astype(np.int32)

    def loss(p):
        out, _ = run(p, x, reset, init_state)
        logit = jnp.concatenate([out, jnp.zeros((B, T, 257 - 6))], -1)
        return jnp.mean(jax.nn.logsumexp(logit, -1) - jnp.take_along_axis(logit, y[..., None], -1)[..., 0])
    grads = jax.grad(loss)(params)["params"]
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    batch = Batch(ids, y, np.ones((B, T), np.float32), reset)
    logits, cache, _ = ref.forward(w64, batch, tuple(s[None].astype(np.float64) for s in state), spec)
    _, probs = ref.cross_entropy(logits, y)
    exp = ref.backward(w64, batch, cache, probs, spec)
    for k, g in grads.items():
        assert_close(np.asarray(g), exp[f"{cell}.0.{k}"], f"gradient of {k}")


def test_readme_example_runs():
    # --- README example start ---
    import jax
    import numpy as np
    from resetbench.jax_layers import ResetGRU

    layer = ResetGRU(features=128)                          # a flax linen module; ResetLSTM alike
    x = np.random.randn(16, 32, 64).astype(np.float32)      # 16 streams, windows of 32 steps
    resets = np.random.rand(16, 32) < 0.05                  # True: this row starts a new sequence here
    params = layer.init(jax.random.PRNGKey(0), x, resets)
    out, h = jax.jit(layer.apply)(params, x, resets)        # out [16, 32, 128], h [16, 128]
    out, h = layer.apply(params, x, resets, h)              # the next window: state carried per row
    # --- README example end ---
    assert out.shape == (16, 32, 128) and h.shape == (16, 128)
