"""The NumPy oracle: the contract LSTM forward and backward (BPTT with resets), and an adapter.

This is the neutral judge every parity test compares against, and the smallest example of a
backend adapter (see README "Adding a backend"). It is written for clarity and exactness, not
speed; ``dtype=float64`` makes it usable for finite-difference checks.

Reset rule (CONTRACT section 2): before step ``t`` the state of row ``b`` is multiplied by
``keep[b, t] = 0 if reset[b, t] else 1``. Because the state is multiplied by zero, the gradient
through it is zero too: nothing after a reset depends on anything before it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec, clip_scale

Weights = Dict[str, np.ndarray]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def forward(w: Mapping[str, np.ndarray], batch: Batch, h0: np.ndarray, c0: np.ndarray,
            layers: int) -> Tuple[np.ndarray, Dict[str, Any], np.ndarray, np.ndarray]:
    """Run the model on ``batch`` from state ``(h0, c0)`` ([L, B, H]).

    Returns ``logits [B, T, V]``, a cache for :func:`backward`, and the final state ``(hT, cT)``.
    """
    dtype = w["embedding"].dtype
    B, T = batch.x.shape
    keep = (~batch.reset).astype(dtype)                       # [B, T]
    inp = w["embedding"][batch.x]                              # [B, T, E]
    cache: Dict[str, Any] = {"inputs": [], "steps": [], "keep": keep}
    hT, cT = np.empty_like(h0), np.empty_like(c0)
    for layer in range(layers):
        w_x, w_h, b = w[f"lstm.{layer}.w_x"], w[f"lstm.{layer}.w_h"], w[f"lstm.{layer}.b"]
        H = w_h.shape[0]
        xp = inp @ w_x + b                                     # whole-window input projection
        h, c = h0[layer].astype(dtype), c0[layer].astype(dtype)
        outs = np.empty((B, T, H), dtype)
        steps: List[Tuple[np.ndarray, ...]] = []
        for t in range(T):
            k = keep[:, t, None]
            h_prev, c_prev = h * k, c * k
            z = xp[:, t] + h_prev @ w_h
            i, f = _sigmoid(z[:, :H]), _sigmoid(z[:, H:2 * H])
            g, o = np.tanh(z[:, 2 * H:3 * H]), _sigmoid(z[:, 3 * H:])
            c = f * c_prev + i * g
            tc = np.tanh(c)
            h = o * tc
            outs[:, t] = h
            steps.append((h_prev, c_prev, i, f, g, o, tc))
        cache["inputs"].append(inp)
        cache["steps"].append(steps)
        hT[layer], cT[layer] = h, c
        inp = outs
    cache["top"] = inp
    logits = inp @ w["head.w"] + w["head.b"]
    return logits, cache, hT, cT


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-position cross-entropy in nats and the softmax probabilities."""
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    logp_y = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - m[..., 0] - np.log(s[..., 0])
    return -logp_y, e / s


def masked_mean(ce: np.ndarray, mask: np.ndarray) -> float:
    """Training loss of a batch: ``sum(ce * mask) / sum(mask)`` (0 for an all-padding batch)."""
    n = float(mask.sum())
    return float((ce * mask).sum() / n) if n > 0 else 0.0


def backward(w: Mapping[str, np.ndarray], batch: Batch, cache: Dict[str, Any],
             probs: np.ndarray, layers: int) -> Weights:
    """Gradients of the masked-mean loss w.r.t. every canonical weight (BPTT within the batch;
    the incoming state is a constant, so no gradient flows into it)."""
    dtype = w["embedding"].dtype
    B, T = batch.x.shape
    n = max(float(batch.mask.sum()), 1.0)
    dlogits = probs.copy()
    np.put_along_axis(dlogits, batch.y[..., None], np.take_along_axis(dlogits, batch.y[..., None], -1) - 1, -1)
    dlogits *= (batch.mask / n)[..., None].astype(dtype)
    grads: Weights = {}
    top = cache["top"]
    grads["head.w"] = top.reshape(-1, top.shape[-1]).T @ dlogits.reshape(-1, dlogits.shape[-1])
    grads["head.b"] = dlogits.sum(axis=(0, 1))
    dout = dlogits @ w["head.w"].T                             # [B, T, H] into the top layer
    keep = cache["keep"]
    for layer in reversed(range(layers)):
        w_x, w_h = w[f"lstm.{layer}.w_x"], w[f"lstm.{layer}.w_h"]
        H = w_h.shape[0]
        inp, steps = cache["inputs"][layer], cache["steps"][layer]
        dxp = np.empty((B, T, 4 * H), dtype)
        dw_h = np.zeros_like(w_h)
        dh_next = np.zeros((B, H), dtype)
        dc_next = np.zeros((B, H), dtype)
        for t in reversed(range(T)):
            h_prev, c_prev, i, f, g, o, tc = steps[t]
            dh = dout[:, t] + dh_next
            dc = dc_next + dh * o * (1.0 - tc * tc)
            dz = np.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                                 dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], axis=1)
            dxp[:, t] = dz
            dw_h += h_prev.T @ dz
            k = keep[:, t, None]                               # the reset cuts the gradient
            dh_next = (dz @ w_h.T) * k
            dc_next = dc * f * k
        grads[f"lstm.{layer}.w_x"] = inp.reshape(-1, inp.shape[-1]).T @ dxp.reshape(-1, 4 * H)
        grads[f"lstm.{layer}.w_h"] = dw_h
        grads[f"lstm.{layer}.b"] = dxp.sum(axis=(0, 1))
        dout = dxp @ w_x.T
    demb = np.zeros_like(w["embedding"])
    np.add.at(demb, batch.x.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    grads["embedding"] = demb
    return {k: grads[k] for k in w}


class NumpyOptimizer:
    """Adam (PyTorch semantics) or plain SGD with optional global-norm clipping, in NumPy."""

    def __init__(self, spec: OptimizerSpec, weights: Mapping[str, np.ndarray]):
        self.spec = spec
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in weights.items()}
        self.v = {k: np.zeros_like(v) for k, v in weights.items()}

    def step(self, weights: Weights, grads: Mapping[str, np.ndarray]) -> None:
        s = self.spec
        norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
        scale = clip_scale(norm, s.clip_norm)
        self.t += 1
        for k, g in grads.items():
            g = g * np.asarray(scale, g.dtype)
            if s.name == "sgd":
                weights[k] -= np.asarray(s.lr, g.dtype) * g
                continue
            self.m[k] = s.beta1 * self.m[k] + (1 - s.beta1) * g
            self.v[k] = s.beta2 * self.v[k] + (1 - s.beta2) * g * g
            m_hat = self.m[k] / (1 - s.beta1 ** self.t)
            v_hat = self.v[k] / (1 - s.beta2 ** self.t)
            weights[k] -= (s.lr * m_hat / (np.sqrt(v_hat) + s.eps)).astype(g.dtype)


class NumpyBackend(Backend):
    """``backend=numpy``: the oracle as an adapter. Slow (Python time loop), exact."""

    name = "numpy"
    kernel = "numpy.loop"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optimizer: OptimizerSpec,
                 batch_size: int, device: str = "auto", dtype: str = "float32", **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, **options)
        if device not in ("auto", "cpu"):
            raise ConfigError("device", device, "backend=numpy runs on the CPU only: use auto or cpu")
        self.device = "cpu"
        self.dtype = np.dtype(dtype)
        self.w: Weights = {k: np.array(v, dtype=self.dtype) for k, v in weights.items()}
        self.opt = NumpyOptimizer(optimizer, self.w)
        self.reset_state(batch_size)

    def _run(self, batch: Batch):
        logits, cache, hT, cT = forward(self.w, batch, self.h, self.c, self.spec.layers)
        self.h, self.c = hT, cT
        return logits, cache

    def forward(self, batch: Batch) -> np.ndarray:
        return self._run(batch)[0]

    def gradients(self, batch: Batch) -> Tuple[float, Weights]:
        logits, cache = self._run(batch)
        ce, probs = cross_entropy(logits, batch.y)
        return masked_mean(ce, batch.mask), backward(self.w, batch, cache, probs, self.spec.layers)

    def train_step(self, batch: Batch) -> float:
        loss, grads = self.gradients(batch)
        self.opt.step(self.w, grads)
        return loss

    def eval_step(self, batch: Batch) -> float:
        logits, _ = self._run(batch)
        ce, _ = cross_entropy(logits, batch.y)
        return float((ce * batch.mask).sum())

    def get_state(self) -> Tuple[np.ndarray, np.ndarray]:
        return self.h.astype(np.float32), self.c.astype(np.float32)

    def set_state(self, h: np.ndarray, c: np.ndarray) -> None:
        self.h = np.array(h, dtype=self.dtype)
        self.c = np.array(c, dtype=self.dtype)
        self.batch_size = self.h.shape[1]

    def get_weights(self) -> Weights:
        return {k: v.astype(np.float32) for k, v in self.w.items()}

    def versions(self) -> Dict[str, str]:
        return {"numpy": np.__version__}


def loss_fn(w: Mapping[str, np.ndarray], batch: Batch, h0: np.ndarray, c0: np.ndarray,
            layers: int) -> float:
    """Masked-mean loss of ``batch`` from state ``(h0, c0)``: the scalar finite differences probe."""
    logits, _, _, _ = forward(w, batch, h0, c0, layers)
    ce, _ = cross_entropy(logits, batch.y)
    return masked_mean(ce, batch.mask)
