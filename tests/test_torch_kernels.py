"""Every torch kernel option (not only the default) against the NumPy oracle: logits, gradients,
and weights after 3 SGD steps, on windows with mid-window resets and a carried state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")

from backends.base import Batch, ModelSpec, OptimizerSpec  # noqa: E402
from benchmarks import registry  # noqa: E402
from tests.helpers import check_parity, make_backend, mid_reset_batches, random_state, tiny_weights  # noqa: E402

SPEC = ModelSpec(embed=6, hidden=8, layers=2)
SGD = OptimizerSpec("sgd", lr=0.5)


# every cell the compile kernel declares (conf/backend/torch.yaml)
CELLS = tuple(registry.kernel_decls(registry.backend_configs()["torch"])["compile"].cells)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", ["compile"])
def test_kernel_matches_oracle(kernel, cell):
    """The slow-to-build kernels on one shape (compile: minutes per shape, so not in the shared
    conformance suite); precompile builds the graphs without touching weights or state."""
    spec = dataclasses.replace(SPEC, cell=cell)

    def prepare(be):
        w = be.get_weights()[f"{cell}.0.w_h"].copy()
        be.precompile([(3, 6)], [(3, 6)])
        np.testing.assert_array_equal(be.get_weights()[f"{cell}.0.w_h"], w)
    be, _ = check_parity("torch", kernel, spec, mid_reset_batches(30, B=3, T=6), random_state(31, spec, 3),
                         prepare=prepare)
    assert be.kernel == f"torch.{kernel}"


ADAM = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)


@pytest.mark.parametrize("cell", CELLS)
def test_fused_plan_edge_cases(cell):
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
    spec = dataclasses.replace(SPEC, cell=cell)
    check_parity("torch", "fused", spec, batches, random_state(41, spec, B), optimizer=ADAM)


def test_baseline_kernel_names():
    w = tiny_weights(0, SPEC)
    assert make_backend("torch", SPEC, w, SGD, 2, kernel="native").kernel == "torch.native.nn_LSTM"
    gru = dataclasses.replace(SPEC, cell="gru")
    assert make_backend("torch", gru, tiny_weights(0, gru), SGD, 2, kernel="native").kernel == "torch.native.nn_GRU"
    assert make_backend("torch", SPEC, w, SGD, 2, kernel="peer").kernel == "torch.peer.pack_padded_sequence"


def test_row_groups_split_off_busy_rows_only_when_it_pays():
    from resetbench.torch_layers import row_groups
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
