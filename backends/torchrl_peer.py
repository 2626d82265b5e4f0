"""Kernel ``torchrl`` of ``backend=torch`` (role ``peer_reset``): TorchRL's ``LSTMModule`` /
``GRUModule`` in recurrent mode, the per-sample-reset layer an RL user of PyTorch would pick.

TorchRL reads resets from ``is_init`` (a row's trajectory starts at that step) and the state from
the tensordict's per-step hidden entries: in recurrent mode (its default ``pad`` backend) it cuts
each row at its ``is_init`` steps, pads the pieces into a batch of trajectories, runs the wrapped
``nn.LSTM`` / ``nn.GRU`` over ``pack_padded_sequence``, and starts each piece from the hidden entry
stored at its first step. Feeding it the carried state at column 0 (zero where that row resets: a
``torch.where``, so a NaN state is cleared too) and zeros at every other step is what an RL
rollout stores, and gives the contract's rule: a row's state is zero before a step where reset is
set. The module's own parameters are never used: :func:`torch.func.functional_call` runs it on
views of the canonical weights (``CELLS[cell].vf_params``: nn.LSTM's layout, the LSTM's bias as
``bias_ih`` with a zero ``bias_hh``), so autograd maps the gradients back to canonical keys.
torchrl and tensordict are imported only here, when the kernel is built.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from resetbench.torch_layers import CELLS

_MODULES: Dict[Tuple[str, int, int, int, str], torch.nn.Module] = {}
STATE_KEYS = {"lstm": ("h", "c"), "gru": ("h",)}


def torchrl_module(cell: str, inputs: int, hidden: int, layers: int, device: torch.device) -> torch.nn.Module:
    """TorchRL's module for ``cell`` (recurrent mode, its default ``pad`` backend), once per
    shape and device."""
    key = (cell, inputs, hidden, layers, str(device))
    if key not in _MODULES:
        from torchrl.modules import GRUModule, LSTMModule

        states = STATE_KEYS[cell]
        cls = LSTMModule if cell == "lstm" else GRUModule
        _MODULES[key] = cls(input_size=inputs, hidden_size=hidden, num_layers=layers, batch_first=True,
                            in_keys=["x", *states, "is_init"], out_keys=["y", *(f"{s}_out" for s in states)],
                            default_recurrent_mode=True).to(device)
    return _MODULES[key]


def layers_torchrl(cell: str, inp: torch.Tensor, reset: np.ndarray, state: Tuple[torch.Tensor, ...],
                   layers: Sequence[Dict[str, torch.Tensor]]):
    """All layers through TorchRL's module: ``inp`` [B, T, E], ``reset`` [B, T] (host),
    ``state`` one [L, B, H] tensor per state component, ``layers`` each layer's canonical weights.
    Returns the outputs [B, T, H] and the final state (one [L, B, H] tensor per component)."""
    from tensordict import TensorDict

    B, T = reset.shape
    L, H = len(layers), state[0].shape[-1]
    module = torchrl_module(cell, inp.shape[-1], H, L, inp.device)
    is_init = torch.from_numpy(np.ascontiguousarray(reset)).to(inp.device)
    fresh = is_init[:, 0].view(B, 1, 1)
    entries = {}
    for name, s in zip(STATE_KEYS[cell], state):
        first = torch.where(fresh, torch.zeros((), dtype=s.dtype, device=s.device), s.transpose(0, 1))  # [B, L, H]
        entries[name] = torch.cat([first[:, None], s.new_zeros(B, T - 1, L, H)], 1)           # [B, T, L, H]
    td = TensorDict({"x": inp, **entries, "is_init": is_init[..., None]}, batch_size=[B, T], device=inp.device)
    params = {}
    for l, p in enumerate(layers):
        for kind, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), CELLS[cell].vf_params(p)):
            params[f"{'lstm' if cell == 'lstm' else 'gru'}.{kind}_l{l}"] = value
    out = torch.func.functional_call(module, params, (td,))
    # each component's final state sits at the last step of the row's last trajectory
    final = tuple(out[f"{name}_out"][:, -1].transpose(0, 1) for name in STATE_KEYS[cell])
    return out["y"], final


def versions() -> Dict[str, str]:
    import tensordict
    import torchrl

    return {"torchrl": torchrl.__version__, "tensordict": tensordict.__version__}
