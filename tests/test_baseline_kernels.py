"""The baseline kernels every backend declares (role ``native``: the framework's own no-reset
LSTM; role ``peer``: its variable-length path) against the NumPy oracle on the layouts they
accept, their refusal of every other layout, and their evaluation (which must be exact on packed
eval streams). Parametrized over the kernels with those roles in ``conf/backend/*.yaml``: a
backend that declares a baseline kernel gets these tests. Model: 2 layers; Adam with clipping, 3 steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backends.base import Batch, ModelSpec, OptimizerSpec
from benchmarks import registry
from tests import helpers
from tests.helpers import assert_close, backend_names, mid_reset_batches, oracle, random_state

SPEC = ModelSpec(embed=6, hidden=8, layers=2)
ADAM = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)


def _declaring(role):
    """``"backend:kernel:cell"`` for every kernel with ``role`` that a (non-oracle) backend
    declares, and every cell it runs."""
    return [f"{b}:{name}:{cell}" for b in backend_names()
            for name, decl in registry.kernel_decls(registry.backend_configs()[b]).items() if decl.role == role
            for cell in decl.cells]


def _ids(rng, B, T):
    return rng.integers(0, 257, (B, T)).astype(np.int32)


def padded_batch(rng, lengths, T):
    """A ``strategy=padded`` batch: every row fresh at column 0, mask a prefix of ``length`` ones."""
    B = len(lengths)
    mask = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    reset = np.zeros((B, T), bool)
    reset[:, 0] = True
    return Batch(_ids(rng, B, T), _ids(rng, B, T), mask, reset)


def _split(variant):
    backend, kernel, cell = variant.split(":")
    return backend, kernel, dataclasses.replace(SPEC, cell=cell)


def check_exact_eval(be, spec, B, state):
    """``eval_step`` is exact on windows with mid-window resets (the packed eval streams)."""
    mid = mid_reset_batches(44, B=B, T=8)[0]
    orc = oracle(spec, be.get_weights(), ADAM, B)
    for target in (be, orc):
        target.set_state(*state)
    assert_close(be.eval_step(mid), orc.eval_step(mid), "eval loss sum (mid-window resets)")


@pytest.mark.parametrize("variant", _declaring("native"))
def test_native_matches_oracle_without_mid_window_resets(variant):
    backend, kernel, spec = _split(variant)
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
    state = random_state(43, spec, B)                # a carried, non-zero state
    be, orc = helpers.check_parity(backend, kernel, spec, batches, state, ADAM)
    for got, exp, what in zip(be.get_state(), orc.get_state(), spec.state_names):
        assert_close(got, exp, f"state {what} after training", rtol=5e-4, atol_scale=5e-5)
    # a mid-window reset is refused before anything runs, in every entry point
    mid = mid_reset_batches(44, B=B, T=T)[0]
    weights = be.get_weights()
    for call in (be.train_step, be.gradients, be.forward):
        with pytest.raises(ValueError, match="mid-window"):
            call(mid)
    np.testing.assert_array_equal(be.get_weights()[f"{spec.cell}.1.w_h"], weights[f"{spec.cell}.1.w_h"])
    check_exact_eval(be, spec, B, state)


@pytest.mark.parametrize("variant", _declaring("peer"))
def test_peer_matches_oracle_on_padded_batches_and_refuses_other_layouts(variant):
    backend, kernel, spec = _split(variant)
    rng = np.random.default_rng(45)
    batches = [padded_batch(rng, lengths, 9) for lengths in ([9, 3, 6, 1], [2, 9, 9, 5], [4, 7, 9, 8])]
    be, _ = helpers.check_parity(backend, kernel, spec, batches, None, ADAM, padded=True)
    # the state left is each row's state after its last valid token: the oracle on that prefix
    # (the only check that sees a missing mask: on right-padded rows loss and gradients do not)
    last = batches[-1]
    orc = oracle(spec, be.get_weights(), ADAM, 4)
    be.forward(last)
    state = be.get_state()
    for row, n in enumerate(last.mask.sum(1).astype(int)):
        orc.reset_state(1)
        orc.forward(Batch(last.x[row:row + 1, :n], last.y[row:row + 1, :n], last.mask[row:row + 1, :n],
                          last.reset[row:row + 1, :n]))
        for got, exp, what in zip(state, orc.get_state(), spec.state_names):
            assert_close(got[:, row], exp[:, 0], f"peer {what} of row {row}")
    # a batch without a layout property the kernel declares in ``needs`` is refused, naming it
    needs = registry.kernel_decl(registry.backend_configs()[backend], kernel).needs
    assert needs, f"{variant}: a peer kernel consumes padded batches only, so it needs layout properties"
    for prop in needs:
        batch = padded_batch(rng, [4, 5, 5, 2], 5)
        why = lacking(batch, prop)
        for call in (be.train_step, be.gradients):
            with pytest.raises(ValueError, match=f"needs {prop}: .*{why}"):
                call(batch)
    check_exact_eval(be, spec, 4, random_state(47, spec, 4))


def lacking(batch, prop):
    """``batch`` (a padded one) changed to lack layout property ``prop``, and what its refusal says."""
    if prop == "fresh_rows":
        batch.reset[1, 0] = False
        return "carries state"
    if prop == "prefix_mask":
        batch.mask[0, 2] = 0.0
        return "not a prefix"
    if prop == "no_mid_reset":
        batch.reset[2, 3] = True
        return "mid-window"
    raise KeyError(prop)


def test_every_layout_property_can_be_broken_here():
    """:func:`lacking` covers every property a strategy guarantees (so the refusals above see each),
    and :func:`backends.base.check_layout` refuses each such batch."""
    from backends.base import check_layout
    for prop in registry.layout_properties():
        batch = padded_batch(np.random.default_rng(0), [4, 5, 5, 2], 5)
        check_layout(batch, [prop], "k")
        why = lacking(batch, prop)
        with pytest.raises(ValueError, match=f"backend.kernel=k needs {prop}: .*{why}"):
            check_layout(batch, [prop], "k")
