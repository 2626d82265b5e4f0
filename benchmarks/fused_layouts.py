"""Two other ways to lay a window with resets out for PyTorch's fused LSTM, against the ``fused`` plan.

The ``fused`` kernel (:class:`resetbench.torch_layers.FusedPlan`) packs the pieces of rows between
resets into B rows and pays one zeroing step per moved piece: a share d of resets costs about
(1 + d) times ``nn.LSTM``. Two layouts pay no zeroing step at all, and this benchmark measures
whether they run faster (forward + backward of one layer, interleaved rounds, the median):

- ``pieces``: every piece its own sequence of a ``PackedSequence`` (sorted by length, the carried
  state as the initial state of each row's first piece), one ``torch._VF.lstm`` call;
- ``staircase``: every piece its own row, rows sorted by length, time cut into dense calls over
  fewer and fewer rows (a dynamic program over the cuts, each call costing ``call_rows`` row-steps
  more); hold steps keep each row's last piece's cell state to its call's end.

Both are checked against the loop kernel (float64, with gradients) before anything is timed.
``python -m benchmarks.fused_layouts`` prints the environment and one line per shape and density:
each layout's time and its ratio over ``nn.LSTM``'s. Imports torch in this process only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np

from benchmarks.env import environment, tune_malloc
from benchmarks.fused_rows import parse_ints


class Pieces:
    """The pieces of a window's rows between resets, longest first: ``row``, ``start``, ``size``;
    ``carried`` (the row's first piece, the row not resetting at column 0: starts from the carried
    state), ``final`` (the row's last piece: ends the row's final state)."""

    def __init__(self, reset: np.ndarray):
        from resetbench.torch_layers import row_pieces
        row, start, size, final = row_pieces(reset)
        order = np.argsort(-size, kind="stable")
        self.B, self.T = reset.shape
        self.row, self.start, self.size, self.final = row[order], start[order], size[order], final[order]
        self.carried = (self.start == 0) & ~reset[self.row, 0]


def _initial(pieces: Pieces, state, H: int):
    """Each piece's initial (h, c) [1, P, H]: the carried state for a row's first piece, else zero."""
    import torch
    index = torch.from_numpy(np.where(pieces.carried, pieces.row, pieces.B))
    return tuple(torch.cat([s[0], s.new_zeros(1, H)]).index_select(0, index)[None] for s in state)


def layer_pieces(inp, reset: np.ndarray, state, w: Sequence):
    """One LSTM layer (``w``: ``_VF``'s four parameters) over the window laid out as ``pieces``."""
    import torch
    B, T, E = inp.shape
    H = state[0].shape[-1]
    pc = Pieces(reset)
    sizes = pc.size
    batch_sizes = (sizes[None, :] > np.arange(int(sizes[0]))[:, None]).sum(1)
    # time-major packed data: at step t, the pieces longer than t (a prefix: longest first)
    t_idx = np.concatenate([np.arange(n) for n in batch_sizes])
    steps = np.repeat(np.arange(len(batch_sizes)), batch_sizes)
    token = torch.from_numpy(pc.row[t_idx] * T + pc.start[t_idx] + steps)
    data = inp.reshape(B * T, E).index_select(0, token)
    out, h, c = torch._VF.lstm(data, torch.from_numpy(batch_sizes), _initial(pc, state, H), list(w), True, 1, 0.0,
                               torch.is_grad_enabled(), False)
    full = out.new_zeros(B * T, H).index_copy(0, token, out).view(B, T, H)
    last = torch.from_numpy(np.nonzero(pc.final)[0][np.argsort(pc.row[pc.final])])
    return full, (h.index_select(1, last), c.index_select(1, last))


class Staircase:
    """``staircase``'s plan: the cuts in time (``chunks``: start, end, rows) and where every token
    goes in the concatenated calls (``flat``), hold steps (``hold``), each row's last token and the
    row of its final cell state among the calls' final states."""

    def __init__(self, reset: np.ndarray, call_rows: float):
        from resetbench.torch_layers import cheapest_cuts
        pc = Pieces(reset)
        B, T = reset.shape
        longest = int(pc.size[0])
        alive = (pc.size[None, :] > np.arange(longest + 1)[:, None]).sum(1)
        span = np.arange(longest + 1)[None, :] - np.arange(longest)[:, None]          # e - s
        cost = np.where(span >= 1, call_rows + span * alive[:-1, None], np.inf)
        cuts = cheapest_cuts(cost)
        self.chunks = [(s, e, int(alive[s])) for s, e in cuts]
        self.offsets = np.cumsum([0] + [(e - s) * n for s, e, n in self.chunks])
        self.flat = np.empty(B * T, np.int64)
        self.hold = np.zeros(int(self.offsets[-1]), np.float32)
        state_rows = np.cumsum([0] + [n for _, _, n in self.chunks])
        self.last = np.empty(B, np.int64)
        self.last_c = np.empty(B, np.int64)
        for p in range(len(pc.size)):
            b, a, L = int(pc.row[p]), int(pc.start[p]), int(pc.size[p])
            for k, (s, e, _) in enumerate(self.chunks):
                if s >= L:
                    break
                base = self.offsets[k] + p * (e - s) - s
                t = np.arange(s, min(e, L))
                self.flat[b * T + a + t] = base + t
                if pc.final[p] and L < e:
                    self.hold[base + L:base + e] = 1.0
                if pc.final[p] and s < L <= e:
                    self.last_c[b] = state_rows[k] + p
            if pc.final[p]:
                self.last[b] = self.flat[b * T + T - 1]
        self.pieces = pc


def layer_staircase(inp, reset: np.ndarray, state, p: dict, call_rows: float = 150.0):
    """One LSTM layer (canonical weights ``p``) over the window laid out as ``staircase``."""
    import torch
    from resetbench.torch_layers import CELLS, _Place, _Take
    cell = CELLS["lstm"]
    B, T, E = inp.shape
    H = state[0].shape[-1]
    plan = Staircase(reset, call_rows)
    flat = torch.from_numpy(plan.flat)
    cols = torch.stack([torch.zeros(len(plan.hold), dtype=inp.dtype), torch.from_numpy(plan.hold).to(inp.dtype)], 1)
    x = _Place.apply(inp.reshape(B * T, E), flat, cols)
    flagged, plain = cell.flagged(p), cell.vf_params(p)
    h, c = _initial(plan.pieces, state, H)
    outs, cells = [], []
    for k, (s, e, n) in enumerate(plan.chunks):
        part = x[plan.offsets[k]:plan.offsets[k + 1]].view(n, e - s, E + 2)
        if plan.hold[plan.offsets[k]:plan.offsets[k + 1]].any():
            out, (h, c) = cell.vf(part, (h[:, :n], c[:, :n]), flagged, 1)
        else:
            out, (h, c) = cell.vf(part[..., :E], (h[:, :n], c[:, :n]), plain, 1)
        outs.append(out.reshape(-1, H))
        cells.append(c[0])
    out = torch.cat(outs)
    final_h = _Take.apply(out, torch.from_numpy(plan.last))[None]
    final_c = torch.cat(cells).index_select(0, torch.from_numpy(plan.last_c))[None]
    return _Take.apply(out, flat).view(B, T, H), (final_h, final_c)


def check(seed: int = 0) -> float:
    """Both layouts against the loop kernel in float64 (outputs, final state, every gradient), on
    windows with resets at column 0, mid-window and none; returns the largest difference."""
    import torch
    from resetbench.torch_layers import CELLS, layers_loop
    worst = 0.0
    rng = np.random.default_rng(seed)
    for B, T, d in ((5, 12, 0.3), (4, 9, 0.0), (6, 20, 0.6)):
        E, H = 3, 4
        reset = rng.random((B, T)) < d
        p = {k: torch.tensor(rng.standard_normal(shape), requires_grad=True)
             for k, shape in (("w_x", (E, 4 * H)), ("w_h", (H, 4 * H)), ("b", (4 * H,)))}
        inp = torch.tensor(rng.standard_normal((B, T, E)), requires_grad=True)
        state = tuple(torch.tensor(rng.standard_normal((1, B, H))) for _ in range(2))
        leaves = [inp, *p.values()]

        def grads(out, final):
            loss = (out ** 2).sum() + (final[0] ** 2).sum() + (final[1] ** 3).sum()
            return [out, *final, *torch.autograd.grad(loss, leaves)]
        want = grads(*layers_loop("lstm", inp, torch.from_numpy(reset), state, [p]))
        for got in (grads(*layer_pieces(inp, reset, state, CELLS["lstm"].vf_params(p))),
                    grads(*layer_staircase(inp, reset, state, p, call_rows=3.0))):
            worst = max([worst] + [float((a - b).abs().max().detach()) for a, b in zip(got, want)])
    return worst


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="32x64x256,64x128x512", help="BxTxH,... (input size 64)")
    ap.add_argument("--densities", default="0.03,0.1,0.3", help="shares of positions that reset")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    ap.add_argument("--call-rows", type=float, default=150.0,
                    help="staircase: a call's fixed cost in row-steps (the cut planner's price of a call)")
    args = ap.parse_args(list(argv) or None)
    try:
        shapes = [tuple(parse_ints(s.replace("x", ","), "shapes")) for s in args.shapes.split(",")]
        densities = [float(v) for v in args.densities.split(",")]
    except ValueError:
        raise SystemExit(f"fused_layouts: --densities={args.densities!r}: expected numbers separated by commas")
    if any(len(s) != 3 for s in shapes) or args.rounds < 1 or not all(0 <= d < 1 for d in densities):
        raise SystemExit(f"fused_layouts: --shapes={args.shapes!r} --densities={args.densities!r} --rounds={args.rounds}:"
                         " expected BxTxH,..., densities in [0, 1) and at least one round")
    tune_malloc()
    import torch
    from resetbench.torch_layers import CELLS, layers_rewrite

    err = check()
    if err > 1e-9:
        raise SystemExit(f"fused_layouts: a layout differs from the loop kernel by {err:.3g}")
    env = dict(environment(), torch_version=torch.__version__, load_average=list(os.getloadavg()))
    print(json.dumps(env))
    print(f"one LSTM layer, forward + backward, E=64, CPU, median of {args.rounds} interleaved rounds; "
          f"both layouts equal the loop kernel (float64, largest difference {err:.1e})")
    cell = CELLS["lstm"]
    g = torch.Generator().manual_seed(0)
    for B, T, H in shapes:
        E = 64
        p = {"w_x": torch.randn(E, 4 * H, generator=g) / E ** 0.5, "w_h": torch.randn(H, 4 * H, generator=g) / H ** 0.5,
             "b": torch.zeros(4 * H)}
        p = {k: v.requires_grad_() for k, v in p.items()}
        x = torch.randn(B, T, E, generator=g).requires_grad_()
        state = (torch.zeros(1, B, H), torch.zeros(1, B, H))
        for d in densities:
            reset = np.random.default_rng(1).random((B, T)) < d
            runs = {"native": lambda: cell.vf(x, state, cell.vf_params(p), 1),
                    "fused": lambda: layers_rewrite("lstm", x, reset, state, [p]),
                    "pieces": lambda: layer_pieces(x, reset, state, cell.vf_params(p)),
                    "staircase": lambda: layer_staircase(x, reset, state, p, args.call_rows)}
            times: Dict[str, List[float]] = {k: [] for k in runs}

            def once(run) -> float:
                t0 = time.perf_counter()
                out, final = run()
                (out.sum() + final[0].sum() + final[1].sum()).backward()
                return time.perf_counter() - t0
            for run in runs.values():
                once(run)                                      # warm-up
            for _ in range(args.rounds):
                for k, run in runs.items():
                    times[k].append(once(run))
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"B={B} T={T} H={H} resets {d:.0%}: " +
                  "  ".join(f"{k} {v:.2f} ms ({ms['native'] / v:.2f}x native)" for k, v in ms.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
