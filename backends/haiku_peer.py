"""Kernel ``haiku`` of ``backend=jax`` (role ``peer_reset``): Haiku's ``hk.ResetCore(hk.LSTM(H))``
under ``hk.dynamic_unroll``, the per-sample-reset layer a JAX user of DeepMind's stack would pick.

``ResetCore`` takes ``(inputs, should_reset)`` per step and, where ``should_reset`` is set, swaps
the row's state for the core's initial state (zeros for ``hk.LSTM``, a ``jnp.where``: a NaN state
is cleared too) before the step: the contract's reset rule. ``hk.LSTM`` keeps one ``hk.Linear`` of
the concatenated ``[x, h]`` (``lstm/linear``: ``w`` [E + H, 4H], ``b`` [4H]) with its gate blocks
in the order i, g, f, o, and adds 1 to the forget gate's pre-activation. :func:`haiku_lstm_params`
builds those parameters from the canonical ones (gates i, f, g, o; the forget block of ``b``
minus 1, so the canonical bias is exact) inside the jitted step, so autodiff maps the gradients
back to canonical keys. LSTM only: ``hk.GRU`` is another GRU (its reset gate multiplies the state
before the recurrent matmul). haiku is imported only here, when the kernel is built.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

HAIKU_ORDER = (0, 2, 1, 3)          # haiku's gate blocks (i, g, f, o) as canonical blocks (i, f, g, o)
FORGET_BIAS = 1.0                   # what hk.LSTM adds to the forget gate's pre-activation


def haiku_lstm_params(p: Dict[str, jax.Array], forget_bias: float = FORGET_BIAS) -> Dict[str, Any]:
    """One layer's canonical weights (``w_x`` [in, 4H], ``w_h`` [H, 4H], ``b`` [4H]) as the
    parameters of ``hk.LSTM`` (``forget_bias``: what is subtracted from the forget block of
    ``b``; the tests pass 0 to show the check fails without it)."""
    H = p["w_h"].shape[0]
    block = lambda a, k: a[..., k * H:(k + 1) * H]                   # noqa: E731
    w = jnp.concatenate([p["w_x"], p["w_h"]], axis=0)
    return {"lstm/linear": {"w": jnp.concatenate([block(w, k) for k in HAIKU_ORDER], axis=-1),
                            "b": jnp.concatenate([block(p["b"], k) - (forget_bias if k == 1 else 0.0)
                                                  for k in HAIKU_ORDER], axis=-1)}}


@functools.lru_cache(maxsize=None)
def _unroll(hidden: int, unroll: int):
    """``apply(params, inputs, reset, h, c)`` of ``hk.dynamic_unroll(hk.ResetCore(hk.LSTM(H)))``,
    time-major: ``inputs`` [T, B, E], ``reset`` [T, B]; returns (outputs [T, B, H], LSTMState)."""
    import haiku as hk

    def f(inputs, reset, h, c):
        core = hk.ResetCore(hk.LSTM(hidden))
        return hk.dynamic_unroll(core, (inputs, reset), hk.LSTMState(hidden=h, cell=c), time_major=True,
                                 unroll=unroll)
    return hk.without_apply_rng(hk.transform(f)).apply


def haiku_layers(params: Dict[str, jax.Array], state, inp: jax.Array, reset: jax.Array, mask: Optional[jax.Array],
                 layers: int, unroll: int, cell: str, forget_bias: float = FORGET_BIAS):
    """A layer stack of :data:`backends.jax_lstm.LAYER_STACKS`: ``inp`` [T, B, E] time-major,
    ``reset`` [B, T], ``state`` (h, c) each [L, B, H]; returns the last layer's outputs and each
    layer's final (h, c)."""
    if cell != "lstm":
        raise ValueError(f"kernel haiku runs the LSTM only, not {cell!r}")
    r = reset.T                                                 # [T, B]
    H = state[0].shape[-1]
    finals = []
    for layer in range(layers):
        p = {k.rsplit(".", 1)[1]: v for k, v in params.items() if k.startswith(f"lstm.{layer}.")}
        inp, last = _unroll(H, unroll)(haiku_lstm_params(p, forget_bias), inp, r, state[0][layer], state[1][layer])
        finals.append((last.hidden, last.cell))
    return inp, finals


def versions() -> Dict[str, str]:
    import haiku

    return {"dm-haiku": haiku.__version__}
