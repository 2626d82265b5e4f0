"""The reusable torch layers ``ResetLSTM`` and ``ResetGRU``, shaped like nn.LSTM and nn.GRU: equal
to them without resets (from their weights), equal to the oracle with mid-window resets, a carried
state and two layers (both kernels, both layouts), PyTorch's default initialization, canonical
weights in and out, and the README example."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends import reference as ref  # noqa: E402
from backends.base import Batch, ModelSpec  # noqa: E402
from resetbench.torch_layers import ResetGRU, ResetLSTM  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

LAYERS = {"lstm": (ResetLSTM, torch.nn.LSTM), "gru": (ResetGRU, torch.nn.GRU)}


def _state(cell, L, B, H, gen):
    state = tuple(torch.randn(L, B, H, generator=gen) for _ in range(2 if cell == "lstm" else 1))
    return state if cell == "lstm" else state[0]


# every (cell, kernel) the layer modules offer (their ``kernels``)
CASES = [(cell, kernel) for cell in sorted(LAYERS) for kernel in LAYERS[cell][0].kernels]


def test_a_kernel_the_cell_lacks_is_refused():
    """``cpp`` runs the LSTM only: ResetGRU names what it allows."""
    assert "cpp" in LAYERS["lstm"][0].kernels and "cpp" not in LAYERS["gru"][0].kernels
    with pytest.raises(ValueError, match="allowed fused, rewrite, bptt, loop$"):
        LAYERS["gru"][0](5, 7, kernel="cpp")


@pytest.mark.parametrize("cell,kernel", CASES)
def test_equals_torch_without_resets(cell, kernel):
    torch.manual_seed(0)
    Reset, Torch = LAYERS[cell]
    ref_layer = Torch(5, 7, num_layers=2, batch_first=True)
    layer = Reset.from_torch(ref_layer, kernel)
    assert (layer.num_layers, layer.batch_first, layer.hidden_size) == (2, True, 7)
    x = torch.randn(3, 6, 5)
    state = _state(cell, 2, 3, 7, torch.Generator().manual_seed(1))
    out, final = layer(x, torch.zeros(3, 6, dtype=torch.bool), state)
    exp, exp_final = ref_layer(x, state)
    assert_close(out.detach(), exp.detach(), "outputs")
    for got, want in zip(final if cell == "lstm" else (final,), exp_final if cell == "lstm" else (exp_final,)):
        assert got.shape == (2, 3, 7)
        assert_close(got.detach(), want.detach(), "final state")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell,kernel", CASES)
def test_resets_match_the_oracle_and_state_carries(cell, kernel, batch_first):
    """Two layers, mid-window resets, a carried state, two consecutive windows, outputs and
    gradients against the NumPy oracle (an identity 'embedding' feeds x)."""
    torch.manual_seed(1)
    Reset, _ = LAYERS[cell]
    layer = Reset(4, 6, num_layers=2, batch_first=batch_first, kernel=kernel)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 10, 4)).astype(np.float32)
    reset = np.zeros((2, 10), bool)
    reset[0, 3] = reset[1, 7] = reset[1, 8] = True
    spec = ModelSpec(4, 6, 2, cell=cell)
    state = tuple(rng.standard_normal((2, 2, 6)).astype(np.float32) for _ in spec.state_names)
    w = {"embedding": np.zeros((257, 4), np.float32), **layer.canonical(),
         "head.w": np.eye(6, 257, dtype=np.float32), "head.b": np.zeros(257, np.float32)}
    ids = np.arange(20, dtype=np.int32).reshape(2, 10)
    w["embedding"][ids.reshape(-1)] = x.reshape(-1, 4)
    logits, _, final = ref.forward(w, Batch(ids, ids, np.ones((2, 10), np.float32), reset), state, spec)

    def feed(a):                                   # [B, T, ...] -> the layer's layout
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t if batch_first else t.transpose(0, 1)
    st = tuple(torch.from_numpy(s) for s in state)
    st = st if cell == "lstm" else st[0]
    out1, st = layer(feed(x[:, :5]), feed(reset[:, :5]), st)
    out2, st = layer(feed(x[:, 5:]), feed(reset[:, 5:]), tuple(s.detach() for s in st) if cell == "lstm" else st.detach())
    out = torch.cat([out1, out2], 1 if batch_first else 0)
    out = out if batch_first else out.transpose(0, 1)
    assert_close(out.detach().numpy(), logits[..., :6], "outputs vs oracle")
    for got, want in zip(st if cell == "lstm" else (st,), final):
        assert_close(got.detach().numpy(), want, "final state")
    out2.sum().backward()                          # the gradient reaches every parameter
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("cell", sorted(LAYERS))
def test_default_initialization_and_canonical_roundtrip(cell):
    Reset, _ = LAYERS[cell]
    layer = Reset(3, 16, num_layers=2)
    bound = 16 ** -0.5
    for p in layer.parameters():                   # PyTorch's default: U(-1/sqrt(H), 1/sqrt(H)), biases too
        m = float(p.detach().abs().max())
        assert 0.5 * bound < m <= bound
    weights = layer.canonical()
    assert sorted(weights) == sorted(f"{cell}.{l}.{k}" for l in range(2) for k in layer.layer(l))
    other = Reset(3, 16, num_layers=2)
    other.load_canonical(weights)
    for a, b in zip(layer.parameters(), other.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        Reset(4, 16, num_layers=2).load_canonical(weights)


def test_readme_example_runs():
    # --- README example start ---
    import torch
    from resetbench.torch_layers import ResetGRU, ResetLSTM

    lstm = ResetLSTM(input_size=64, hidden_size=256, num_layers=2, batch_first=True)   # like nn.LSTM
    x = torch.randn(16, 32, 64)                            # 16 streams, windows of 32 steps
    reset = torch.rand(16, 32) < 0.05                      # True: this row starts a new sequence here
    out, (h, c) = lstm(x, reset)                           # out [16, 32, 256]; h, c [2, 16, 256]
    out, (h, c) = lstm(x, reset, (h.detach(), c.detach()))   # the next window: state carried per row
    gru = ResetGRU.from_torch(torch.nn.GRU(64, 128, batch_first=True))   # nn.GRU's weights, as they are
    out, h = gru(x, reset)
    # --- README example end ---
    assert out.shape == (16, 32, 128) and h.shape == (1, 16, 128)
