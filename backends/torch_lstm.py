"""``backend=torch``: the contract's per-sample-reset LSTM in PyTorch.

Parameters are kept in canonical layout (``w_x`` [in, 4H], gates i, f, g, o), so import and
export are copies. Per layer, the input projection of the whole window is one matmul; only the
recurrent ``addmm`` and the gate arithmetic run inside the time loop. The reset is a multiply of
the carried state by ``keep = 1 - reset[:, t]`` before step ``t``, which also zeroes the
gradient through it. Per-step inputs are taken with ``unbind`` (slicing ``xp[:, t]`` makes
backward several times slower).

Kernels (``backend.kernel``): ``loop`` (eager), ``script`` (the same loop under
``torch.jit.script``) and ``compile`` (the loop under ``torch.compile``, one graph per window
shape, compiled in :meth:`TorchBackend.precompile`, outside the timed loop). Measured on 2 CPU
cores at B=32, T=64, H=256: compile ~1.7x loop's tokens/s, but ~2 min to compile each shape,
so ``loop`` is the default and ``compile`` suits long runs with few shapes (packed, reset_all).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec

KERNELS = ("loop", "script", "compile")


def lstm_layer_loop(xp: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                    w_h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer over a window. ``xp`` [B, T, 4H] (input projection + bias), ``keep``
    [B, T, 1] (0 where the state resets before step t). Returns outputs [B, T, H], final h, c."""
    outs: List[torch.Tensor] = []
    H = h.shape[1]
    for xt, kt in zip(xp.unbind(1), keep.unbind(1)):
        h = h * kt
        c = c * kt
        z = torch.addmm(xt, h, w_h)
        i = torch.sigmoid(z[:, :H])
        f = torch.sigmoid(z[:, H:2 * H])
        g = torch.tanh(z[:, 2 * H:3 * H])
        o = torch.sigmoid(z[:, 3 * H:])
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1), h, c


_SCRIPTED: Dict[str, Any] = {}


def _scripted_layer():
    """``lstm_layer_loop`` compiled by TorchScript once per process."""
    if "layer" not in _SCRIPTED:
        _SCRIPTED["layer"] = torch.jit.script(lstm_layer_loop)
    return _SCRIPTED["layer"]


class ResetLSTM(torch.nn.Module):
    """A reusable one-layer LSTM with per-row, per-timestep state resets.

    ``forward(x [B, T, in], reset [B, T] bool, state=None) -> (out [B, T, H], (h, c))``: row ``b``'s
    state is zeroed before step ``t`` where ``reset[b, t]`` (which also cuts the gradient). Feed the
    returned ``(h, c)``, detached, as the next window's ``state`` for stateful TBPTT over packed
    streams. Weights are in canonical layout (``w_x`` [in, 4H], ``w_h`` [H, 4H], ``b`` [4H], gates
    i, f, g, o): ``nn.LSTM``'s ``weight_ih_l0`` is ``w_x.T`` and ``bias_ih + bias_hh`` is ``b``.
    """

    def __init__(self, input_size: int, hidden_size: int, script: bool = False):
        super().__init__()
        bound = hidden_size ** -0.5
        self.hidden_size = hidden_size
        self.w_x = torch.nn.Parameter(torch.empty(input_size, 4 * hidden_size).uniform_(-bound, bound))
        self.w_h = torch.nn.Parameter(torch.empty(hidden_size, 4 * hidden_size).uniform_(-bound, bound))
        self.b = torch.nn.Parameter(torch.zeros(4 * hidden_size))
        self._layer = _scripted_layer() if script else lstm_layer_loop

    def forward(self, x: torch.Tensor, reset: torch.Tensor,
                state: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        B = x.shape[0]
        if state is None:
            zeros = x.new_zeros(B, self.hidden_size)
            state = (zeros, zeros)
        keep = (~reset.bool()).to(x.dtype).unsqueeze(-1)
        xp = torch.matmul(x, self.w_x) + self.b
        out, h, c = self._layer(xp, keep, state[0], state[1], self.w_h)
        return out, (h, c)


def _compiled_layer():
    """``lstm_layer_loop`` under ``torch.compile`` (static shapes), once per process."""
    if "compiled" not in _SCRIPTED:
        _SCRIPTED["compiled"] = torch.compile(lstm_layer_loop, dynamic=False)
    return _SCRIPTED["compiled"]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when PyTorch sees one, else CPU; ``cuda`` without a GPU is a user error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", device, "allowed: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", device, "PyTorch sees no CUDA device here; use auto or cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class TorchBackend(Backend):
    """PyTorch adapter: eager (or TorchScript) reset-aware LSTM, Adam or SGD, global-norm clip."""

    name = "torch"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optimizer: OptimizerSpec,
                 batch_size: int, device: str = "auto", kernel: str = "loop",
                 threads: Optional[int] = None, **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, **options)
        if kernel not in KERNELS:
            raise ConfigError("backend.kernel", kernel, f"allowed for backend=torch: {', '.join(KERNELS)}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.dev = resolve_device(device)
        self.device = self.dev.type
        self.kernel = f"torch.{kernel}"
        self._layer = {"loop": lstm_layer_loop, "script": _scripted_layer,
                       "compile": _compiled_layer}[kernel]
        if kernel != "loop":
            self._layer = self._layer()
        self.p = {k: torch.nn.Parameter(torch.tensor(np.asarray(v, np.float32), device=self.dev))
                  for k, v in weights.items()}
        params = list(self.p.values())
        if optimizer.name == "adam":
            self.opt = torch.optim.Adam(params, lr=optimizer.lr, betas=(optimizer.beta1, optimizer.beta2),
                                        eps=optimizer.eps)
        elif optimizer.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=optimizer.lr, momentum=0.0)
        else:
            raise ConfigError("train.optimizer", optimizer.name, "allowed: adam, sgd")
        self.reset_state(batch_size)

    # -- model ---------------------------------------------------------------------------------
    def _to_device(self, batch: Batch) -> Tuple[torch.Tensor, ...]:
        nb = self.dev.type == "cuda"
        x = torch.from_numpy(batch.x).to(self.dev, non_blocking=nb)
        y = torch.from_numpy(batch.y).to(self.dev, non_blocking=nb).long()
        mask = torch.from_numpy(batch.mask).to(self.dev, non_blocking=nb)
        keep = torch.from_numpy(~batch.reset).to(self.dev, non_blocking=nb).to(torch.float32).unsqueeze(-1)
        return x, y, mask, keep

    def _logits(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Forward from the carried state; stores the (detached) final state."""
        inp = F.embedding(x, self.p["embedding"])
        hs, cs = [], []
        for layer in range(self.spec.layers):
            xp = torch.matmul(inp, self.p[f"lstm.{layer}.w_x"]) + self.p[f"lstm.{layer}.b"]
            inp, h, c = self._layer(xp, keep, self.h[layer], self.c[layer], self.p[f"lstm.{layer}.w_h"])
            hs.append(h.detach())
            cs.append(c.detach())
        self.h, self.c = torch.stack(hs), torch.stack(cs)
        return torch.matmul(inp, self.p["head.w"]) + self.p["head.b"]

    @staticmethod
    def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="none").view_as(y.float())

    def _loss(self, batch: Batch) -> torch.Tensor:
        x, y, mask, keep = self._to_device(batch)
        ce = self._ce(self._logits(x, keep), y)
        return (ce * mask).sum() / mask.sum().clamp(min=1.0)

    def _clip(self) -> None:
        clip = self.optimizer.clip_norm
        if clip is None:
            return
        grads = [p.grad for p in self.p.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = clip / torch.clamp(norm, min=clip)
        for g in grads:
            g.mul_(scale)

    # -- protocol ------------------------------------------------------------------------------
    def train_step(self, batch: Batch) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        loss.backward()
        self._clip()
        self.opt.step()
        return loss.detach()

    def gradients(self, batch: Batch) -> Tuple[float, Dict[str, np.ndarray]]:
        for p in self.p.values():
            p.grad = None
        loss = self._loss(batch)
        loss.backward()
        grads = {k: (p.grad.detach().cpu().numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
                 for k, p in self.p.items()}
        for p in self.p.values():
            p.grad = None
        return float(loss.detach()), grads

    @torch.no_grad()
    def forward(self, batch: Batch) -> np.ndarray:
        x, _, _, keep = self._to_device(batch)
        return self._logits(x, keep).cpu().numpy()

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> float:
        x, y, mask, keep = self._to_device(batch)
        return float((self._ce(self._logits(x, keep), y) * mask).sum())

    def get_state(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.h.cpu().numpy().copy(), self.c.cpu().numpy().copy()

    def set_state(self, h: np.ndarray, c: np.ndarray) -> None:
        self.h = torch.tensor(np.asarray(h, np.float32), device=self.dev)
        self.c = torch.tensor(np.asarray(c, np.float32), device=self.dev)
        self.batch_size = self.h.shape[1]

    def get_weights(self) -> Dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy().copy() for k, p in self.p.items()}

    def precompile(self, train_shapes, eval_shapes=()) -> None:
        """For ``kernel=compile``: build the forward+backward graphs of every train shape and the
        no-grad graph of every eval shape on dummy tensors (weights, optimizer and state untouched)."""
        if not self.kernel.endswith("compile"):
            return
        H = self.spec.hidden
        w_h = self.p["lstm.0.w_h"].detach().clone().requires_grad_(True)
        for shapes, grad in ((train_shapes, True), (eval_shapes, False)):
            for B, T in shapes:
                with torch.set_grad_enabled(grad):
                    xp = torch.zeros(B, T, 4 * H, device=self.dev, requires_grad=grad)
                    keep = torch.ones(B, T, 1, device=self.dev)
                    h = torch.zeros(B, H, device=self.dev)
                    out, _, _ = self._layer(xp, keep, h, h, w_h if grad else w_h.detach())
                    if grad:
                        out.sum().backward()

    def synchronize(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def peak_memory_bytes(self) -> Optional[int]:
        if self.dev.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.dev))
        return None

    def versions(self) -> Dict[str, str]:
        return {"torch": torch.__version__, "numpy": np.__version__}
