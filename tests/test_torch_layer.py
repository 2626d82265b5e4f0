"""The reusable torch ``ResetLSTM`` module: equals nn.LSTM without resets, equals the oracle with
mid-window resets and a carried state, and carries state across windows."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends import reference as ref  # noqa: E402
from backends.base import Batch, ModelSpec  # noqa: E402
from resetbench.torch_layers import ResetLSTM  # noqa: E402
from tests.helpers import assert_close  # noqa: E402


def test_equals_nn_lstm_without_resets():
    torch.manual_seed(0)
    layer = ResetLSTM(5, 7, kernel="loop")   # the loop (fused is this very kernel when nothing resets)
    lstm = torch.nn.LSTM(5, 7, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(layer.w_x.T)
        lstm.weight_hh_l0.copy_(layer.w_h.T)
        lstm.bias_ih_l0.copy_(layer.b)
        lstm.bias_hh_l0.zero_()
    x = torch.randn(3, 6, 5)
    h0, c0 = torch.randn(3, 7), torch.randn(3, 7)
    out, (h, c) = layer(x, torch.zeros(3, 6, dtype=torch.bool), (h0, c0))
    exp, (he, ce) = lstm(x, (h0[None], c0[None]))
    assert_close(out.detach(), exp.detach(), "outputs")
    assert_close(c.detach(), ce[0].detach(), "final c")


@pytest.mark.parametrize("kernel", ["fused", "loop"])
def test_resets_match_the_oracle_and_state_carries(kernel):
    torch.manual_seed(1)
    layer = ResetLSTM(4, 6, kernel=kernel)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 10, 4)).astype(np.float32)
    reset = np.zeros((2, 10), bool)
    reset[0, 3] = reset[1, 7] = True
    h0 = rng.standard_normal((1, 2, 6)).astype(np.float32)
    c0 = rng.standard_normal((1, 2, 6)).astype(np.float32)
    # the oracle with an identity "embedding": feed x through w_x by building one-hot-free weights
    w = {"embedding": np.zeros((257, 4), np.float32), "lstm.0.w_x": layer.w_x.detach().numpy(),
         "lstm.0.w_h": layer.w_h.detach().numpy(), "lstm.0.b": layer.b.detach().numpy(),
         "head.w": np.eye(6, 257, dtype=np.float32), "head.b": np.zeros(257, np.float32)}
    ids = np.arange(20, dtype=np.int32).reshape(2, 10)
    w["embedding"][ids.reshape(-1)] = x.reshape(-1, 4)
    batch = Batch(ids, ids, np.ones((2, 10), np.float32), reset)
    logits, _, (hT, cT) = ref.forward(w, batch, (h0, c0), ModelSpec(4, 6, 1))
    out1, st = layer(torch.from_numpy(x[:, :5]), torch.from_numpy(reset[:, :5]),
                     (torch.from_numpy(h0[0]), torch.from_numpy(c0[0])))
    out2, (h, c) = layer(torch.from_numpy(x[:, 5:]), torch.from_numpy(reset[:, 5:]), st)
    out = torch.cat([out1, out2], 1).detach().numpy()
    assert_close(out, logits[..., :6], "outputs vs oracle")
    assert_close(h.detach(), hT[0], "final h")
