"""The NumPy oracle: the contract model's forward and backward (BPTT with resets), and an adapter.

This is the neutral judge every parity test compares against, and the smallest example of a
backend adapter (see README "Adding a backend"). It is written for clarity and exactness, not
speed; ``dtype=float64`` makes it usable for finite-difference checks.

One time loop serves every cell: before step ``t`` it replaces each state component of every row
``b`` with ``reset[b, t]`` by zero (a select, not a multiply: a NaN or inf state is cleared too),
then calls the cell's step. In the backward pass the same select zeroes the gradient flowing into
the earlier state, so nothing after a reset depends on anything before it. A cell
(:class:`LstmCell`) is a pure step function and its backward; its weights are the canonical keys
of ``conf/cell/<name>.yaml``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec, clip_scale

Weights = Dict[str, np.ndarray]
State = Tuple[np.ndarray, ...]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


class LstmCell:
    """``conf/cell/lstm.yaml`` in NumPy: state ``(h, c)``, weights ``w_x``, ``w_h``, ``b``."""

    def project(self, inp: np.ndarray, p: Mapping[str, np.ndarray]) -> np.ndarray:
        """The input part of every step at once: ``inp @ w_x + b``."""
        return inp @ p["w_x"] + p["b"]

    def step(self, state: State, xp_t: np.ndarray, p: Mapping[str, np.ndarray]) -> Tuple[State, Any]:
        """One step from the (already reset) state; returns the new state and a cache for :meth:`back`."""
        h, c = state
        H = h.shape[-1]
        z = xp_t + h @ p["w_h"]
        i, f = _sigmoid(z[:, :H]), _sigmoid(z[:, H:2 * H])
        g, o = np.tanh(z[:, 2 * H:3 * H]), _sigmoid(z[:, 3 * H:])
        c_new = f * c + i * g
        tc = np.tanh(c_new)
        return (o * tc, c_new), (h, c, i, f, g, o, tc)

    def back(self, cache: Any, d_state: State, p: Mapping[str, np.ndarray]):
        """Backward of :meth:`step`: gradients w.r.t. the step's projected input, the incoming
        state, and the recurrent weights (to be summed over steps)."""
        h, c, i, f, g, o, tc = cache
        dh, dc = d_state
        dc = dc + dh * o * (1.0 - tc * tc)
        dz = np.concatenate([dc * g * i * (1.0 - i), dc * c * f * (1.0 - f),
                             dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], axis=1)
        return dz, (dz @ p["w_h"].T, dc * f), {"w_h": h.T @ dz}

    def input_grads(self, inp: np.ndarray, dxp: np.ndarray, p: Mapping[str, np.ndarray]):
        """Gradients of the input-side weights, and of the layer's input."""
        G = dxp.shape[-1]
        grads = {"w_x": inp.reshape(-1, inp.shape[-1]).T @ dxp.reshape(-1, G), "b": dxp.sum(axis=(0, 1))}
        return grads, dxp @ p["w_x"].T


class GruCell:
    """``conf/cell/gru.yaml`` in NumPy (nn.GRU's equations): state ``(h,)``, weights ``w_x``,
    ``w_h``, ``b_x``, ``b_h``; the recurrent part ``h @ w_h + b_h`` enters n through ``r *``."""

    def project(self, inp: np.ndarray, p: Mapping[str, np.ndarray]) -> np.ndarray:
        return inp @ p["w_x"] + p["b_x"]

    def step(self, state: State, xp_t: np.ndarray, p: Mapping[str, np.ndarray]) -> Tuple[State, Any]:
        (h,) = state
        H = h.shape[-1]
        hp = h @ p["w_h"] + p["b_h"]
        r = _sigmoid(xp_t[:, :H] + hp[:, :H])
        z = _sigmoid(xp_t[:, H:2 * H] + hp[:, H:2 * H])
        n = np.tanh(xp_t[:, 2 * H:] + r * hp[:, 2 * H:])
        return ((1.0 - z) * n + z * h,), (h, hp, r, z, n)

    def back(self, cache: Any, d_state: State, p: Mapping[str, np.ndarray]):
        h, hp, r, z, n = cache
        (dh,) = d_state
        H = h.shape[-1]
        da_n = dh * (1.0 - z) * (1.0 - n * n)                # through n's pre-activation
        da_r = da_n * hp[:, 2 * H:] * r * (1.0 - r)
        da_z = dh * (h - n) * z * (1.0 - z)
        dxp = np.concatenate([da_r, da_z, da_n], axis=1)      # w.r.t. x w_x + b_x
        dhp = np.concatenate([da_r, da_z, da_n * r], axis=1)  # w.r.t. h w_h + b_h
        return dxp, (dh * z + dhp @ p["w_h"].T,), {"w_h": h.T @ dhp, "b_h": dhp.sum(axis=0)}

    def input_grads(self, inp: np.ndarray, dxp: np.ndarray, p: Mapping[str, np.ndarray]):
        G = dxp.shape[-1]
        grads = {"w_x": inp.reshape(-1, inp.shape[-1]).T @ dxp.reshape(-1, G), "b_x": dxp.sum(axis=(0, 1))}
        return grads, dxp @ p["w_x"].T


CELLS = {"lstm": LstmCell(), "gru": GruCell()}


def _layer(w: Mapping[str, np.ndarray], cell: str, layer: int) -> Dict[str, np.ndarray]:
    """Layer ``layer``'s canonical weights without the ``<cell>.<layer>.`` prefix."""
    prefix = f"{cell}.{layer}."
    return {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}


def _reset(state: State, reset_t: np.ndarray) -> State:
    """The reset rule: rows with ``reset_t`` get the zero state (a select: NaN and inf are cleared)."""
    return tuple(np.where(reset_t[:, None], np.zeros((), s.dtype), s) for s in state)


def forward(w: Mapping[str, np.ndarray], batch: Batch, state: State, spec: ModelSpec
            ) -> Tuple[np.ndarray, Dict[str, Any], State]:
    """Run the model on ``batch`` from ``state`` (a tuple of ``[L, B, H]`` arrays, the cell's
    state components). Returns ``logits [B, T, V]``, a cache for :func:`backward`, and the final state."""
    dtype = w["embedding"].dtype
    cell = CELLS[spec.cell]
    B, T = batch.x.shape
    inp = w["embedding"][batch.x]                              # [B, T, E]
    cache: Dict[str, Any] = {"inputs": [], "steps": []}
    final: List[List[np.ndarray]] = [[] for _ in state]
    for layer in range(spec.layers):
        p = _layer(w, spec.cell, layer)
        xp = cell.project(inp, p)
        s = tuple(component[layer].astype(dtype) for component in state)
        outs = np.empty((B, T, spec.hidden), dtype)
        steps = []
        for t in range(T):
            s, step_cache = cell.step(_reset(s, batch.reset[:, t]), xp[:, t], p)
            outs[:, t] = s[0]
            steps.append(step_cache)
        cache["inputs"].append(inp)
        cache["steps"].append(steps)
        for k, component in enumerate(s):
            final[k].append(component)
        inp = outs
    cache["top"] = inp
    logits = inp @ w["head.w"] + w["head.b"]
    return logits, cache, tuple(np.stack(f) for f in final)


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


def backward(w: Mapping[str, np.ndarray], batch: Batch, cache: Dict[str, Any], probs: np.ndarray,
             spec: ModelSpec) -> Weights:
    """Gradients of the masked-mean loss w.r.t. every canonical weight (BPTT within the batch;
    the incoming state is a constant, so no gradient flows into it)."""
    dtype = w["embedding"].dtype
    cell = CELLS[spec.cell]
    B, T = batch.x.shape
    n = max(float(batch.mask.sum()), 1.0)
    dlogits = probs.copy()
    np.put_along_axis(dlogits, batch.y[..., None], np.take_along_axis(dlogits, batch.y[..., None], -1) - 1, -1)
    dlogits *= (batch.mask / n)[..., None].astype(dtype)
    top = cache["top"]
    grads: Weights = {"head.w": top.reshape(-1, top.shape[-1]).T @ dlogits.reshape(-1, dlogits.shape[-1]),
                      "head.b": dlogits.sum(axis=(0, 1))}
    dout = dlogits @ w["head.w"].T                             # [B, T, H] into the top layer
    for layer in reversed(range(spec.layers)):
        p = _layer(w, spec.cell, layer)
        steps = cache["steps"][layer]
        dxp = np.empty((B, T, p["w_h"].shape[1]), dtype)
        d_state = tuple(np.zeros((B, spec.hidden), dtype) for _ in spec.state_names)
        rec: Dict[str, np.ndarray] = {}
        for t in reversed(range(T)):
            d_state = (d_state[0] + dout[:, t],) + d_state[1:]
            dxp[:, t], d_prev, rec_t = cell.back(steps[t], d_state, p)
            for k, g in rec_t.items():
                rec[k] = rec[k] + g if k in rec else g
            d_state = _reset(d_prev, batch.reset[:, t])          # the reset cuts the gradient
        in_grads, dout = cell.input_grads(cache["inputs"][layer], dxp, p)
        for k, g in {**in_grads, **rec}.items():
            grads[f"{spec.cell}.{layer}.{k}"] = g
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
                 batch_size: int, device: str = "auto", kernel: str = "loop", dtype: str = "float32",
                 **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, kernel=kernel, **options)
        for k in (self.kernel_option, self.eval_kernel):
            if k != "loop":                     # the one kernel: the time loop of forward/backward
                raise ConfigError("backend.kernel", k, f"allowed for backend={self.name}: loop")
        if device not in ("auto", "cpu"):
            raise ConfigError("device", device, "backend=numpy runs on the CPU only: use auto or cpu")
        self.device = "cpu"
        self.dtype = np.dtype(dtype)
        self.w: Weights = {k: np.array(v, dtype=self.dtype) for k, v in weights.items()}
        self.opt = NumpyOptimizer(optimizer, self.w)
        self.reset_state(batch_size)

    def _run(self, batch: Batch):
        logits, cache, self.state = forward(self.w, batch, self.state, self.spec)
        return logits, cache

    def forward(self, batch: Batch) -> np.ndarray:
        self.check_batch(batch)                 # the layout properties the kernel needs (none here)
        return self._run(batch)[0]

    def gradients(self, batch: Batch) -> Tuple[float, Weights]:
        self.check_batch(batch)
        logits, cache = self._run(batch)
        ce, probs = cross_entropy(logits, batch.y)
        return masked_mean(ce, batch.mask), backward(self.w, batch, cache, probs, self.spec)

    def train_step(self, batch: Batch) -> float:
        loss, grads = self.gradients(batch)
        self.opt.step(self.w, grads)
        return loss

    def eval_step(self, batch: Batch) -> float:
        logits, _ = self._run(batch)
        ce, _ = cross_entropy(logits, batch.y)
        return float((ce * batch.mask).sum())

    def get_state(self) -> State:
        return tuple(s.astype(np.float32) for s in self.state)

    def set_state(self, *state: np.ndarray) -> None:
        self.state = tuple(np.array(s, dtype=self.dtype) for s in state)
        self.batch_size = self.state[0].shape[1]

    def get_weights(self) -> Weights:
        return {k: v.astype(np.float32) for k, v in self.w.items()}

    def versions(self) -> Dict[str, str]:
        return {"numpy": np.__version__}


def loss_fn(w: Mapping[str, np.ndarray], batch: Batch, state: State, spec: ModelSpec) -> float:
    """Masked-mean loss of ``batch`` from ``state``: the scalar finite differences probe."""
    logits, _, _ = forward(w, batch, state, spec)
    ce, _ = cross_entropy(logits, batch.y)
    return masked_mean(ce, batch.mask)
