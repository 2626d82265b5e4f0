"""The NumPy oracle's backward equals central finite differences (float64), on a batch with a
mid-window reset, a carried state from a previous window, padding, and two stacked layers."""

from __future__ import annotations

import numpy as np
import pytest

from backends import reference as ref
from backends.base import ModelSpec
from tests.helpers import mid_reset_batches, random_state, tiny_weights

SPEC = ModelSpec(embed=3, hidden=4, layers=2)


@pytest.mark.parametrize("window", [0, 1, 2])
def test_backward_matches_finite_differences(window):
    w = {k: v.astype(np.float64) for k, v in tiny_weights(0, SPEC).items()}
    batches = mid_reset_batches(21, B=3, T=6)
    h, c = random_state(22, SPEC, 3)
    h, c = h.astype(np.float64), c.astype(np.float64)
    # carry the state of the earlier windows, as training would
    for b in batches[:window]:
        _, _, (h, c) = ref.forward(w, b, (h, c), SPEC)
    batch = batches[window]
    assert batch.reset[:, 1:].any(), "the batch needs a mid-window reset"
    assert np.abs(h).max() > 0.01, "the batch needs a carried (non-zero) state"
    logits, cache, _ = ref.forward(w, batch, (h, c), SPEC)
    _, probs = ref.cross_entropy(logits, batch.y)
    grads = ref.backward(w, batch, cache, probs, SPEC)
    rng = np.random.default_rng(window)
    eps = 1e-6
    for key, value in w.items():
        flat = value.reshape(-1)
        idx = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        if key == "embedding":  # probe rows that occur in the batch
            rows = np.unique(batch.x)[:4]
            idx = np.concatenate([rows * value.shape[1] + j for j in range(value.shape[1])])
        for i in idx:
            old = flat[i]
            flat[i] = old + eps
            up = ref.loss_fn(w, batch, (h, c), SPEC)
            flat[i] = old - eps
            down = ref.loss_fn(w, batch, (h, c), SPEC)
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            analytic = grads[key].reshape(-1)[i]
            assert abs(numeric - analytic) <= 1e-7 + 1e-5 * abs(numeric), (key, int(i), numeric, analytic)


def test_loss_of_all_padding_batch_is_zero_with_zero_gradient():
    w = {k: v.astype(np.float64) for k, v in tiny_weights(0, SPEC).items()}
    batch = mid_reset_batches(23, B=2, T=4)[0]
    batch.mask[:] = 0
    h = np.zeros((SPEC.layers, 2, SPEC.hidden))
    logits, cache, _ = ref.forward(w, batch, (h, h), SPEC)
    ce, probs = ref.cross_entropy(logits, batch.y)
    assert ref.masked_mean(ce, batch.mask) == 0.0
    assert all(not g.any() for g in ref.backward(w, batch, cache, probs, SPEC).values())


def test_cross_entropy_matches_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 257)) * 5
    y = rng.integers(0, 257, size=(2, 3))
    ce, probs = ref.cross_entropy(logits, y)
    direct = -np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(ce, np.take_along_axis(direct, y[..., None], -1)[..., 0], rtol=1e-10)
    np.testing.assert_allclose(probs.sum(-1), 1.0)
