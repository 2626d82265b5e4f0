"""``backend=torch``: the contract's per-sample-reset LSTM in PyTorch.

Parameters are kept in canonical layout (``w_x`` [in, 4H], gates i, f, g, o), so import and
export are copies. Kernels (``backend.kernel``, recorded as ``kernel`` in ``summary.json``):

- ``fused`` (default): the framework's fused LSTM kernel (``torch._VF.lstm``, the op behind
  ``nn.LSTM``: oneDNN on the CPU, cuDNN on a GPU) made reset-aware by two constant input
  columns. No vendor kernel takes a per-row, per-step reset, so :func:`fused_plan` rewrites the
  window instead: before each mid-window reset it inserts one *zeroing* step whose flag drives
  the input and forget gates to exactly 0 (so ``c = 0`` and ``h = o * tanh(0) = 0``, and no
  gradient flows back through the step), and after each row's last token it appends *hold*
  steps (input gate 0, forget and output gates 1) so every row's ``c`` is held until the end of
  the rewritten window. Saturated sigmoids are exactly 0 or 1 in float32, so the result equals
  the contract's math (checked against the oracle like every kernel). A window with ``K`` resets
  in its busiest row costs ``T + K`` steps instead of ``T``; a window without mid-window resets
  is one plain fused call (column-0 resets zero the initial state). A zeroing step multiplies the
  old ``c`` by 0, which keeps a NaN or inf; a window whose rewritten outputs are not finite is
  therefore run again through ``loop``, whose reset selects the zero state.
- ``loop``: one time loop for every cell (:func:`layer_loop`, the cell :func:`lstm_cell`): before
  each step the rows that reset get the zero state (``torch.where``), then one ``addmm`` per step
  (input projection hoisted). Per-step inputs via ``unbind`` (slicing ``xp[:, t]`` makes backward
  several times slower).
- ``compile``: the loop under ``torch.compile``, one graph per window shape, built in
  :meth:`TorchBackend.precompile`.
- Baselines (roles ``native`` and ``peer`` in ``conf/backend/torch.yaml``): ``native`` is the
  plain fused kernel (no mid-window reset possible); ``peer`` is ``nn.LSTM``'s kernel over
  ``pack_padded_sequence``, what a torch user writes for variable-length batches. Each batch is
  checked for the layout properties the kernel declares (``needs``). Both train only;
  ``eval_step`` runs ``self.eval_kernel`` (the default, exact ``fused``) on the same weights,
  because evaluation feeds packed eval streams (every sequence from a zero state) to every kernel.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from resetbench.torch_layers import (layer_loop, lstm_cell, lstm_layers_fused_grouped, lstm_layers_loop,
                                     lstm_layers_packed)
from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec, row_lengths

# the kernels this adapter implements (backend.kernel) -> the name recorded as ``kernel``
KERNEL_NAMES = {"fused": "torch.fused", "loop": "torch.loop", "compile": "torch.compile",
                "native": "torch.native.nn_LSTM", "peer": "torch.peer.pack_padded_sequence"}
_COMPILED: Dict[str, Any] = {}


def _compiled_loop():
    """The LSTM :func:`layer_loop` under ``torch.compile`` (static shapes), once per process."""
    if "loop" not in _COMPILED:
        _COMPILED["loop"] = torch.compile(functools.partial(layer_loop, lstm_cell), dynamic=False)
    return _COMPILED["loop"]


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
                 batch_size: int, device: str = "auto", kernel: str = "fused",
                 threads: Optional[int] = None, **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, kernel=kernel, **options)
        for k in (self.kernel_option, self.eval_kernel):
            if k not in KERNEL_NAMES:
                raise ConfigError("backend.kernel", k, f"allowed for backend=torch: {', '.join(KERNEL_NAMES)}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.dev = resolve_device(device)
        self.device = self.dev.type
        self.kernel = KERNEL_NAMES[kernel]
        self._compiled = "compile" in (self.kernel_option, self.eval_kernel)
        self._loop = _compiled_loop() if self._compiled else None         # None: the eager loop
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
    def _to_device(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nb = self.dev.type == "cuda"
        x = torch.from_numpy(batch.x).to(self.dev, non_blocking=nb)
        y = torch.from_numpy(batch.y).to(self.dev, non_blocking=nb).long()
        mask = torch.from_numpy(batch.mask).to(self.dev, non_blocking=nb)
        return x, y, mask

    def _lstm_weights(self) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(self.p[f"lstm.{l}.w_x"], self.p[f"lstm.{l}.w_h"], self.p[f"lstm.{l}.b"])
                for l in range(self.spec.layers)]

    def _layers(self, inp: torch.Tensor, batch: Batch, kernel: str):
        """All LSTM layers from the carried state with ``kernel``: outputs, final h, c. ``native``
        is the fused kernel on windows whose only resets are at column 0 (checked by
        :meth:`check_batch`), where it is one plain fused call."""
        if kernel in ("loop", "compile"):
            return lstm_layers_loop(inp, torch.from_numpy(batch.reset).to(self.dev), self.h, self.c,
                                    self._lstm_weights(), self._loop if kernel == "compile" else None)
        if kernel == "peer":
            return lstm_layers_packed(inp, row_lengths(batch), self.h, self.c, self._lstm_weights())
        return lstm_layers_fused_grouped(inp, batch.reset, self.h, self.c, self._lstm_weights())

    def _logits(self, x: torch.Tensor, batch: Batch, kernel: Optional[str] = None) -> torch.Tensor:
        """Forward from the carried state with ``kernel`` (default: the training kernel, after
        checking the batch's layout); stores the (detached) final state."""
        if kernel is None:
            self.check_batch(batch)
            kernel = self.kernel_option
        out, h, c = self._layers(F.embedding(x, self.p["embedding"]), batch, kernel)
        self.h, self.c = h.detach(), c.detach()
        return torch.matmul(out, self.p["head.w"]) + self.p["head.b"]

    @staticmethod
    def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction="none").view_as(y.float())

    def _loss(self, batch: Batch) -> torch.Tensor:
        x, y, mask = self._to_device(batch)
        ce = self._ce(self._logits(x, batch), y)
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
        x, _, _ = self._to_device(batch)
        return self._logits(x, batch).cpu().numpy()

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> float:
        x, y, mask = self._to_device(batch)
        return float((self._ce(self._logits(x, batch, self.eval_kernel), y) * mask).sum())

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
        if not self._compiled:
            return
        H = self.spec.hidden
        w_h = self.p["lstm.0.w_h"].detach().clone().requires_grad_(True)
        for shapes, grad, kernel in ((train_shapes, True, self.kernel_option), (eval_shapes, False, self.eval_kernel)):
            if kernel != "compile":
                continue
            for B, T in shapes:
                with torch.set_grad_enabled(grad):
                    xp = torch.zeros(B, T, 4 * H, device=self.dev, requires_grad=grad)
                    reset = torch.zeros(B, T, 1, dtype=torch.bool, device=self.dev)
                    h = torch.zeros(B, H, device=self.dev)
                    out, _ = self._loop(xp, reset, (h, h), w_h if grad else w_h.detach())
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

    def matmul(self, m: int, k: int, n: int):
        a, b = torch.randn(m, k, device=self.dev), torch.randn(k, n, device=self.dev)

        def run() -> None:
            torch.matmul(a, b)
            self.synchronize()
        return run
