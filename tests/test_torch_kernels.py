"""Every torch kernel option (not only the default) against the NumPy oracle: logits, gradients,
and weights after 3 SGD steps, on windows with mid-window resets and a carried state."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")

from backends.base import Batch, ModelSpec, OptimizerSpec  # noqa: E402
from benchmarks import registry  # noqa: E402
from tests.helpers import (assert_close, check_parity, layer_case, make_backend, mid_reset_batches, random_state,  # noqa: E402
                           tiny_weights)

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


def test_balanced_plan_packs_rows_to_the_mean_and_keeps_every_token():
    """:class:`FusedPlan` with ``balance``: middles leave a busy row, the window is ``T + ceil(resets
    / B)`` steps where the pieces pack, every token has its own slot, a zeroing step precedes
    every piece that does not start its row, each row starts with its own first piece and ends
    with its own last piece (then only hold steps)."""
    from resetbench.torch_layers import FusedPlan
    rng = np.random.default_rng(7)
    busy = np.zeros((8, 32), bool)
    busy[3, 1:20] = True                                     # one busy row: 19 resets, 18 middles
    busy[[0, 1, 2, 4, 5, 6, 7], 9] = True                   # the others: one each (33 steps, room for middles)
    cases = [busy] + [rng.random((B, T)) < d for B, T, d in ((32, 64, 0.03), (32, 64, 0.3), (5, 9, 0.6))]
    for reset in cases:
        B, T = reset.shape
        resets = int(reset[:, 1:].sum())
        plan, plain = FusedPlan(reset), FusedPlan(reset, balance=False)
        assert plain.T2 == T + plain.K and plain.moved == 0
        assert T + max(-(-resets // B), 1) <= plan.T2 <= plain.T2
        flat = plan.flat.reshape(B, T)
        assert len(set(plan.flat.tolist())) == B * T                         # one slot per token
        row, col = np.divmod(flat, plan.T2)
        assert (row[:, 0] == np.arange(B)).all() and (col[:, 0] == 0).all()   # own first piece first
        assert (row[:, -1] == np.arange(B)).all() and (plan.last == flat[:, -1]).all()
        starts = reset.copy()
        starts[:, 0] = False
        new_piece = np.zeros_like(starts)
        new_piece[:, 1:] = (row[:, 1:] != row[:, :-1]) | (col[:, 1:] != col[:, :-1] + 1)
        assert (new_piece == starts).all()                 # pieces are contiguous, and split only at resets
        z = plan.zeroing.reshape(-1)
        assert (z[flat[starts]] == 0).all() and (z[flat[starts] - 1] == 1).all()
        assert z.sum() == starts.sum() and (plan.hold.reshape(-1)[plan.flat] == 0).all()
        for b in range(B):                                  # after a row's last token: hold steps only
            end = plan.last[b] - b * plan.T2
            assert (plan.hold[b, end + 1:] == 1).all() and (plan.zeroing[b, end + 1:] == 0).all()
    # the mean row is 32 + ceil(26 / 8) = 36, but the 18 middles (1 token + 1 zeroing step each) then
    # need 8 moves and seven rows with 3 free steps take one each; at 37, 7 moves into 2 each fit
    plan = FusedPlan(busy)
    assert (plan.T2, plan.moved) == (37, 7)


def _float64_layers(cell: str, B: int, E: int, H: int, L: int, seed: int):
    import torch
    from resetbench.torch_layers import CELLS
    g = torch.Generator().manual_seed(seed)
    G = CELLS[cell].gates * H
    layers = []
    for layer in range(L):
        shapes = {"w_x": (E if layer == 0 else H, G), "w_h": (H, G)}
        shapes.update({"b": (G,)} if cell == "lstm" else {"b_x": (G,), "b_h": (G,)})
        layers.append({k: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
                       for k, s in shapes.items()})
    state = tuple((torch.randn(L, B, H, generator=g, dtype=torch.float64) * 2).requires_grad_()
                  for _ in range(2 if cell == "lstm" else 1))
    return layers, state


def _outputs_and_gradients(fn, x, state, layers, seed):
    import torch
    out, final = fn()
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    loss = loss + sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in final)
    params = [x, *state] + [p for layer in layers for p in layer.values()]
    return [out, *final] + list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("plan", ["cut_everywhere", "default", "never_cut", "short_calls", "unbalanced"])
def test_rewrite_and_bptt_match_the_loop_for_every_plan(cell, plan):
    """The rewrite (``fused`` where a fused op exists) and ``bptt`` against the loop kernel in
    float64 (outputs, final state, every gradient incl. the carried state's), on windows with
    resets at column 0, adjacent, in the last column, at every step, and densities up to 0.7,
    two layers; each plan of time chunks, balanced or not, is exercised (the plan must never change
    the result), so a wrong chunk boundary or hold step fails."""
    import torch
    from resetbench.torch_bptt import layers_bptt
    from resetbench.torch_layers import layers_loop, layers_rewrite, time_chunks
    options = {"cut_everywhere": dict(call_cost=0.0), "default": {}, "never_cut": dict(call_cost=1e9),
               "short_calls": dict(max_steps=3), "unbalanced": dict(balance=False)}[plan]
    B, T, E, H = 6, 17, 5, 4
    layers, state = _float64_layers(cell, B, E, H, 2, seed=50)
    rng = np.random.default_rng(51)
    windows = [rng.random((B, T)) < d for d in (0.05, 0.3, 0.7)]
    edge = np.zeros((B, T), bool)
    edge[0, [2, 3]] = True
    edge[1, T - 1] = True
    edge[2, :] = True
    edge[3, [0, 1]] = True
    windows.append(edge)
    chunked = plan not in ("cut_everywhere", "short_calls")
    for reset in windows:
        x = torch.from_numpy(rng.standard_normal((B, T, E))).requires_grad_()
        if plan in ("cut_everywhere", "short_calls"):
            chunked |= len(time_chunks(reset, options.get("call_cost", 3.0), options.get("max_steps", 64))) > 1
        want = _outputs_and_gradients(lambda: layers_loop(cell, x, torch.from_numpy(reset), state, layers),
                                      x, state, layers, 52)
        for name, fn in (("rewrite", lambda: layers_rewrite(cell, x, reset, state, layers, **options)),
                         ("bptt", lambda: layers_bptt(cell, x, torch.from_numpy(reset), state, layers))):
            got = _outputs_and_gradients(fn, x, state, layers, 52)
            for k, (a, b) in enumerate(zip(got, want)):
                np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-9, atol=1e-11,
                                           err_msg=f"{name} {plan}: tensor {k}")
    assert chunked, "the plan never cut a window: the test would not exercise chunks"


@pytest.mark.parametrize("balance", [True, False])
def test_time_chunks_is_the_cheapest_plan(balance):
    """The dynamic programme against brute force over every set of cut columns (T = 9), with the
    balanced plan's chunk length (``ceil`` of the resets over the rows) and the unbalanced one's
    (the busiest row's resets)."""
    import itertools
    from resetbench.torch_layers import time_chunks
    rng = np.random.default_rng(53)

    def cost(reset, chunks, call_cost, max_steps):
        total = 0.0
        for s, e in chunks:
            inside = reset[:, s + 1:e]
            k = -(-int(inside.sum()) // reset.shape[0]) if balance else int(inside.sum(axis=1).max(initial=0))
            if e - s + k > max_steps and e - s > 1:
                return np.inf
            total += call_cost + e - s + k
        return total

    T = 9
    for trial in range(12):
        reset = rng.random((4, T)) < [0.1, 0.3, 0.6][trial % 3]
        call_cost, max_steps = [0.25, 1.5, 4.0][trial % 3], [64, 6, 3][trial // 4]
        best = min(cost(reset, list(zip((0,) + cuts, cuts + (T,))), call_cost, max_steps)
                   for n in range(T) for cuts in itertools.combinations(range(1, T), n))
        chunks = time_chunks(reset, call_cost, max_steps, balance)
        assert chunks[0][0] == 0 and chunks[-1][1] == T and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        assert cost(reset, chunks, call_cost, max_steps) == pytest.approx(best)


def test_fused_records_what_it_runs():
    """The recorded kernel says what ran: the GRU on a CPU has no fused op in PyTorch (bptt), the
    LSTM on a CPU runs the C++ loop (this machine builds it: the cpp tests require it)."""
    gru = dataclasses.replace(SPEC, cell="gru")
    assert make_backend("torch", gru, tiny_weights(0, gru), SGD, 2, kernel="fused").kernel \
        == "torch.fused.bptt"
    lstm = make_backend("torch", SPEC, tiny_weights(0, SPEC), SGD, 2, kernel="fused")
    assert lstm.kernel == "torch.fused.cpp"


def _lstm_window(resets):
    """:func:`tests.helpers.layer_case` (B=3, T=7, H=16) as float32 torch tensors for the layer
    functions: inputs, resets, one layer's weights, the state [1, B, H] each, the oracle's outputs."""
    import torch
    inputs, reset, lw, state, (seq, h, c) = layer_case(7, "lstm", 3, 7, resets)
    layers = [{k: torch.from_numpy(v) for k, v in lw.items()}]
    return (torch.from_numpy(inputs), reset, tuple(torch.from_numpy(s[None]).float() for s in state), layers,
            (seq, h, c))


def test_fused_runs_the_cpp_loop_on_windows_with_mid_window_resets():
    """On a CPU in float32 the LSTM's ``fused`` is the C++ loop where a row resets mid-window
    (bitwise its result) and one plain oneDNN call elsewhere (bitwise the rewrite's)."""
    import torch
    from resetbench import torch_cpp
    from resetbench.torch_layers import fused_implementation, layers_fused, layers_rewrite
    assert fused_implementation("lstm", torch.device("cpu")) == "cpp"
    assert fused_implementation("lstm", torch.device("cpu"), torch.float64) == "rewrite"
    mid, fresh = ((0, 0), (0, 3), (2, 0), (2, 5)), ((0, 0), (2, 0))
    for rows, other in ((mid, lambda i, r, s, l: torch_cpp.layers_cpp("lstm", i, torch.from_numpy(r), s, l)),
                        (fresh, lambda i, r, s, l: layers_rewrite("lstm", i, r, s, l))):
        inp, reset, state, layers, _ = _lstm_window(rows)
        got, want = layers_fused("lstm", inp, reset, state, layers), other(inp, reset, state, layers)
        for g, w in zip([got[0], *got[1]], [want[0], *want[1]]):
            assert torch.equal(g, w)


def test_fused_keeps_the_rewrite_where_the_cpp_loop_cannot_be_built(monkeypatch):
    """No C++ compiler: one warning naming why, the kernel recorded as ``torch.fused`` (oneDNN's
    rewrite), and a window with mid-window resets still exact (against the oracle)."""
    import torch
    from resetbench import torch_cpp
    from resetbench.torch_layers import layers_fused
    monkeypatch.setattr(torch_cpp, "_READY", None)
    monkeypatch.setattr(torch_cpp, "_EXT", None)
    monkeypatch.setattr(torch_cpp, "missing", lambda: ["a C++ compiler (c++ on PATH, or CXX)"])
    with pytest.warns(UserWarning, match="not the C\\+\\+ loop: .*missing a C\\+\\+ compiler"):
        lstm = make_backend("torch", SPEC, tiny_weights(0, SPEC), SGD, 2, kernel="fused")
    assert lstm.kernel == ("torch.fused" if torch.backends.mkldnn.is_available() else "torch.fused.bptt")
    inp, reset, state, layers, want = _lstm_window(((0, 0), (0, 3), (2, 0), (2, 5)))
    out, (h, c) = layers_fused("lstm", inp, reset, state, layers)
    for g, w in zip((out, h[0], c[0]), want):                       # against the float64 oracle
        assert_close(g.detach().numpy(), w, "fused without the C++ loop")


def test_fused_rows_benchmark_reports_each_shape(capsys):
    """``benchmarks.fused_rows`` (the README's per-row cost of the fused op): one line per (H, B)
    with a positive time, the environment first; bad input is one line naming the value."""
    from benchmarks import fused_rows
    assert fused_rows.main(["--hidden", "8", "--rows", "2,4", "--steps", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert '"torch_version"' in out[0] and "load_average" in out[0]
    rows = [line for line in out if line.startswith("H=8 ")]
    assert [r.split(":")[0] for r in rows] == ["H=8 B=2", "H=8 B=4"]
    assert all(float(r.split(": ")[1].split()[0]) > 0 for r in rows)
    with pytest.raises(SystemExit, match="--rows='2,x'"):
        fused_rows.main(["--rows", "2,x"])


def test_fused_layouts_benchmark_checks_and_reports_each_case(capsys):
    """``benchmarks.fused_layouts`` (the README's other layouts for the fused op): both layouts
    equal the loop kernel in float64 with gradients (the check it runs before timing), one line
    per shape and density with every layout's time, the environment first; bad input is one line."""
    from benchmarks import fused_layouts
    assert fused_layouts.check(seed=3) < 1e-9
    plan = fused_layouts.Staircase(np.array([[0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0]], bool), call_rows=0.0)
    assert sorted(plan.flat.tolist()) == sorted(set(plan.flat.tolist())) and len(plan.flat) == 12
    assert [n for _, _, n in plan.chunks] == sorted((n for _, _, n in plan.chunks), reverse=True)
    assert fused_layouts.main(["--shapes", "4x6x8", "--densities", "0,0.5", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert '"torch_version"' in out[0] and "load_average" in out[0]
    rows = [line for line in out if line.startswith("B=4 T=6 H=8")]
    assert len(rows) == 2 and all(all(k in r for k in ("native", "fused", "pieces", "staircase")) for r in rows)
    with pytest.raises(SystemExit, match="--densities='0.3,x'"):
        fused_layouts.main(["--densities", "0.3,x"])


@pytest.mark.parametrize("packed", [True, False], ids=["packed_gemm", "aten_mm"])
@pytest.mark.parametrize("H", [3, 20, 32])
def test_cpp_kernel_matches_the_loop_at_every_width(H, packed, monkeypatch):
    """``cpp`` (resetbench/torch_cpp.py) against the loop kernel in float64: two layers, resets at
    column 0 and mid-window, a carried state; outputs, final state and every gradient. H = 3 runs
    only the scalar tail of the C++ gate math (16 wide), 20 the vector body and a tail, 32 the body
    only;
    each through MKL's packed GEMM (which a torch built with MKL must offer) and through ATen's."""
    import torch
    from resetbench import torch_cpp
    from resetbench.torch_layers import layers_loop
    if torch_cpp.missing():
        pytest.fail(f"kernel cpp cannot be built here: missing {torch_cpp.missing()}")
    monkeypatch.setattr(torch_cpp, "PACKED_GEMM", packed)
    assert torch_cpp.packed_gemm() == (packed and torch.backends.mkl.is_available())
    rng = np.random.default_rng(H)
    B, T, E = 4, 11, 5
    reset = rng.random((B, T)) < 0.25
    reset[:, 0] = [True, False, True, False]
    layers = [{k: rng.standard_normal(shape) * 0.7 for k, shape in (("w_x", (E if i == 0 else H, 4 * H)),
                                                                    ("w_h", (H, 4 * H)), ("b", (4 * H,)))}
              for i in range(2)]
    inp, state = rng.standard_normal((B, T, E)), [rng.standard_normal((2, B, H)) for _ in range(2)]

    def run(fn, dtype):
        ws = [{k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in p.items()} for p in layers]
        x = torch.tensor(inp, dtype=dtype, requires_grad=True)
        st = tuple(torch.tensor(s, dtype=dtype, requires_grad=True) for s in state)
        out, final = fn(x, torch.from_numpy(reset), st, ws)
        loss = (out ** 2).sum() + (final[0] ** 2).sum() + (final[1] ** 3).sum()
        grads = torch.autograd.grad(loss, [x, *st, *(v for p in ws for v in p.values())])
        return [t.detach().double().numpy() for t in (out, *final, *grads)]
    want = run(lambda *a: layers_loop("lstm", *a), torch.float64)
    got = run(lambda *a: torch_cpp.layers_cpp("lstm", *a), torch.float32)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * max(1.0, float(np.abs(w).max())))


def test_cpp_kernel_refuses_what_it_does_not_run(monkeypatch):
    """``cpp`` runs the LSTM in float32 on a CPU; a machine that cannot build it gets one line
    naming what is missing, when the backend is made (before any step)."""
    import torch
    from backends.base import ConfigError
    from resetbench import torch_cpp
    x, reset = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)
    state = (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="allowed lstm"):
        torch_cpp.layers_cpp("gru", x, reset, state[:1], [{}])
    with pytest.raises(ValueError, match="float32 tensors on the CPU only"):
        torch_cpp.layers_cpp("lstm", x.double(), reset, state, [{}])
    monkeypatch.setattr(torch_cpp, "missing", lambda: ["a C++ compiler (c++ on PATH, or CXX)"])
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        make_backend("torch", SPEC, tiny_weights(0, SPEC), SGD, 2, kernel="cpp")
