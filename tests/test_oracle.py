"""The NumPy oracle's backward equals central finite differences (float64), on a batch with a
mid-window reset, a carried state from a previous window, padding, and two stacked layers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backends import reference as ref
from backends.base import ModelSpec
from backends.cells import cell_names
from tests.helpers import mid_reset_batches, random_state, tiny_weights

SPEC = ModelSpec(embed=3, hidden=4, layers=2)
CELLS = cell_names()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("window", [0, 1, 2])
def test_backward_matches_finite_differences(window, cell):
    spec = dataclasses.replace(SPEC, cell=cell)
    w = {k: v.astype(np.float64) for k, v in tiny_weights(0, spec).items()}
    batches = mid_reset_batches(21, B=3, T=6)
    state = tuple(s.astype(np.float64) for s in random_state(22, spec, 3))
    # carry the state of the earlier windows, as training would
    for b in batches[:window]:
        _, _, state = ref.forward(w, b, state, spec)
    batch = batches[window]
    assert batch.reset[:, 1:].any(), "the batch needs a mid-window reset"
    assert np.abs(state[0]).max() > 0.01, "the batch needs a carried (non-zero) state"
    logits, cache, _ = ref.forward(w, batch, state, spec)
    _, probs = ref.cross_entropy(logits, batch.y)
    grads = ref.backward(w, batch, cache, probs, spec)
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
            up = ref.loss_fn(w, batch, state, spec)
            flat[i] = old - eps
            down = ref.loss_fn(w, batch, state, spec)
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


def test_oracle_adapter_kernel_and_declared_facts():
    """NumpyBackend takes ``kernel="loop"`` (its one kernel, conf/backend/numpy.yaml); built directly
    it reads its kernel's facts from that declaration; any other kernel is a ConfigError, also one
    the registry would pass along (the adapter dispatches on the names it implements)."""
    from backends.base import ConfigError, OptimizerSpec
    from benchmarks import registry

    w, opt = tiny_weights(0, SPEC), OptimizerSpec("sgd", lr=0.1)
    be = ref.NumpyBackend(SPEC, w, opt, 3)
    assert (be.kernel_option, be.eval_kernel, be.needs) == ("loop", "loop", ())
    built = registry.build_backend(registry.backend_configs()["numpy"], SPEC, w, opt, 3)
    assert (built.kernel_option, built.eval_kernel, built.needs, built.kernel) == ("loop", "loop", (), "numpy.loop")
    with pytest.raises(ConfigError, match="backend.kernel='fused': allowed for backend=numpy: loop"):
        ref.NumpyBackend(SPEC, w, opt, 3, kernel="fused")
    with pytest.raises(ConfigError, match="backend.kernel='fused': allowed for backend=numpy: loop"):
        ref.NumpyBackend(SPEC, w, opt, 3, kernel="fused", eval_kernel="loop", needs=())


def test_needs_are_checked_on_every_training_batch():
    """A kernel's ``needs`` (given by the registry) are checked by Backend.check_batch before the
    batch is used; evaluation, which runs the exact eval kernel, is not refused."""
    from backends.base import OptimizerSpec

    batch = mid_reset_batches(23, B=3, T=6)[0]
    be = ref.NumpyBackend(SPEC, tiny_weights(0, SPEC), OptimizerSpec("sgd", lr=0.1), 3, kernel="loop",
                          eval_kernel="loop", needs=("no_mid_reset",))
    for call in (be.forward, be.gradients, be.train_step):
        with pytest.raises(ValueError, match=r"backend.kernel=loop needs no_mid_reset: a row resets mid-window"):
            call(batch)
    assert np.isfinite(be.eval_step(batch))


def test_an_adapter_without_a_declaration_must_be_given_its_facts():
    from backends.base import ConfigError, OptimizerSpec

    class Nowhere(ref.NumpyBackend):
        name = "nowhere"

    w, opt = tiny_weights(0, SPEC), OptimizerSpec("sgd", lr=0.1)
    with pytest.raises(ConfigError, match="backend='nowhere': has no conf/backend file"):
        Nowhere(SPEC, w, opt, 2)
    assert Nowhere(SPEC, w, opt, 2, eval_kernel="loop", needs=()).eval_kernel == "loop"
