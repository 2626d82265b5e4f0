"""The baseline kernels every backend declares (``baseline_kernels``: ``native``, the framework's
own no-reset LSTM; ``peer``, its variable-length path) against the NumPy oracle on the layouts
they accept, their refusal of every other layout, and their evaluation (which must be exact on
packed eval streams). Parametrized over ``conf/backend/*.yaml``: a backend that declares a
baseline kernel gets these tests. Model: 2 layers; Adam with clipping, 3 steps."""

from __future__ import annotations

import numpy as np
import pytest

from backends.base import Batch, ModelSpec, OptimizerSpec
from benchmarks import registry
from tests import helpers
from tests.helpers import assert_close, backend_names, mid_reset_batches, oracle, random_state

SPEC = ModelSpec(embed=6, hidden=8, layers=2)
ADAM = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)


def _declaring(kernel):
    return [b for b in backend_names()
            if kernel in registry.kernel_options(registry.backend_configs()[b])["baseline"]]


def _ids(rng, B, T):
    return rng.integers(0, 257, (B, T)).astype(np.int32)


def padded_batch(rng, lengths, T):
    """A ``strategy=padded`` batch: every row fresh at column 0, mask a prefix of ``length`` ones."""
    B = len(lengths)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    reset = np.zeros((B, T), bool)
    reset[:, 0] = True
    return Batch(_ids(rng, B, T), _ids(rng, B, T), mask, reset)


def check_parity(backend, kernel, batches, h0=None, c0=None, padded=False):
    return helpers.check_parity(backend, kernel, SPEC, batches, h0, c0, ADAM, padded)


def check_exact_eval(be, B, h0, c0):
    """``eval_step`` is exact on windows with mid-window resets (the packed eval streams)."""
    mid = mid_reset_batches(44, B=B, T=8)[0]
    orc = oracle(SPEC, be.get_weights(), ADAM, B)
    for target in (be, orc):
        target.set_state(h0, c0)
    assert_close(be.eval_step(mid), orc.eval_step(mid), "eval loss sum (mid-window resets)")


@pytest.mark.parametrize("backend", _declaring("native"))
def test_native_matches_oracle_without_mid_window_resets(backend):
    B, T = 4, 8
    rng = np.random.default_rng(42)
    batches = []
    for k in range(3):
        reset = np.zeros((B, T), bool)
        reset[k % B, 0] = True                       # some rows start fresh, the others carry
        if k == 1:
            reset[(k + 2) % B, 0] = True
        mask = np.ones((B, T), np.float32)
        mask[1, T - 3:] = 0.0                        # padding in the mask
        batches.append(Batch(_ids(rng, B, T), _ids(rng, B, T), mask, reset))
    h0, c0 = random_state(43, SPEC, B)               # a carried, non-zero state
    be, orc = check_parity(backend, "native", batches, h0, c0)
    assert ".native." in be.kernel
    for got, exp, what in zip(be.get_state(), orc.get_state(), "hc"):
        assert_close(got, exp, f"state {what} after training", rtol=5e-4, atol_scale=5e-5)
    # a mid-window reset is refused before anything runs, in every entry point
    mid = mid_reset_batches(44, B=B, T=T)[0]
    weights = be.get_weights()
    for call in (be.train_step, be.gradients, be.forward):
        with pytest.raises(ValueError, match="mid-window"):
            call(mid)
    np.testing.assert_array_equal(be.get_weights()["lstm.1.w_h"], weights["lstm.1.w_h"])
    check_exact_eval(be, B, h0, c0)


@pytest.mark.parametrize("backend", _declaring("peer"))
def test_peer_matches_oracle_on_padded_batches_and_refuses_other_layouts(backend):
    rng = np.random.default_rng(45)
    batches = [padded_batch(rng, lengths, 9) for lengths in ([9, 3, 6, 1], [2, 9, 9, 5], [4, 7, 9, 8])]
    be, _ = check_parity(backend, "peer", batches, padded=True)
    assert ".peer." in be.kernel
    # the state left is each row's state after its last valid token: the oracle on that prefix
    # (the only check that sees a missing mask: on right-padded rows loss and gradients do not)
    last = batches[-1]
    orc = oracle(SPEC, be.get_weights(), ADAM, 4)
    be.forward(last)
    h, c = be.get_state()
    for row, n in enumerate(last.mask.sum(1).astype(int)):
        orc.reset_state(1)
        orc.forward(Batch(last.x[row:row + 1, :n], last.y[row:row + 1, :n], last.mask[row:row + 1, :n],
                          last.reset[row:row + 1, :n]))
        assert_close(h[:, row], orc.get_state()[0][:, 0], f"peer h of row {row}")
        assert_close(c[:, row], orc.get_state()[1][:, 0], f"peer c of row {row}")
    # anything but the padded layout is refused
    carried = padded_batch(rng, [4, 5, 5, 2], 5)
    carried.reset[1, 0] = False
    holes = padded_batch(rng, [4, 5, 5, 2], 5)
    holes.mask[0, 2] = 0.0
    mid = padded_batch(rng, [4, 5, 5, 2], 5)
    mid.reset[2, 3] = True
    for batch, why in ((carried, "carries state"), (holes, "not a prefix"), (mid, "mid-window")):
        for call in (be.train_step, be.gradients):
            with pytest.raises(ValueError, match=why):
                call(batch)
    check_exact_eval(be, 4, *random_state(47, SPEC, 4))
