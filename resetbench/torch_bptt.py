"""The ``bptt`` kernel: a reset-aware time loop with a hand-written backward pass, for every cell.

PyTorch has no fused GRU on a CPU: ``nn.GRU`` runs ATen's step-by-step cell there, autograd
recording each step's matmul and elementwise ops. This kernel runs the same arithmetic as one
autograd node per layer and window (:class:`torch.autograd.Function`): the forward loop keeps the
gates, the backward loop is a handful of in-place elementwise ops and one matmul per step (the
elementwise derivative factors are computed for the whole window at once, after the forward
loop), and the weight gradients are one matmul over the whole window. The reset is exact and
costs nothing: before step t the rows that reset get the zero state (``torch.where``, a select:
NaN and inf are cleared too, and no gradient crosses), so the cost is the same at every reset
density, unlike the ``fused`` rewrite's extra steps.

Weights are resetbench's canonical layout (see :mod:`resetbench.torch_layers`). Time-major
buffers ([T, B, ...]) keep each step's slice contiguous.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

State = Tuple[torch.Tensor, ...]


def _carried_grad(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The gradient arriving at a final state component (zeros when the caller did not use it),
    as a fresh tensor the backward loop may replace step by step."""
    return grad.clone() if grad is not None else torch.zeros_like(like)


def _shifted(h0: torch.Tensor, hout: torch.Tensor, reset_tm: torch.Tensor) -> torch.Tensor:
    """The state entering each step, [T, B, H]: ``h0`` then the outputs of the steps before,
    zero where the row resets (one select for the whole window)."""
    prev = torch.cat([h0[None], hout[:-1]], 0)
    return torch.where(reset_tm[..., None], prev.new_zeros(()), prev)


class GruWindow(torch.autograd.Function):
    """One GRU layer over a window: ``(xp [T, B, 3H] = x w_x + b_x, h0 [B, H], w_h, b_h,
    reset [T, B] bool, cols: per step whether any row resets) -> (outputs [T, B, H], final h)``."""

    @staticmethod
    def forward(ctx, xp, h0, w_h, b_h, reset, cols):
        T, B, G = xp.shape
        H = G // 3
        ctx.cols = cols
        hp = xp.new_empty(T, B, G)          # h w_h + b_h
        gates = xp.new_empty(T, B, G)       # r, z, n after their nonlinearity
        hout = xp.new_empty(T, B, H)
        zero = xp.new_zeros(())
        h = h0
        for t in range(T):
            if cols[t]:
                h = torch.where(reset[t, :, None], zero, h)
            torch.addmm(b_h, h, w_h, out=hp[t])
            g = gates[t]
            torch.add(xp[t, :, :2 * H], hp[t, :, :2 * H], out=g[:, :2 * H]).sigmoid_()
            n = g[:, 2 * H:]
            torch.addcmul(xp[t, :, 2 * H:], g[:, :H], hp[t, :, 2 * H:], out=n).tanh_()
            h = torch.addcmul(n, g[:, H:2 * H], h - n, out=hout[t])
        ctx.save_for_backward(h0, hout, hp, gates, w_h, reset)
        return hout, h.clone()

    @staticmethod
    def backward(ctx, dout, dh_final):
        h0, hout, hp, gates, w_h, reset = ctx.saved_tensors
        T, B, H = hout.shape
        cols = ctx.cols
        hin = _shifted(h0, hout, reset)
        r, z, n = gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:]
        # derivative factors of the whole window: h' = (1 - z) n + z h_in
        a_n = (1 - z) * (1 - n * n)                       # dh' -> n's pre-activation
        a_z = (hin - n) * z * (1 - z)                     # dh' -> z's pre-activation
        a_r = hp[..., 2 * H:] * r * (1 - r)               # n's pre-activation -> r's
        dpre = hp.new_empty(T, B, 3 * H)                  # d(h w_h + b_h): r, z, n * r
        dn = hp.new_empty(T, B, H)                        # d(n's pre-activation) = d(xp_n)
        dh, zero, w_t = _carried_grad(dh_final, h0), hout.new_zeros(()), w_h.t()
        for t in range(T - 1, -1, -1):
            if dout is not None:
                dh = dh + dout[t]
            d = dpre[t]
            torch.mul(dh, a_n[t], out=dn[t])
            torch.mul(dh, a_z[t], out=d[:, H:2 * H])
            torch.mul(dn[t], a_r[t], out=d[:, :H])
            torch.mul(dn[t], r[t], out=d[:, 2 * H:])
            dh = torch.addmm(dh * z[t], d, w_t)
            if cols[t]:
                dh = torch.where(reset[t, :, None], zero, dh)
        dxp = torch.cat([dpre[..., :2 * H], dn], 2)
        dw_h = hin.reshape(T * B, H).t() @ dpre.reshape(T * B, 3 * H)
        return dxp, dh, dw_h, dpre.sum((0, 1)), None, None


class LstmWindow(torch.autograd.Function):
    """One LSTM layer over a window: ``(xp [T, B, 4H] = x w_x + b, h0, c0 [B, H], w_h,
    reset [T, B] bool, cols: per step whether any row resets) -> (outputs [T, B, H], final h,
    final c)``."""

    @staticmethod
    def forward(ctx, xp, h0, c0, w_h, reset, cols):
        T, B, G = xp.shape
        H = G // 4
        ctx.cols = cols
        gates = xp.new_empty(T, B, G)       # i, f, g, o after their nonlinearity
        cout = xp.new_empty(T, B, H)
        hout = xp.new_empty(T, B, H)
        zero = xp.new_zeros(())
        h, c = h0, c0
        for t in range(T):
            if cols[t]:
                rt = reset[t, :, None]
                h, c = torch.where(rt, zero, h), torch.where(rt, zero, c)
            g = torch.addmm(xp[t], h, w_h, out=gates[t])
            g[:, :2 * H].sigmoid_()
            g[:, 2 * H:3 * H].tanh_()
            g[:, 3 * H:].sigmoid_()
            c = torch.addcmul(c * g[:, H:2 * H], g[:, :H], g[:, 2 * H:3 * H], out=cout[t])
            h = torch.mul(g[:, 3 * H:], torch.tanh(c), out=hout[t])
        ctx.save_for_backward(h0, c0, hout, cout, gates, w_h, reset)
        return hout, h.clone(), c.clone()

    @staticmethod
    def backward(ctx, dout, dh_final, dc_final):
        h0, c0, hout, cout, gates, w_h, reset = ctx.saved_tensors
        T, B, H = hout.shape
        cols = ctx.cols
        hin, cin = _shifted(h0, hout, reset), _shifted(c0, cout, reset)
        i, f, g, o = (gates[..., k * H:(k + 1) * H] for k in range(4))
        tc = torch.tanh(cout)
        # derivative factors of the whole window: c' = f c_in + i g, h' = o tanh(c')
        a_c = o * (1 - tc * tc)                           # dh' -> dc'
        a = torch.cat([g * i * (1 - i), cin * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)], 2)
        dpre = gates.new_empty(T, B, 4 * H)               # d(gate pre-activations)
        dh, dc = _carried_grad(dh_final, h0), _carried_grad(dc_final, c0)
        zero, w_t = hout.new_zeros(()), w_h.t()
        for t in range(T - 1, -1, -1):
            if dout is not None:
                dh = dh + dout[t]
            dc = torch.addcmul(dc, dh, a_c[t])
            d = dpre[t]
            d.view(B, 4, H)[:, :3] = dc[:, None]
            d[:, 3 * H:] = dh
            d.mul_(a[t])
            dh = d @ w_t
            dc = dc * f[t]
            if cols[t]:
                rt = reset[t, :, None]
                dh, dc = torch.where(rt, zero, dh), torch.where(rt, zero, dc)
        dw_h = hin.reshape(T * B, H).t() @ dpre.reshape(T * B, 4 * H)
        return dpre, dh, dc, dw_h, None, None


def layers_bptt(cell: str, inp: torch.Tensor, reset: torch.Tensor, state: State,
                layers: Sequence[dict]) -> Tuple[torch.Tensor, State]:
    """Every layer over a window through :class:`LstmWindow` / :class:`GruWindow`. ``inp`` [B, T,
    in], ``reset`` [B, T] bool tensor, ``state`` one [L, B, H] tensor per state component.
    Returns the outputs [B, T, H] and the final state."""
    reset_tm = reset.t().contiguous()
    cols = tuple(reset.any(0).tolist())          # steps where some row resets: one host read per window
    x = inp.transpose(0, 1)                               # time-major
    finals: List[State] = []
    for layer, p in enumerate(layers):
        if cell == "lstm":
            x, h, c = LstmWindow.apply(torch.matmul(x, p["w_x"]) + p["b"], state[0][layer], state[1][layer],
                                       p["w_h"], reset_tm, cols)
            finals.append((h, c))
        elif cell == "gru":
            x, h = GruWindow.apply(torch.matmul(x, p["w_x"]) + p["b_x"], state[0][layer], p["w_h"], p["b_h"],
                                   reset_tm, cols)
            finals.append((h,))
        else:
            raise ValueError(f"layers_bptt cell={cell!r}: allowed lstm, gru")
    return x.transpose(0, 1), tuple(torch.stack(parts) for parts in zip(*finals))
