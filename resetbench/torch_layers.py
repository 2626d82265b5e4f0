"""Reset-aware recurrent layers for PyTorch: per-row, per-step state resets, exact, for every cell.

- :class:`ResetLSTM`, :class:`ResetGRU`: ``nn.Module`` layers shaped like ``nn.LSTM``/``nn.GRU``
  (``num_layers``, ``batch_first``, state tensors ``[L, B, H]``), called with a ``reset`` mask.
- ``fused`` kernel (:func:`layers_fused`): the fastest exact implementation for the cell and
  device. The LSTM on a CPU in float32: the ``cpp`` kernel below on windows with mid-window resets
  (one plain oneDNN call on the others); where the C++ extension cannot be built, and for every
  other cell and device that has one, PyTorch's fused op (the LSTM: oneDNN on a CPU, cuDNN on a
  GPU; the GRU: cuDNN), that op (``torch._VF.lstm`` /
  ``torch._VF.gru``, behind ``nn.LSTM``/``nn.GRU``) made reset-aware by rewriting the window
  (:func:`layers_rewrite`): the window is cut in time into calls (:func:`time_chunks`: a reset at a
  call's first column is a select on the state between calls), and inside a call one *zeroing*
  step precedes each other reset and *hold* steps follow each row's last token, driven by
  constant input columns whose +-1e6 weights saturate gates exactly (:meth:`TorchCell.flagged`,
  :meth:`TorchCell.flag_columns`);
  the pieces of rows between resets are packed across rows so that every row pays the mean
  number of resets, not the busiest row's (:class:`FusedPlan`). A window whose rewritten outputs are not finite runs through the
  loop (a zeroing step multiplies the old state by 0, which keeps a NaN). Elsewhere (the GRU on a
  CPU) the ``bptt`` loop of :mod:`resetbench.torch_bptt`.
- ``bptt`` kernel (:func:`resetbench.torch_bptt.layers_bptt`): a time loop with a hand-written
  backward pass, one autograd node per layer and window; its cost does not depend on the reset
  density.
- ``loop`` kernel (:func:`layer_loop`): one time loop for every cell; before each step the rows
  that reset get the zero state (``torch.where``: a select, so NaN and inf are cleared too), then
  the cell's step (:func:`lstm_cell`, :func:`gru_cell`).
- ``cpp`` kernel (:func:`resetbench.torch_cpp.layers_cpp`, the LSTM on a CPU): the ``bptt`` loop in
  C++, compiled on first use; its cost does not depend on the reset density either.
- :func:`layers_packed`: the framework's kernel over ``pack_padded_sequence`` (a baseline).

Weights are resetbench's canonical layout, one dict per layer (keys without the ``<cell>.<l>.``
prefix): LSTM ``w_x`` [in, 4H], ``w_h`` [H, 4H], ``b`` [4H], gate blocks i, f, g, o
(``nn.LSTM``: ``weight_ih = w_x.T``, ``bias_ih + bias_hh = b``); GRU ``w_x`` [in, 3H], ``w_h``
[H, 3H], ``b_x``, ``b_h`` [3H], gate blocks r, z, n (``nn.GRU``: ``weight_ih = w_x.T``,
``bias_ih = b_x``, ``bias_hh = b_h``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from resetbench.torch_bptt import layers_bptt

State = Tuple[torch.Tensor, ...]
Layer = Mapping[str, torch.Tensor]          # one layer's canonical weights, e.g. {"w_x", "w_h", "b"}
SATURATE = 1e6   # flag weight: sigmoid(-1e6 + z) == 0.0 and sigmoid(1e6 + z) == 1.0 in float32


# --------------------------------------------------------------------------- cells: one step each
def lstm_cell(state: State, xt: torch.Tensor, w_h: torch.Tensor) -> State:
    """The LSTM cell (``conf/cell/lstm.yaml``): ``(h, c)`` and the step's projected input ``xt``
    [B, 4H] (``x w_x + b``) -> the new ``(h, c)``."""
    h, c = state
    H = h.shape[1]
    z = torch.addmm(xt, h, w_h)
    i = torch.sigmoid(z[:, :H])
    f = torch.sigmoid(z[:, H:2 * H])
    g = torch.tanh(z[:, 2 * H:3 * H])
    o = torch.sigmoid(z[:, 3 * H:])
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_cell(state: State, xt: torch.Tensor, w_h: torch.Tensor, b_h: torch.Tensor) -> State:
    """The GRU cell (``conf/cell/gru.yaml``, nn.GRU's equations): ``(h,)`` and the step's projected
    input ``xt`` [B, 3H] (``x w_x + b_x``) -> the new ``(h,)``."""
    (h,) = state
    H = h.shape[1]
    hp = torch.addmm(b_h, h, w_h)
    r = torch.sigmoid(xt[:, :H] + hp[:, :H])
    z = torch.sigmoid(xt[:, H:2 * H] + hp[:, H:2 * H])
    n = torch.tanh(xt[:, 2 * H:] + r * hp[:, 2 * H:])
    return ((1.0 - z) * n + z * h,)


def layer_loop(cell: Callable[..., State], xp: torch.Tensor, reset: torch.Tensor, state: State,
               *rec: torch.Tensor) -> Tuple[torch.Tensor, State]:
    """One layer of any cell over a window, step by step. ``xp`` [B, T, G*H] (input projection +
    bias), ``reset`` [B, T, 1] bool: before step t the rows that reset get the zero state in every
    component (``torch.where``: a NaN or inf state is cleared too, and no gradient passes); ``rec``
    the cell's recurrent parameters. Returns the outputs [B, T, H] (the state's first component)
    and the final state."""
    outs: List[torch.Tensor] = []
    zero = xp.new_zeros(())
    for xt, rt in zip(xp.unbind(1), reset.unbind(1)):   # unbind: slicing xp[:, t] makes backward slower
        state = cell(tuple(torch.where(rt, zero, s) for s in state), xt, *rec)
        outs.append(state[0])
    return torch.stack(outs, 1), state


# --------------------------------------------------------------------------- the fused kernel's plan
class FusedPlan:
    """Where a window's tokens go in the rewritten window of the ``fused`` kernel (host side).

    A row's tokens between two resets form a *piece*; a piece that does not start its rewritten
    row is preceded by one zeroing step, and each row's final state comes from its last piece,
    followed by hold steps. Each rewritten row ``b`` starts with row ``b``'s first piece (from its
    carried state) and ends with row ``b``'s last piece; the pieces in between (*middles*) start
    from the zero state, so they may run in any row. Every extra step costs a full step of the
    fused op (its time is linear in the rows, measured on oneDNN: 20 us per row-step at B=32 and
    19 at B=64, H=256), so ``balance`` moves middles out of rows longer than the others: the
    rewritten window is ``T2 = T + ceil(resets / B)`` steps (the mean, not the busiest row's
    count), more only where the pieces do not pack.

    ``reset`` [B, T] bool -> ``flat`` (index of each token in the flattened [B * T2] rewritten
    window), ``last`` (each row's last token there), ``zeroing`` and ``hold`` [B, T2] float32 (1 at
    the inserted steps), ``T2``, ``K`` (most mid-window resets in a row) and ``moved`` (middles
    moved to another row).
    """

    def __init__(self, reset: np.ndarray, balance: bool = True):
        B, T = reset.shape
        mid = reset.copy()
        mid[:, 0] = False                                   # column 0: zero the initial state instead
        k = mid.sum(axis=1)
        self.K = int(k.max(initial=0))
        pb, pa, size, final = row_pieces(reset)             # pieces: row, first column, length
        first = pa == 0
        home = pb.copy()
        T2 = T + self.K
        if balance and self.K:
            home, T2 = _balance(pb, size, first | final, k, T)
        self.T2, self.moved = int(T2), int((home != pb).sum())
        # within a rewritten row: the first piece, the row's own middles, moved middles, its last piece
        rank = np.where(first, 0, np.where(final, 3, np.where(home == pb, 1, 2)))
        o = np.lexsort((pa, pb, rank, home))
        slot = np.cumsum(size[o] + 1)                       # each piece and the zeroing step before it
        start = np.r_[0, slot[:-1]]
        row_start = np.r_[True, home[o][1:] != home[o][:-1]]
        off = np.empty_like(size)
        off[o] = start - np.maximum.accumulate(np.where(row_start, start, 0))
        self.zeroing = np.zeros((B, self.T2), np.float32)
        self.zeroing[home[~first], off[~first] - 1] = 1.0           # zeroing step just before a piece
        end = off[final] + size[final] - 1                          # each row's last token (rows in order)
        self.hold = (np.arange(self.T2)[None, :] > end[:, None]).astype(np.float32)
        self.flat = np.repeat(home * self.T2 + off - pa, size) + np.tile(np.arange(T), B)
        self.last = np.arange(B) * self.T2 + end


def row_pieces(reset: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A window's *pieces*: each row's runs of tokens between resets (a row starts one at column 0
    whether it resets there or not). Returns ``row``, ``start`` (first column), ``size`` and
    ``final`` (the row's last piece) per piece, sorted by row, then column."""
    B, T = reset.shape
    starts = reset.copy()
    starts[:, 0] = True
    row, start = np.nonzero(starts)                         # row-major: sorted by row, then column
    final = np.r_[row[1:] != row[:-1], True]
    size = np.where(final, T, np.r_[start[1:], 0]) - start
    return row, start, size, final


def _balance(row: np.ndarray, size: np.ndarray, fixed: np.ndarray, k: np.ndarray, T: int) -> Tuple[np.ndarray, int]:
    """:class:`FusedPlan`'s packing: the rewritten row of each piece and the window's length.
    ``row``, ``size``, ``fixed`` per piece (its row, length, whether it must stay: a row's first
    and last piece), ``k`` per row (mid-window resets). Starts from the least length any packing
    can have (the mean row, ``T + 1`` if any row resets) and grows it by one step until the
    middles moved out of longer rows fit (largest first, each into the fullest row with room)."""
    B = k.shape[0]
    length = T + k                                          # steps of each row with its own pieces
    target = max(-(-int(length.sum()) // B), T + 1)
    movable = [np.nonzero(~fixed & (row == b))[0] for b in range(B)]
    movable = [m[np.argsort(size[m], kind="stable")] for m in movable]     # smallest first
    while target < int(length.max()):
        home, left = row.copy(), length.copy()
        moving = []
        for b in np.nonzero(length > target)[0]:
            for p in movable[b]:
                if left[b] <= target:
                    break
                moving.append(p)
                left[b] -= size[p] + 1
        room = np.where(k > 0, target - left, -1)           # a row without a reset holds one piece only
        for p in sorted(moving, key=lambda q: -size[q]):
            fits = np.nonzero(room >= size[p] + 1)[0]
            if fits.size == 0:
                break
            r = fits[np.argmin(room[fits])]
            room[r] -= size[p] + 1
            home[p] = r
        else:
            return home, target
        target += 1
    return row.copy(), int(length.max())


# --------------------------------------------------------------------------- cells, fused
@dataclasses.dataclass(frozen=True)
class TorchCell:
    """What the kernels need of a cell: its step, which canonical weights project the input
    (``input_bias``) and feed the step (``recurrent``), and its fused ``_VF`` op."""

    name: str
    step: Callable[..., State]
    input_bias: str
    recurrent: Tuple[str, ...]
    gates: int
    call_cost: float     # a fused call's fixed cost in time steps (see time_chunks)

    def project(self, inp: torch.Tensor, p: Layer) -> torch.Tensor:
        return torch.matmul(inp, p["w_x"]) + p[self.input_bias]

    def vf_params(self, p: Layer) -> List[torch.Tensor]:
        """``_VF``'s four parameters of one layer (weight_ih, weight_hh, bias_ih, bias_hh): views
        of the canonical weights, so gradients flow back to them."""
        if self.name == "lstm":
            return [p["w_x"].t(), p["w_h"].t(), p["b"], torch.zeros_like(p["b"])]
        return [p["w_x"].t(), p["w_h"].t(), p["b_x"], p["b_h"]]

    def vf(self, x: torch.Tensor, state: State, params: List[torch.Tensor], layers: int):
        """The fused op, batch-first: ``(out [B, T, H], final state)``."""
        train = torch.is_grad_enabled()
        if self.name == "lstm":
            out, h, c = torch._VF.lstm(x, state, params, True, layers, 0.0, train, False, True)
            return out, (h, c)
        out, h = torch._VF.gru(x, state[0], params, True, layers, 0.0, train, False, True)
        return out, (h,)

    def vf_packed(self, data: torch.Tensor, batch_sizes: torch.Tensor, state: State, params, layers: int):
        """The fused op over a ``PackedSequence``'s data: ``(data out, final state)``."""
        train = torch.is_grad_enabled()
        if self.name == "lstm":
            out, h, c = torch._VF.lstm(data, batch_sizes, state, params, True, layers, 0.0, train, False)
            return out, (h, c)
        out, h = torch._VF.gru(data, batch_sizes, state[0], params, True, layers, 0.0, train, False)
        return out, (h,)

    def flag_columns(self, plan: FusedPlan, like: torch.Tensor) -> torch.Tensor:
        """The extra input columns of the rewritten window, [B * T2, k] (every layer's). LSTM: a
        zeroing column and a hold column; GRU: those and a column that is 1 except on zeroing
        steps (it carries the input-side bias of n; see :meth:`flagged`)."""
        cols = [plan.zeroing, plan.hold] + ([1.0 - plan.zeroing] if self.name == "gru" else [])
        return torch.from_numpy(np.stack([c.reshape(-1) for c in cols], 1)).to(like.device, like.dtype)

    def flagged(self, p: Layer) -> List[torch.Tensor]:
        """The layer's ``_VF`` parameters with the weights of :meth:`flag_columns` appended to
        ``weight_ih``. LSTM: zeroing (i = f = 0, so c = h = 0), hold (i = 0, f = o = 1: c carried).
        GRU: zeroing (r = z = 0, so h = tanh of n's input part), hold (z = 1: h carried), and n's
        input-side bias as the third column's weight (``bias_ih``'s n block is 0), so that on a
        zeroing step n's pre-activation is exactly 0, and h = 0."""
        H = p["w_h"].shape[0]
        params = self.vf_params(p)
        w = params[0].new_zeros(self.gates * H, 2)
        if self.name == "lstm":
            w[:2 * H, 0] = -SATURATE                 # zeroing: i = f = 0
            w[:H, 1] = -SATURATE                     # hold: i = 0, f = 1, o = 1
            w[H:2 * H, 1] = SATURATE
            w[3 * H:, 1] = SATURATE
            params[0] = torch.cat([params[0], w], 1)
            return params
        w[:2 * H, 0] = -SATURATE                     # zeroing: r = z = 0
        w[H:2 * H, 1] = SATURATE                     # hold: z = 1
        b_n = torch.cat([p["b_x"].new_zeros(2 * H), p["b_x"][2 * H:]])[:, None]   # n's input bias, as a column
        params[0] = torch.cat([params[0], w, b_n], 1)
        params[2] = torch.cat([p["b_x"][:2 * H], p["b_x"].new_zeros(H)])
        return params


CELLS: Dict[str, TorchCell] = {
    "lstm": TorchCell("lstm", lstm_cell, "b", ("w_h",), 4, 4.0),
    "gru": TorchCell("gru", gru_cell, "b_x", ("w_h", "b_h"), 3, 1.0),
}


def layers_loop(cell: str, inp: torch.Tensor, reset: torch.Tensor, state: State, layers: Sequence[Layer],
                loop: Optional[Callable] = None) -> Tuple[torch.Tensor, State]:
    """Every layer through :func:`layer_loop` (or ``loop``, e.g. its compiled version); ``reset``
    [B, T] bool tensor, ``state`` one [L, B, H] tensor per state component. Returns the outputs
    [B, T, H] and the final state."""
    c = CELLS[cell]
    loop = loop or functools.partial(layer_loop, c.step)
    r = reset.unsqueeze(-1)
    finals: List[State] = []
    for layer, p in enumerate(layers):
        inp, st = loop(c.project(inp, p), r, tuple(s[layer] for s in state), *(p[k] for k in c.recurrent))
        finals.append(st)
    return inp, tuple(torch.stack(parts) for parts in zip(*finals))


def time_chunks(reset: np.ndarray, call_cost: float, max_steps: Optional[int] = None,
                balance: bool = True) -> List[Tuple[int, int]]:
    """Cut a window's columns into chunks ``[s, e)``, one fused call each, at least cost.

    A reset in a chunk's first column is free (the state between calls is replaced by zeros with
    a select); every other reset costs a zeroing step. A chunk of a balanced plan
    (:class:`FusedPlan`) is ``e - s + ceil(R(s, e) / B)`` steps, ``R`` the resets in columns
    ``s+1 .. e-1`` of all rows (the least any packing reaches: more where pieces do not pack);
    unbalanced, ``e - s + K(s, e)``, ``K`` the most resets of one row there. A call costs
    ``call_cost`` steps more (its fixed overhead, measured on this CPU: ~6 steps for oneDNN's LSTM
    at B=32 H=256, ~1.5 at B=64 H=512). Chunks hold at most ``max_steps`` rewritten steps if given
    (one column always fits). Exact dynamic programming over cut columns, O(T^2) on the host
    (O(B T^2) unbalanced)."""
    B, T = reset.shape
    max_steps = 2 * T if max_steps is None else max_steps
    mid = reset[:, 1:]
    whole = -(-int(mid.sum()) // max(B, 1)) if balance else int(mid.sum(axis=1).max(initial=0))
    if whole <= call_cost and T + whole <= max_steps:      # a cut saves at most that and costs a call
        return [(0, T)]
    length = np.arange(T + 1)[None, :] - np.arange(T)[:, None]                          # e - s
    hi = np.arange(T + 1)[None, :]
    lo = np.minimum(np.arange(T)[:, None] + 1, hi)         # resets counted in columns lo .. hi-1
    if balance:
        cs = np.r_[0, np.cumsum(reset.sum(axis=0))]
        extra = -(-(cs[hi] - cs[lo]) // max(B, 1))
    else:
        cs = np.zeros((B, T + 1), np.int64)
        np.cumsum(reset, axis=1, out=cs[:, 1:])
        extra = (cs[:, hi] - cs[:, lo]).max(axis=0) if B else np.zeros((T, T + 1), np.int64)
    steps = length + extra
    cost = np.where((length >= 1) & ((steps <= max_steps) | (length == 1)), call_cost + steps, np.inf)
    return cheapest_cuts(cost)


def cheapest_cuts(cost: np.ndarray) -> List[Tuple[int, int]]:
    """The chunks ``[s, e)`` covering columns ``0 .. T`` at the least total ``cost[s, e]`` (a
    [T, T + 1] array, ``inf`` where a chunk is not allowed): dynamic programming over the cuts."""
    T = cost.shape[0]
    best = np.zeros(T + 1)
    prev = np.zeros(T + 1, np.int64)
    for e in range(1, T + 1):
        total = best[:e] + cost[:e, e]
        prev[e] = int(np.argmin(total))
        best[e] = total[prev[e]]
    cuts = [T]
    while cuts[-1] > 0:
        cuts.append(int(prev[cuts[-1]]))
    cuts.reverse()
    return list(zip(cuts[:-1], cuts[1:]))


def _zero_rows(rows: np.ndarray, state: State, like: torch.Tensor) -> State:
    """The state with rows ``rows`` [B] bool replaced by zeros (a select: clears NaN too, cuts
    the gradient)."""
    r = torch.from_numpy(rows).to(like.device)[None, :, None]
    return tuple(torch.where(r, like.new_zeros(()), s) for s in state)


class _Take(torch.autograd.Function):
    """``x.index_select(0, index)`` for an index without repeats, whose backward is a copy of the
    gradient into zeros (``index_copy``) instead of PyTorch's general ``index_add``, which took
    ~10% of a rewritten window's forward + backward on a CPU (profiled, B=32 T=64 H=256)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros((ctx.rows,) + tuple(grad.shape[1:])).index_copy_(0, index, grad), None


class _Place(torch.autograd.Function):
    """The rewritten window's input in one buffer: ``x`` [N, in] at rows ``index`` of [rows, in +
    k], zeros elsewhere, and ``cols`` [rows, k] (constant) in the last k columns; its backward
    gathers the gradient's first ``in`` columns at ``index``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.width = x.shape[1]
        out = x.new_zeros(cols.shape[0], x.shape[1] + cols.shape[1])
        out[:, x.shape[1]:] = cols
        out[:, :x.shape[1]].index_copy_(0, index, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad[:, :ctx.width].index_select(0, index), None, None


def _fused_rewritten(c: TorchCell, inp: torch.Tensor, plan: FusedPlan, state: State, layers: Sequence[Layer]):
    """The window rewritten by ``plan`` through the fused op, layer by layer."""
    B, T, _ = inp.shape
    H = state[0].shape[-1]
    dev = inp.device
    flat = torch.from_numpy(plan.flat).to(dev)
    last = torch.from_numpy(plan.last).to(dev)
    cols = c.flag_columns(plan, inp)
    x = _Place.apply(inp.reshape(B * T, -1), flat, cols)
    finals = []
    for layer, p in enumerate(layers):
        if layer:
            x = torch.cat([x.reshape(B * plan.T2, H), cols], 1)
        x, final = c.vf(x.view(B, plan.T2, -1), tuple(s[layer:layer + 1] for s in state), c.flagged(p), 1)
        if c.name == "lstm":                             # a hold step sets h = tanh(c): take h at the last token
            final = (_Take.apply(x.reshape(B * plan.T2, H), last)[None], final[1])
        finals.append(tuple(s[0] for s in final))
    out = _Take.apply(x.reshape(B * plan.T2, H), flat).view(B, T, H)
    return out, tuple(torch.stack(parts) for parts in zip(*finals))


def layers_rewrite(cell: str, inp: torch.Tensor, reset: np.ndarray, state: State, layers: Sequence[Layer],
                   call_cost: Optional[float] = None, max_steps: Optional[int] = None, balance: bool = True):
    """The ``rewrite`` kernel (what ``fused`` runs where a fused op exists): every layer over a
    window with per-row, per-step resets through the framework's recurrent op (``_VF``), time cut
    into the chunks of :func:`time_chunks`, each chunk rewritten by a :class:`FusedPlan` (the
    resets at a chunk's first column select the zero state between calls). ``inp`` [B, T, in];
    ``reset`` [B, T] bool (NumPy: the rewrite is planned on the host); ``state`` one [L, B, H]
    tensor per state component; ``call_cost`` (steps; default the cell's), ``max_steps`` and
    ``balance`` tune the plan, which never changes the result. A window whose outputs are not
    finite runs through the loop (a zeroing step multiplies the old state by 0, which keeps a NaN
    or inf). Returns the outputs and the final state."""
    c = CELLS[cell]
    cost = c.call_cost if call_cost is None else float(call_cost)
    outs = []
    params = [q for p in layers for q in c.vf_params(p)]
    final = state
    for s, e in time_chunks(reset, cost, max_steps, balance):
        final = _zero_rows(reset[:, s], final, inp)
        plan = FusedPlan(reset[:, s:e], balance)
        if plan.K == 0:                                  # no reset inside the chunk: one plain call
            out, final = c.vf(inp[:, s:e], final, params, len(layers))
        else:
            out, final = _fused_rewritten(c, inp[:, s:e], plan, final, layers)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    if not _finite(out, final):
        return layers_loop(cell, inp, torch.from_numpy(reset).to(inp.device), state, layers)
    return out, final


def _finite(out: torch.Tensor, final: State) -> bool:
    """Whether the outputs and final state hold no NaN or inf: one sum each (a NaN or inf
    anywhere makes its sum non-finite, and these values are too small to overflow it), one sync."""
    with torch.no_grad():
        return bool(torch.isfinite(torch.stack([out.sum()] + [s.sum() for s in final])).all())


def has_fused_op(cell: str, device: torch.device) -> bool:
    """Whether PyTorch runs ``cell`` as one fused op on ``device``: the LSTM on a CPU (oneDNN)
    and on CUDA (cuDNN), the GRU on CUDA only (on a CPU nn.GRU runs ATen's step-by-step cell)."""
    if device.type == "cuda":
        return bool(torch.backends.cudnn.is_available())
    return cell == "lstm" and device.type == "cpu" and bool(torch.backends.mkldnn.is_available())


def fused_implementation(cell: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """What the ``fused`` kernel runs for ``cell`` on ``device`` in ``dtype``: ``cpp`` (the LSTM on
    a CPU in float32 where the C++ loop of :mod:`resetbench.torch_cpp` builds: windows with
    mid-window resets run it, the others one plain fused call), ``rewrite`` (through the fused op,
    :func:`layers_rewrite`) or ``bptt`` (:func:`resetbench.torch_bptt.layers_bptt`)."""
    if cell == "lstm" and device.type == "cpu" and dtype == torch.float32:
        from resetbench import torch_cpp
        if torch_cpp.ready():
            return "cpp"
    return "rewrite" if has_fused_op(cell, device) else "bptt"


def layers_fused(cell: str, inp: torch.Tensor, reset: np.ndarray, state: State, layers: Sequence[Layer]):
    """The ``fused`` kernel, the fastest exact implementation measured for the cell and device
    (:func:`fused_implementation`): the LSTM on a CPU through the C++ loop (its cost does not depend
    on the reset density; oneDNN's rewrite pays about one step per mid-window reset), a window
    without mid-window resets as one plain fused call; elsewhere the rewrite through the
    framework's fused op (:func:`layers_rewrite`) where PyTorch has one for the cell and device,
    else the hand-written BPTT loop (the GRU on a CPU, where the loop measures faster than ATen's
    step-by-step GRU at every reset density). ``reset`` [B, T] bool NumPy array; ``state`` one
    [L, B, H] tensor per state component."""
    impl = fused_implementation(cell, inp.device, inp.dtype)
    if impl == "cpp" and (reset[:, 1:].any() or not has_fused_op(cell, inp.device)):
        from resetbench.torch_cpp import layers_cpp
        return layers_cpp(cell, inp, torch.from_numpy(np.ascontiguousarray(reset)), state, layers)
    if impl in ("cpp", "rewrite"):
        return layers_rewrite(cell, inp, reset, state, layers)
    return layers_bptt(cell, inp, torch.from_numpy(np.ascontiguousarray(reset)).to(inp.device), state, layers)


def layers_packed(cell: str, inp: torch.Tensor, lengths: np.ndarray, state: State, layers: Sequence[Layer]):
    """The ``peer`` baseline: the framework's kernel over ``pack_padded_sequence`` (zero initial
    state). Returns the outputs [B, T, H] (zeros at padding) and the state after each row's last
    valid token."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    c = CELLS[cell]
    T = inp.shape[1]
    packed = pack_padded_sequence(inp, torch.from_numpy(np.maximum(lengths, 1)), batch_first=True,
                                  enforce_sorted=False)
    zero = tuple(torch.zeros_like(s) for s in state)    # the padded layout starts every row fresh
    data, final = c.vf_packed(packed.data, packed.batch_sizes, zero, [q for p in layers for q in c.vf_params(p)],
                              len(layers))
    out, _ = pad_packed_sequence(packed._replace(data=data), batch_first=True, total_length=T)
    order = packed.unsorted_indices
    return out, tuple(s.index_select(1, order) for s in final)


# --------------------------------------------------------------------------- modules
class _ResetRNN(torch.nn.Module):
    """The modules' common part: layers of one cell, in canonical layout, shaped like nn.LSTM."""

    cell = "abstract"
    kernels: Tuple[str, ...] = ("fused", "rewrite", "bptt", "loop")      # the values of ``kernel``

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False,
                 kernel: str = "fused"):
        super().__init__()
        if kernel not in self.kernels:
            raise ValueError(f"{type(self).__name__} kernel={kernel!r}: allowed {', '.join(self.kernels)}")
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__} num_layers={num_layers!r}: must be at least 1")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.batch_first, self.kernel = bool(batch_first), kernel
        c = CELLS[self.cell]
        G = c.gates * self.hidden_size
        names = ("w_x", "w_h", c.input_bias) + tuple(k for k in c.recurrent if k != "w_h")
        for layer in range(self.num_layers):
            rows = {"w_x": self.input_size if layer == 0 else self.hidden_size, "w_h": self.hidden_size}
            for name in names:
                shape = (rows[name], G) if name in rows else (G,)
                self.register_parameter(f"{name}_l{layer}", torch.nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default: every weight and bias uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            torch.nn.init.uniform_(p, -bound, bound)

    def layer(self, layer: int) -> Dict[str, torch.Tensor]:
        """Layer ``layer``'s canonical weights (``w_x``, ``w_h``, ``b`` or ``b_x``, ``b_h``)."""
        suffix = f"_l{layer}"
        return {n[:-len(suffix)]: p for n, p in self.named_parameters() if n.endswith(suffix)}

    def canonical(self, prefix: Optional[str] = None) -> Dict[str, np.ndarray]:
        """Every layer's weights as resetbench canonical NumPy arrays (``<cell>.<l>.<key>``)."""
        prefix = self.cell if prefix is None else prefix
        return {f"{prefix}.{l}.{k}": v.detach().cpu().numpy().copy()
                for l in range(self.num_layers) for k, v in self.layer(l).items()}

    def load_canonical(self, weights: Mapping[str, np.ndarray], prefix: Optional[str] = None) -> None:
        """Load canonical weights (``<cell>.<l>.<key>``, e.g. a run's ``weights.npz``)."""
        prefix = self.cell if prefix is None else prefix
        with torch.no_grad():
            for l in range(self.num_layers):
                for k, p in self.layer(l).items():
                    value = torch.as_tensor(np.asarray(weights[f"{prefix}.{l}.{k}"]), dtype=p.dtype)
                    if tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"{prefix}.{l}.{k}: shape {tuple(value.shape)}, the layer has {tuple(p.shape)}")
                    p.copy_(value)

    def forward(self, x: torch.Tensor, reset: torch.Tensor, state=None):
        """``x`` [T, B, in] (``[B, T, in]`` with ``batch_first``), ``reset`` bool in the same
        layout ([T, B] or [B, T]): zero a row's state before that step. ``state``: the cell's
        state tensors [L, B, H] (or None: zeros). Returns the last layer's outputs (same layout as
        ``x``) and the final state, to be fed (detached) to the next window."""
        if not self.batch_first:
            x, reset = x.transpose(0, 1), reset.transpose(0, 1)
        B = x.shape[0]
        if state is None:
            state = self.zero_state(B, x)
        state = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        layers = [self.layer(l) for l in range(self.num_layers)]
        if self.kernel == "fused":          # the rewrite is planned on the host: reset goes to NumPy
            out, final = layers_fused(self.cell, x, reset.detach().bool().cpu().numpy(), state, layers)
        elif self.kernel == "rewrite":
            out, final = layers_rewrite(self.cell, x, reset.detach().bool().cpu().numpy(), state, layers)
        elif self.kernel == "bptt":
            out, final = layers_bptt(self.cell, x, reset.bool(), state, layers)
        elif self.kernel == "cpp":          # the C++ loop (resetbench.torch_cpp: CPU, float32; built on first use)
            from resetbench.torch_cpp import layers_cpp
            out, final = layers_cpp(self.cell, x, reset.bool(), state, layers)
        else:
            out, final = layers_loop(self.cell, x, reset.bool(), state, layers)
        out = out if self.batch_first else out.transpose(0, 1)
        return out, (final[0] if len(final) == 1 else final)

    def zero_state(self, batch: int, like: torch.Tensor):
        raise NotImplementedError

    @staticmethod
    def _copy_biases(p: Dict[str, torch.Tensor], bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> None:
        """Layer ``p``'s canonical biases from the torch module's ``bias_ih``, ``bias_hh``."""
        raise NotImplementedError

    @classmethod
    def from_torch(cls, rnn: torch.nn.RNNBase, kernel: str = "fused"):
        """The same weights as ``rnn`` (an ``nn.LSTM`` for :class:`ResetLSTM`, an ``nn.GRU`` for
        :class:`ResetGRU`; with biases, one direction)."""
        layer = cls(rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.batch_first, kernel)
        with torch.no_grad():
            for l in range(rnn.num_layers):
                p = layer.layer(l)
                p["w_x"].copy_(getattr(rnn, f"weight_ih_l{l}").t())
                p["w_h"].copy_(getattr(rnn, f"weight_hh_l{l}").t())
                cls._copy_biases(p, getattr(rnn, f"bias_ih_l{l}"), getattr(rnn, f"bias_hh_l{l}"))
        return layer


class ResetLSTM(_ResetRNN):
    """``nn.LSTM``'s shape and initialization, with per-row, per-step state resets.

    ``ResetLSTM(input_size, hidden_size, num_layers=1, batch_first=False, kernel="fused")``;
    ``layer(x, reset, (h0, c0)) -> out, (h, c)``, state tensors ``[num_layers, B, H]``. Row b's
    state is replaced by zeros before step t where ``reset`` is set (which cuts the gradient and
    clears a NaN). Parameters per layer l: ``w_x_l{l}`` [in, 4H], ``w_h_l{l}`` [H, 4H], ``b_l{l}``
    [4H] (gates i, f, g, o; nn.LSTM's ``weight_ih_l{l} = w_x.T``, ``bias_ih + bias_hh = b``).
    ``kernel="cpp"`` (the LSTM only): the C++ loop of :mod:`resetbench.torch_cpp` (CPU, float32)."""

    cell = "lstm"
    kernels = _ResetRNN.kernels + ("cpp",)

    def zero_state(self, batch: int, like: torch.Tensor):
        z = like.new_zeros(self.num_layers, batch, self.hidden_size)
        return (z, z)

    @staticmethod
    def _copy_biases(p: Dict[str, torch.Tensor], bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> None:
        p["b"].copy_(bias_ih + bias_hh)


class ResetGRU(_ResetRNN):
    """``nn.GRU``'s shape and initialization, with per-row, per-step state resets.

    ``ResetGRU(input_size, hidden_size, num_layers=1, batch_first=False, kernel="fused")``;
    ``layer(x, reset, h0) -> out, h``, state ``[num_layers, B, H]``. Parameters per layer l:
    ``w_x_l{l}`` [in, 3H], ``w_h_l{l}`` [H, 3H], ``b_x_l{l}``, ``b_h_l{l}`` [3H] (gates r, z, n;
    nn.GRU's ``weight_ih_l{l} = w_x.T``, ``bias_ih = b_x``, ``bias_hh = b_h``)."""

    cell = "gru"

    def zero_state(self, batch: int, like: torch.Tensor):
        return like.new_zeros(self.num_layers, batch, self.hidden_size)

    @staticmethod
    def _copy_biases(p: Dict[str, torch.Tensor], bias_ih: torch.Tensor, bias_hh: torch.Tensor) -> None:
        p["b_x"].copy_(bias_ih)
        p["b_h"].copy_(bias_hh)
