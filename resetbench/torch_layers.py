"""Reset-aware recurrent layers for PyTorch: per-row, per-step state resets, exact.

- :class:`ResetLSTM`: an ``nn.Module`` (``layer(x, reset, state) -> out, state``).
- ``fused`` kernel (:func:`lstm_layers_fused_grouped`): PyTorch's own fused LSTM (``torch._VF.lstm``,
  the op behind ``nn.LSTM``: oneDNN on a CPU, cuDNN on a GPU) made reset-aware by rewriting the
  window: one *zeroing* step before each mid-window reset and *hold* steps after each row's last
  token, driven by two constant input columns whose +-1e6 weights saturate the gates exactly
  (a zeroing step has input and forget gates 0, so ``c = h = 0`` and no gradient passes; a hold
  step has input gate 0 and forget gate 1). A zeroing step multiplies the old ``c`` by 0, which
  keeps a NaN or inf, so a window whose rewritten outputs are not finite runs through the loop.
- ``loop`` kernel (:func:`layer_loop`): one time loop for every cell; before each step the rows
  that reset get the zero state (``torch.where``: a select, so NaN and inf are cleared too), then
  the cell (:func:`lstm_cell`).
- :func:`lstm_layers_packed`: ``nn.LSTM``'s kernel over ``pack_padded_sequence`` (a baseline).

Weights are resetbench's canonical layout: ``w_x`` [in, 4H], ``w_h`` [H, 4H], ``b`` [4H], gate
blocks i, f, g, o (``nn.LSTM``: ``weight_ih_l0 = w_x.T``, ``bias_ih + bias_hh = b``).
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

State = Tuple[torch.Tensor, ...]


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


def layer_loop(cell: Callable[[State, torch.Tensor, torch.Tensor], State], xp: torch.Tensor, reset: torch.Tensor,
               state: State, w_h: torch.Tensor) -> Tuple[torch.Tensor, State]:
    """One layer of any cell over a window, step by step. ``xp`` [B, T, G*H] (input projection +
    bias), ``reset`` [B, T, 1] bool: before step t the rows that reset get the zero state in every
    component (``torch.where``: a NaN or inf state is cleared too, and no gradient passes). Returns
    the outputs [B, T, H] (the state's first component) and the final state."""
    outs: List[torch.Tensor] = []
    zero = xp.new_zeros(())
    for xt, rt in zip(xp.unbind(1), reset.unbind(1)):   # unbind: slicing xp[:, t] makes backward slower
        state = cell(tuple(torch.where(rt, zero, s) for s in state), xt, w_h)
        outs.append(state[0])
    return torch.stack(outs, 1), state


def lstm_layers_loop(inp: torch.Tensor, reset: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                     weights: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], loop=None):
    """All LSTM layers through :func:`layer_loop` (or ``loop``, e.g. its compiled version);
    ``reset`` [B, T] bool tensor. Returns outputs [B, T, H] and final ``h``, ``c`` [L, B, H]."""
    loop = loop or functools.partial(layer_loop, lstm_cell)
    r = reset.unsqueeze(-1)
    hs, cs = [], []
    for layer, (w_x, w_h, b) in enumerate(weights):
        inp, (h, c) = loop(torch.matmul(inp, w_x) + b, r, (h0[layer], c0[layer]), w_h)
        hs.append(h)
        cs.append(c)
    return inp, torch.stack(hs), torch.stack(cs)


# --------------------------------------------------------------------------- the fused kernel
SATURATE = 1e6   # flag weight: sigmoid(-1e6 + z) == 0.0 and sigmoid(1e6 + z) == 1.0 in float32


class FusedPlan:
    """Where a window's tokens go in the rewritten window of the ``fused`` kernel (host side).

    ``reset`` [B, T] bool -> ``flat`` (index of each token in the flattened [B * T2] rewritten
    window), ``last`` (each row's last token there), ``flags`` [B, T2, 2] float32 (column 0:
    zeroing step, column 1: hold step) and ``T2 = T + K`` (``K``: most mid-window resets in a row).
    """

    def __init__(self, reset: np.ndarray):
        B, T = reset.shape
        mid = reset.copy()
        mid[:, 0] = False                                   # column 0: zero the initial state instead
        self.K = int(mid.sum(axis=1).max(initial=0))
        self.T2 = T2 = T + self.K
        pos = np.arange(T)[None, :] + np.cumsum(mid, axis=1)        # each token shifts by the resets so far
        flags = np.zeros((B, T2, 2), np.float32)
        rows, cols = np.nonzero(mid)
        flags[rows, pos[rows, cols] - 1, 0] = 1.0                  # zeroing step just before the reset
        flags[:, :, 1] = np.arange(T2)[None, :] > pos[:, -1:]      # hold steps after the last token
        offset = (np.arange(B) * T2)[:, None]
        self.flat = (pos + offset).reshape(-1)
        self.last = pos[:, -1] + offset[:, 0]
        self.flags = flags


def flag_weights(H: int, like: torch.Tensor) -> torch.Tensor:
    """[4H, 2] input weights of the two flag columns (gate blocks i, f, g, o)."""
    w = like.new_zeros(4 * H, 2)
    w[:2 * H, 0] = -SATURATE                 # zeroing: i = f = 0 -> c = 0, h = 0
    w[:H, 1] = -SATURATE                     # hold: i = 0, f = 1 -> c unchanged
    w[H:2 * H, 1] = SATURATE
    w[3 * H:, 1] = SATURATE                  # o = 1 (h = tanh(c), never read)
    return w


def _vf_lstm(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, params: List[torch.Tensor], layers: int):
    """``torch._VF.lstm`` (the op inside ``nn.LSTM``), batch-first; ``params`` per layer:
    weight_ih [4H, in], weight_hh [4H, H], bias_ih, bias_hh. Returns out, h_n, c_n."""
    return torch._VF.lstm(x, (h0, c0), params, True, layers, 0.0, torch.is_grad_enabled(), False, True)


def vf_params(weights: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> List[torch.Tensor]:
    """Canonical ``(w_x, w_h, b)`` per layer -> ``torch._VF.lstm``'s flat parameter list
    (weight_ih = w_x.T, weight_hh = w_h.T, bias_ih = b, bias_hh = 0): views, so gradients flow back."""
    zeros = weights[0][2].new_zeros(weights[0][2].shape)
    return [p for w_x, w_h, b in weights for p in (w_x.t(), w_h.t(), b, zeros)]


def lstm_layers_fused(inp: torch.Tensor, reset: np.ndarray, h0: torch.Tensor, c0: torch.Tensor,
                      weights: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """All LSTM layers over a window with per-row, per-step resets through the fused kernel.

    ``inp`` [B, T, E]; ``reset`` [B, T] bool (NumPy); ``h0``, ``c0`` [L, B, H]; ``weights``
    canonical ``(w_x, w_h, b)`` per layer. Returns outputs [B, T, H] and final ``h``, ``c``
    [L, B, H]. See the module docstring for the rewrite that makes the resets exact."""
    reset0 = torch.from_numpy(reset[:, 0]).to(inp.device)[None, :, None]
    h0, c0 = (torch.where(reset0, inp.new_zeros(()), s) for s in (h0, c0))   # a select: clears NaN too
    plan = FusedPlan(reset)
    if plan.K == 0:                                      # no mid-window reset: one plain fused call
        return _vf_lstm(inp, h0, c0, vf_params(weights), len(weights))
    out, h, c = _fused_rewritten(inp, plan, h0, c0, weights)
    if not bool(torch.isfinite(out).all() and torch.isfinite(c).all()):
        # a zeroing step multiplies the old c by 0, which keeps a NaN or inf: run the window
        # through the loop kernel, whose reset selects the zero state
        return lstm_layers_loop(inp, torch.from_numpy(reset).to(inp.device), h0, c0, weights)
    return out, h, c


def _fused_rewritten(inp: torch.Tensor, plan: "FusedPlan", h0: torch.Tensor, c0: torch.Tensor,
                     weights: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The window rewritten by ``plan`` through the fused kernel, layer by layer."""
    B, T, _ = inp.shape
    H = h0.shape[-1]
    dev = inp.device
    flat = torch.from_numpy(plan.flat).to(dev)
    last = torch.from_numpy(plan.last).to(dev)
    flags = torch.from_numpy(plan.flags).to(dev, inp.dtype)
    fw = flag_weights(H, inp)
    x = inp.new_zeros(B * plan.T2, inp.shape[-1]).index_copy(0, flat, inp.reshape(B * T, -1))
    x = x.view(B, plan.T2, -1)
    hs, cs = [], []
    for layer, (w_x, w_h, b) in enumerate(weights):
        params = vf_params([(w_x, w_h, b)])
        params[0] = torch.cat([params[0], fw], 1)        # weight_ih with the two flag columns
        x, _, c = _vf_lstm(torch.cat([x, flags], 2), h0[layer:layer + 1], c0[layer:layer + 1], params, 1)
        hs.append(x.reshape(B * plan.T2, H).index_select(0, last))   # h after the row's last token
        cs.append(c[0])                                              # c, held since then
    out = x.reshape(B * plan.T2, H).index_select(0, flat).view(B, T, H)
    return out, torch.stack(hs), torch.stack(cs)


def row_groups(reset: np.ndarray, min_saving: float = 0.05) -> List[np.ndarray]:
    """Rows to run as separate fused calls: one group, or two split by mid-window reset count
    when that saves at least ``min_saving`` of the rewritten window's slots. Every row of a group
    pays for the group's busiest row (``T + K`` steps), so a few busy rows would otherwise pad
    all the others; a second call costs a pass over the weights per step, hence the threshold."""
    B, T = reset.shape
    k = reset[:, 1:].sum(axis=1)
    order = np.argsort(k, kind="stable")
    ks = k[order]
    whole = B * (T + int(ks[-1])) if B else 0
    if B < 2 or ks[0] == ks[-1]:
        return [np.arange(B)]
    split = np.arange(1, B)
    slots = split * (T + ks[split - 1]) + (B - split) * (T + ks[-1])
    best = int(np.argmin(slots))
    if slots[best] > (1.0 - min_saving) * whole:
        return [np.arange(B)]
    cut = int(split[best])
    return [np.sort(order[:cut]), np.sort(order[cut:])]


def lstm_layers_fused_grouped(inp: torch.Tensor, reset: np.ndarray, h0: torch.Tensor, c0: torch.Tensor,
                              weights: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """:func:`lstm_layers_fused` over the row groups of :func:`row_groups` (rows are independent,
    so each group runs the whole layer stack on its own); same inputs and outputs."""
    groups = row_groups(reset)
    if len(groups) == 1:
        return lstm_layers_fused(inp, reset, h0, c0, weights)
    outs, hs, cs = [], [], []
    for rows in groups:
        idx = torch.from_numpy(rows).to(inp.device)
        o, h, c = lstm_layers_fused(inp.index_select(0, idx), reset[rows], h0.index_select(1, idx),
                                    c0.index_select(1, idx), weights)
        outs.append(o)
        hs.append(h)
        cs.append(c)
    inv = torch.from_numpy(np.argsort(np.concatenate(groups))).to(inp.device)
    return (torch.cat(outs).index_select(0, inv), torch.cat(hs, 1).index_select(1, inv),
            torch.cat(cs, 1).index_select(1, inv))


def lstm_layers_packed(inp: torch.Tensor, lengths: np.ndarray, h0: torch.Tensor, c0: torch.Tensor,
                       weights: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The ``peer`` baseline: ``nn.LSTM``'s kernel over ``pack_padded_sequence`` (zero initial
    state). Returns outputs [B, T, H] (zeros at padding) and the state after each row's last
    valid token, [L, B, H] each."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    B, T, _ = inp.shape
    params = vf_params(weights)
    packed = pack_padded_sequence(inp, torch.from_numpy(np.maximum(lengths, 1)), batch_first=True,
                                  enforce_sorted=False)
    zero = torch.zeros_like(h0)                           # the padded layout starts every row fresh
    out, h, c = torch._VF.lstm(packed.data, packed.batch_sizes, (zero, zero), params, True,
                               len(weights), 0.0, torch.is_grad_enabled(), False)
    out, _ = pad_packed_sequence(packed._replace(data=out), batch_first=True, total_length=T)
    order = packed.unsorted_indices
    return out, h.index_select(1, order), c.index_select(1, order)


class ResetLSTM(torch.nn.Module):
    """A reusable one-layer LSTM with per-row, per-timestep state resets.

    ``forward(x [B, T, in], reset [B, T] bool, state=None) -> (out [B, T, H], (h, c))``: row ``b``'s
    state is zeroed before step ``t`` where ``reset[b, t]`` (which also cuts the gradient). Feed the
    returned ``(h, c)``, detached, as the next window's ``state`` for stateful TBPTT over packed
    streams. Weights are in canonical layout (``w_x`` [in, 4H], ``w_h`` [H, 4H], ``b`` [4H], gates
    i, f, g, o): ``nn.LSTM``'s ``weight_ih_l0`` is ``w_x.T`` and ``bias_ih + bias_hh`` is ``b``.
    """

    def __init__(self, input_size: int, hidden_size: int, kernel: str = "fused"):
        super().__init__()
        if kernel not in ("fused", "loop"):
            raise ValueError(f"ResetLSTM kernel={kernel!r}: allowed fused, loop")
        bound = hidden_size ** -0.5
        self.hidden_size = hidden_size
        self.w_x = torch.nn.Parameter(torch.empty(input_size, 4 * hidden_size).uniform_(-bound, bound))
        self.w_h = torch.nn.Parameter(torch.empty(hidden_size, 4 * hidden_size).uniform_(-bound, bound))
        self.b = torch.nn.Parameter(torch.zeros(4 * hidden_size))
        self.kernel = kernel

    def forward(self, x: torch.Tensor, reset: torch.Tensor,
                state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        B = x.shape[0]
        if state is None:
            zeros = x.new_zeros(B, self.hidden_size)
            state = (zeros, zeros)
        if self.kernel == "fused":          # the rewrite is planned on the host: reset goes to NumPy
            out, h, c = lstm_layers_fused_grouped(x, reset.detach().bool().cpu().numpy(), state[0][None],
                                          state[1][None], [(self.w_x, self.w_h, self.b)])
            return out, (h[0], c[0])
        out, h, c = lstm_layers_loop(x, reset.bool(), state[0][None], state[1][None], [(self.w_x, self.w_h, self.b)])
        return out, (h[0], c[0])
