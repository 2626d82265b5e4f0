"""Every torch kernel option (not only the default) against the NumPy oracle: logits, gradients,
and weights after 3 SGD steps, on windows with mid-window resets and a carried state."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from backends.base import Batch, ModelSpec, OptimizerSpec  # noqa: E402
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


ADAM = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)


def _run_parity(kernel, batches, h0=None, c0=None, optimizer=SGD, B=None, padded=False):
    """Logits, state, loss, every gradient, then weights after a train step per batch: kernel
    vs the oracle, from the same weights and carried state. ``padded``: logits compared where the
    mask counts, and the state is not (the peer kernel stops each row at its length)."""
    B = B or batches[0].x.shape[0]
    w = tiny_weights(2, SPEC)
    be = make_backend("torch", SPEC, w, optimizer, B, kernel=kernel)
    orc = oracle(SPEC, w, optimizer, B)
    if h0 is not None:
        for target in (be, orc):
            target.set_state(h0, c0)
    valid = batches[0].mask.astype(bool) if padded else np.ones(batches[0].x.shape, bool)
    assert_close(be.forward(batches[0])[valid], orc.forward(batches[0])[valid], "logits")
    for got, exp, what in zip(be.get_state(), orc.get_state(), "hc"):
        if not padded:
            assert_close(got, exp, f"state {what}")
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
    return be


def test_fused_plan_edge_cases():
    """The fused kernel's window rewrite on awkward reset patterns: adjacent resets, a reset in
    the last column, a row resetting at every step, resets at columns 0 and 1, rows without."""
    B, T = 5, 7
    reset = np.zeros((B, T), bool)
    reset[0, [2, 3]] = True            # adjacent
    reset[1, T - 1] = True             # last column
    reset[2, :] = True                 # every step (K = T - 1 for this row)
    reset[3, [0, 1]] = True            # column 0 (initial state) and 1
    rng = np.random.default_rng(40)
    batches = [Batch(rng.integers(0, 257, (B, T)).astype(np.int32), rng.integers(0, 257, (B, T)).astype(np.int32),
                     np.ones((B, T), np.float32), reset.copy()) for _ in range(3)]
    batches[2].mask[4, 5:] = 0.0
    _run_parity("fused", batches, *random_state(41, SPEC, B), optimizer=ADAM)


def test_native_matches_oracle_without_mid_window_resets():
    B, T = 4, 8
    rng = np.random.default_rng(42)
    batches = []
    for k in range(3):
        reset = np.zeros((B, T), bool)
        reset[k % B, 0] = True                                  # some rows start fresh, others carry
        mask = np.ones((B, T), np.float32)
        mask[1, T - 3:] = 0.0
        batches.append(Batch(rng.integers(0, 257, (B, T)).astype(np.int32),
                             rng.integers(0, 257, (B, T)).astype(np.int32), mask, reset))
    be = _run_parity("native", batches, *random_state(43, SPEC, B), optimizer=ADAM)
    assert be.kernel == "torch.native.nn_LSTM"
    with pytest.raises(ValueError, match="mid-window"):
        be.train_step(mid_reset_batches(44, B=B, T=T)[0])


def _padded_batch(rng, lengths, T):
    B = len(lengths)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    reset = np.zeros((B, T), bool)
    reset[:, 0] = True
    return Batch(rng.integers(0, 257, (B, T)).astype(np.int32), rng.integers(0, 257, (B, T)).astype(np.int32),
                 mask, reset)


def test_peer_packed_sequence_matches_oracle_on_padded_batches():
    rng = np.random.default_rng(45)
    batches = [_padded_batch(rng, lengths, 9) for lengths in ([9, 3, 6, 1], [2, 9, 9, 5], [4, 7, 9, 8])]
    be = _run_parity("peer", batches, optimizer=ADAM, padded=True)
    assert be.kernel == "torch.peer.pack_padded_sequence"
    # the state left is each row's state after its last valid token: the oracle on that prefix
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


def test_peer_refuses_other_layouts():
    rng = np.random.default_rng(46)
    be = make_backend("torch", SPEC, tiny_weights(0, SPEC), SGD, 3, kernel="peer")
    carried = _padded_batch(rng, [5, 5, 2], 5)
    carried.reset[1, 0] = False
    holes = _padded_batch(rng, [5, 5, 2], 5)
    holes.mask[0, 2] = 0.0
    mid = _padded_batch(rng, [5, 5, 2], 5)
    mid.reset[2, 3] = True
    for batch, why in ((carried, "carries state"), (holes, "not a prefix"), (mid, "mid-window")):
        with pytest.raises(ValueError, match=why):
            be.train_step(batch)


def test_row_groups_split_off_busy_rows_only_when_it_pays():
    from backends.torch_lstm import row_groups
    reset = np.zeros((8, 32), bool)
    assert [g.tolist() for g in row_groups(reset)] == [list(range(8))]          # nothing resets
    reset[3, 1:20] = True                                                      # one busy row
    groups = row_groups(reset)
    assert [g.tolist() for g in groups] == [[0, 1, 2, 4, 5, 6, 7], [3]]
    even = np.zeros((8, 32), bool)
    even[:, 5] = True                                                          # same count everywhere
    assert len(row_groups(even)) == 1
    few = np.zeros((8, 32), bool)
    few[0, 4] = True                                                           # saves < 5% of slots
    assert len(row_groups(few)) == 1
