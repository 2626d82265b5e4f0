"""Every torch kernel option (not only the default) against the NumPy oracle: logits, gradients,
and weights after 3 SGD steps, on windows with mid-window resets and a carried state."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from backends.base import ModelSpec, OptimizerSpec  # noqa: E402
from tests.helpers import assert_close, make_backend, mid_reset_batches, oracle, random_state, tiny_weights  # noqa: E402

SPEC = ModelSpec(embed=6, hidden=8, layers=2)
SGD = OptimizerSpec("sgd", lr=0.5)


@pytest.mark.parametrize("kernel", ["script", "compile"])
def test_kernel_matches_oracle(kernel):
    w = tiny_weights(0, SPEC)
    batches = mid_reset_batches(30, B=3, T=6)
    be = make_backend("torch", SPEC, w, SGD, 3, kernel=kernel)
    assert be.kernel == f"torch.{kernel}"
    orc = oracle(SPEC, w, SGD, 3)
    be.precompile([(3, 6)], [(3, 6)])
    np.testing.assert_array_equal(be.get_weights()["lstm.0.w_h"], w["lstm.0.w_h"])  # precompile changed nothing
    h0, c0 = random_state(31, SPEC, 3)
    for target in (be, orc):
        target.set_state(h0, c0)
    assert_close(be.forward(batches[0]), orc.forward(batches[0]), "logits")
    loss, grads = be.gradients(batches[1])
    loss_ref, grads_ref = orc.gradients(batches[1])
    assert_close(loss, loss_ref, "loss")
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], f"grad {k}")
    for b in batches:
        assert_close(float(be.train_step(b)), orc.train_step(b), "train loss")
    got, exp = be.get_weights(), orc.get_weights()
    for k in exp:
        assert_close(got[k], exp[k], f"weights {k}", rtol=5e-4, atol_scale=5e-5)
