"""``backend=torch``: the contract's per-sample-reset model in PyTorch, for every cell (LSTM, GRU).

Parameters are kept in canonical layout, so import and export are copies; the layers are those of
:mod:`resetbench.torch_layers` (read its docstring for how each kernel keeps the reset exact).
Kernels (``backend.kernel``, recorded as ``kernel`` in ``summary.json``):

- ``fused`` (default): the fastest exact implementation for the cell and device. The LSTM on a
  CPU in float32: ``cpp`` on windows with mid-window resets, one plain oneDNN call on the others
  (recorded as ``kernel`` ``torch.fused.cpp``; where the C++ extension cannot be built, one warning
  and ``rewrite``, recorded as ``torch.fused``); the GRU on a CPU (PyTorch has no fused GRU there):
  ``bptt``, recorded as ``torch.fused.bptt``; on a GPU: ``rewrite`` (cuDNN).
- ``rewrite``: the framework's fused kernel (``torch._VF.lstm`` / ``torch._VF.gru``, the ops behind
  ``nn.LSTM``/``nn.GRU``: oneDNN for the LSTM on the CPU, cuDNN on a GPU) on the window rewritten
  with zeroing and hold steps driven by saturating flag columns, the pieces between resets packed
  across rows (a window of B rows with R mid-window resets costs about ``T + R / B`` steps instead
  of T); a window without mid-window resets is one plain fused call; a window whose rewritten
  outputs are not finite runs again through ``loop``. On every device (for the GRU on a CPU,
  through ATen's step-by-step GRU: slower than ``bptt``, kept so it is measured and tested there).
- ``bptt``: a time loop with a hand-written backward pass (:mod:`resetbench.torch_bptt`), one
  autograd node per layer and window; the reset is a select, so the cost does not depend on the
  reset density.
- ``loop``: one time loop for every cell (``layer_loop``): before each step the rows that reset
  get the zero state (``torch.where``), then the cell's step (input projection hoisted).
- ``compile``: the loop under ``torch.compile``, one graph per window shape, built in
  :meth:`TorchBackend.precompile`.
- ``cpp``: the LSTM's time loop in C++ with the reset inside the step (:mod:`resetbench.torch_cpp`,
  CPU only): the same cost at every reset density; compiled on first use (a C++ compiler and
  ninja; built in :meth:`TorchBackend.precompile`, before anything is timed).
- Baselines (roles ``native`` and ``peer`` in ``conf/backend/torch.yaml``): ``native`` is the
  plain fused kernel (no mid-window reset possible); ``peer`` is the fused kernel over
  ``pack_padded_sequence``, what a torch user writes for variable-length batches. Each batch is
  checked for the layout properties the kernel declares (``needs``). Both train only;
  ``eval_step`` runs ``self.eval_kernel`` (the default, exact ``fused``) on the same weights,
  because evaluation feeds packed eval streams (every sequence from a zero state) to every kernel.
- ``torchrl`` (role ``peer_reset``: another library's reset-aware layer, the same semantics as the
  exact kernels): TorchRL's ``LSTMModule`` / ``GRUModule`` in recurrent mode with ``is_init``
  (:mod:`backends.torchrl_peer`; needs the ``peers`` extra). Trains only, like the baselines.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from resetbench.torch_bptt import layers_bptt
from resetbench.torch_layers import (CELLS, fused_implementation, layer_loop, layers_fused, layers_loop, layers_packed,
                                    layers_rewrite)
from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec, row_lengths

# the kernels this adapter implements (backend.kernel) -> the name recorded as ``kernel``
KERNEL_NAMES = {"fused": "torch.fused", "rewrite": "torch.rewrite", "bptt": "torch.bptt", "loop": "torch.loop",
                "compile": "torch.compile", "cpp": "torch.cpp",
                "native": "torch.native.nn_{CELL}", "peer": "torch.peer.pack_padded_sequence",
                "torchrl": "torch.peer_reset.torchrl_{CELL}Module"}
_COMPILED: Dict[str, Any] = {}


def _compiled_loop(cell: str):
    """The cell's :func:`layer_loop` under ``torch.compile`` (static shapes), once per process."""
    if cell not in _COMPILED:
        _COMPILED[cell] = torch.compile(functools.partial(layer_loop, CELLS[cell].step), dynamic=False)
    return _COMPILED[cell]


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
    """PyTorch adapter: the reset-aware layers of resetbench.torch_layers for the spec's cell (LSTM or
    GRU), Adam or SGD, global-norm clipping."""

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
        if "cpp" in (self.kernel_option, self.eval_kernel):
            from resetbench import torch_cpp
            if self.dev.type != "cpu":
                raise ConfigError("backend.kernel", "cpp", f"runs on the CPU only, not on {self.dev.type}; use device=cpu")
            gaps = torch_cpp.missing()
            if gaps:
                raise ConfigError("backend.kernel", "cpp", f"needs {', '.join(gaps)} to build its C++ extension")
        kernel_name = KERNEL_NAMES[kernel]
        implementation = fused_implementation(spec.cell, self.dev) if kernel == "fused" else "rewrite"
        if implementation != "rewrite":
            # the C++ loop (LSTM, CPU) or bptt (no fused op for the cell here) runs: recorded as such
            kernel_name = f"torch.fused.{implementation}"
        self.kernel = kernel_name.replace("{CELL}", spec.cell.upper())
        self._compiled = "compile" in (self.kernel_option, self.eval_kernel)
        self._loop = _compiled_loop(spec.cell) if self._compiled else None    # None: the eager loop
        self.p = {k: torch.nn.Parameter(torch.tensor(np.asarray(v, np.float32), device=self.dev))
                  for k, v in weights.items()}
        params = list(self.p.values())
        if optimizer.name == "adam":
            # fused: one pass over each tensor (measured here: 0.38 ms a step against 1.86 ms for the
            # default per-tensor loop on the CPU, a full step 4% faster at B32 T64 H256; a fixed
            # cost per step, which short windows feel most)
            self.opt = torch.optim.Adam(params, lr=optimizer.lr, betas=(optimizer.beta1, optimizer.beta2),
                                        eps=optimizer.eps, fused=self.dev.type in ("cpu", "cuda"))
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

    def _layer_weights(self) -> List[Dict[str, torch.Tensor]]:
        """Each layer's canonical weights, keyed without the ``<cell>.<l>.`` prefix."""
        cell, out = self.spec.cell, []
        for layer in range(self.spec.layers):
            prefix = f"{cell}.{layer}."
            out.append({k[len(prefix):]: p for k, p in self.p.items() if k.startswith(prefix)})
        return out

    def _layers(self, inp: torch.Tensor, batch: Batch, kernel: str):
        """All layers from the carried state with ``kernel``: outputs and the final state.
        ``native`` is nn.LSTM's / nn.GRU's own op (:func:`layers_rewrite` on windows whose only resets
        are at column 0, checked by :meth:`check_batch`: one plain call)."""
        cell, layers = self.spec.cell, self._layer_weights()
        if kernel in ("loop", "compile"):
            return layers_loop(cell, inp, torch.from_numpy(batch.reset).to(self.dev), self.state, layers,
                               self._loop if kernel == "compile" else None)
        if kernel == "peer":
            return layers_packed(cell, inp, row_lengths(batch), self.state, layers)
        if kernel == "torchrl":                          # TorchRL's module, imported only for this kernel
            from backends.torchrl_peer import layers_torchrl
            return layers_torchrl(cell, inp, batch.reset, self.state, layers)
        if kernel == "bptt":
            return layers_bptt(cell, inp, torch.from_numpy(batch.reset).to(self.dev), self.state, layers)
        if kernel == "cpp":
            from resetbench.torch_cpp import layers_cpp
            return layers_cpp(cell, inp, torch.from_numpy(batch.reset), self.state, layers)
        if kernel in ("rewrite", "native"):              # native: nn.LSTM's / nn.GRU's own op, whatever the device
            return layers_rewrite(cell, inp, batch.reset, self.state, layers)
        return layers_fused(cell, inp, batch.reset, self.state, layers)

    def layer_timer(self, batch: Batch):
        self.check_batch(batch)
        x, _, _ = self._to_device(batch)
        inp = F.embedding(x, self.p["embedding"]).detach().requires_grad_()
        weights = [p for layer in self._layer_weights() for p in layer.values()]

        def run() -> torch.Tensor:
            out, _ = self._layers(inp, batch, self.kernel_option)
            loss = out.sum()
            torch.autograd.grad(loss, [inp] + weights)
            return loss.detach()
        return run

    def _logits(self, x: torch.Tensor, batch: Batch, kernel: Optional[str] = None) -> torch.Tensor:
        """Forward from the carried state with ``kernel`` (default: the training kernel, after
        checking the batch's layout); stores the (detached) final state."""
        if kernel is None:
            self.check_batch(batch)
            kernel = self.kernel_option
        out, state = self._layers(F.embedding(x, self.p["embedding"]), batch, kernel)
        self.state = tuple(s.detach() for s in state)
        B, T, H = out.shape            # the head with its bias in one GEMM (addmm): no separate add pass
        return torch.addmm(self.p["head.b"], out.reshape(B * T, H), self.p["head.w"]).view(B, T, -1)

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

    def get_state(self) -> Tuple[np.ndarray, ...]:
        return tuple(s.cpu().numpy().copy() for s in self.state)

    def set_state(self, *state: np.ndarray) -> None:
        self.state = tuple(torch.tensor(np.asarray(s, np.float32), device=self.dev) for s in state)
        self.batch_size = self.state[0].shape[1]

    def get_weights(self) -> Dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy().copy() for k, p in self.p.items()}

    def precompile(self, train_shapes, eval_shapes=()) -> None:
        """For ``kernel=compile``: build the forward+backward graphs of every train shape and the
        no-grad graph of every eval shape on dummy tensors (weights, optimizer and state untouched);
        for ``kernel=cpp``: build (or load) its C++ extension."""
        if "cpp" in (self.kernel_option, self.eval_kernel):
            from resetbench.torch_cpp import extension
            extension()
        if not self._compiled:
            return
        H, cell = self.spec.hidden, CELLS[self.spec.cell]
        first = self._layer_weights()[0]
        for shapes, grad, kernel in ((train_shapes, True, self.kernel_option), (eval_shapes, False, self.eval_kernel)):
            if kernel != "compile":
                continue
            rec = [first[k].detach().clone().requires_grad_(grad) for k in cell.recurrent]
            for B, T in shapes:
                with torch.set_grad_enabled(grad):
                    xp = torch.zeros(B, T, cell.gates * H, device=self.dev, requires_grad=grad)
                    reset = torch.zeros(B, T, 1, dtype=torch.bool, device=self.dev)
                    state = tuple(torch.zeros(B, H, device=self.dev) for _ in self.spec.state_names)
                    out, _ = self._loop(xp, reset, state, *rec)
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
        out = {"torch": torch.__version__, "numpy": np.__version__}
        if self.kernel_option == "torchrl":
            from backends.torchrl_peer import versions
            out.update(versions())
        return out

    def matmul(self, m: int, k: int, n: int):
        a, b = torch.randn(m, k, device=self.dev), torch.randn(k, n, device=self.dev)

        def run() -> None:
            torch.matmul(a, b)
            self.synchronize()
        return run
