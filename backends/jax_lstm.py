"""``backend=jax``: the contract's per-sample-reset LSTM in JAX, compiled by XLA.

The time loop is a ``jax.lax.scan``; before step ``t`` the carried state is multiplied by
``keep = 1 - reset[:, t]``, which zeroes it and, being a multiply by zero, also cuts the gradient
through it. Per layer the input projection of the whole window is one matmul outside the scan,
so only the recurrent matmul and the gate arithmetic run per step. Parameters stay in canonical
layout (``w_x`` [in, 4H], gates i, f, g, o), so import and export are copies.

A whole training step (forward, loss, gradients, global-norm clipping, optax update) is one
``jax.jit`` with the parameters, optimizer state and carried state donated. Executables are
compiled ahead of time per batch shape ``(B, T)`` and kept in a cache, so :meth:`precompile`
takes every compilation out of the timed loop. The carried state never leaves the device, and
``train_step`` returns the loss as a device scalar: no host round trip per step.

Option ``unroll``: the ``lax.scan`` unroll factor (recorded in ``kernel``).
"""

from __future__ import annotations

import os

# Allocate GPU memory on demand so JAX can share a GPU with another framework in one process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec  # noqa: E402

Params = Dict[str, jax.Array]
F32 = jnp.float32


# --------------------------------------------------------------------------- the model (pure functions)
def lstm_layer(xp: jax.Array, keep: jax.Array, h: jax.Array, c: jax.Array, w_h: jax.Array,
               unroll: int = 1) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """One LSTM layer over a window, time-major. ``xp`` [T, B, 4H] (input projection + bias),
    ``keep`` [T, B, 1] (0 where the state resets before step t). Returns outputs [T, B, H] and
    the final ``h``, ``c`` [B, H]."""
    H = w_h.shape[0]

    def step(carry, inputs):
        h, c = carry
        xt, kt = inputs
        h, c = h * kt, c * kt                     # the reset: zero the state (and its gradient)
        z = xt + h @ w_h
        i = jax.nn.sigmoid(z[:, :H])
        f = jax.nn.sigmoid(z[:, H:2 * H])
        g = jnp.tanh(z[:, 2 * H:3 * H])
        o = jax.nn.sigmoid(z[:, 3 * H:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    (h, c), outs = jax.lax.scan(step, (h, c), (xp, keep), unroll=unroll)
    return outs, h, c


def logits_fn(params: Params, h0: jax.Array, c0: jax.Array, x: jax.Array, reset: jax.Array,
              layers: int, unroll: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Time-major logits [T, B, V] of batch-major ``x``/``reset`` [B, T] from state ``(h0, c0)``
    ([L, B, H]), and the final state (detached: no gradient crosses a batch boundary)."""
    keep = (1.0 - reset.T.astype(F32))[:, :, None]            # [T, B, 1]
    inp = params["embedding"][x.T]                             # [T, B, E]
    hs, cs = [], []
    for layer in range(layers):
        xp = inp @ params[f"lstm.{layer}.w_x"] + params[f"lstm.{layer}.b"]  # whole-window projection
        inp, h, c = lstm_layer(xp, keep, h0[layer], c0[layer], params[f"lstm.{layer}.w_h"], unroll)
        hs.append(h)
        cs.append(c)
    logits = inp @ params["head.w"] + params["head.b"]
    return logits, jax.lax.stop_gradient(jnp.stack(hs)), jax.lax.stop_gradient(jnp.stack(cs))


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-position cross-entropy in nats; ``logits`` [T, B, V], ``y`` [T, B]."""
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def loss_fn(params: Params, h0: jax.Array, c0: jax.Array, x: jax.Array, y: jax.Array,
            mask: jax.Array, reset: jax.Array, layers: int, unroll: int):
    """Masked-mean loss ``sum(ce * mask) / max(sum(mask), 1)`` and the final state."""
    logits, h, c = logits_fn(params, h0, c0, x, reset, layers, unroll)
    m = mask.T
    loss = jnp.sum(cross_entropy(logits, y.T) * m) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, (h, c)


def clip_by_global_norm(grads: Params, clip_norm: Optional[float]) -> Params:
    """``g *= clip_norm / max(global_norm, clip_norm)`` (``OptimizerSpec``); identity for None."""
    if clip_norm is None:
        return grads
    scale = clip_norm / jnp.maximum(optax.global_norm(grads), clip_norm)
    return jax.tree.map(lambda g: g * scale, grads)


def make_optimizer(spec: OptimizerSpec) -> optax.GradientTransformation:
    """Adam with PyTorch semantics (eps added to sqrt(v_hat): ``eps_root=0``) or plain SGD."""
    if spec.name == "adam":
        return optax.adam(spec.lr, b1=spec.beta1, b2=spec.beta2, eps=spec.eps, eps_root=0.0)
    if spec.name == "sgd":
        return optax.sgd(spec.lr, momentum=None)
    raise ConfigError("train.optimizer", spec.name, "allowed: adam, sgd")


# --------------------------------------------------------------------------- devices
def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:                                       # no GPU platform in this jaxlib
        return []


def resolve_device(device: str) -> Tuple[jax.Device, str]:
    """``auto`` -> the first GPU when JAX sees one, else the CPU; ``cuda`` without a GPU is a
    user error. Returns the JAX device and its contract name (``cpu`` or ``cuda``)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", device, "allowed: auto, cpu, cuda")
    gpus = _gpus()
    if device == "cuda" and not gpus:
        raise ConfigError("device", device, "JAX sees no GPU here; use auto or cpu")
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    return (gpus[0] if device == "cuda" else jax.devices("cpu")[0]), device


# --------------------------------------------------------------------------- the adapter
class JaxBackend(Backend):
    """JAX adapter: ``lax.scan`` reset-aware LSTM, one jitted train step, optax Adam or SGD."""

    name = "jax"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optimizer: OptimizerSpec,
                 batch_size: int, device: str = "auto", unroll: int = 1, **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, **options)
        if not isinstance(unroll, (int, np.integer)) or isinstance(unroll, bool) or unroll < 1:
            raise ConfigError("backend.unroll", unroll, "allowed: a positive integer (1: no unrolling)")
        self.unroll = int(unroll)
        self.kernel = "jax.scan" if self.unroll == 1 else f"jax.scan.unroll{self.unroll}"
        self.dev, self.device = resolve_device(device)
        self._sharding = jax.sharding.SingleDeviceSharding(self.dev)
        self._tx = make_optimizer(optimizer)
        self.params: Params = {k: self._put(np.asarray(v, np.float32)) for k, v in weights.items()}
        self.opt_state = jax.device_put(self._tx.init(self.params), self.dev)
        self._compiled: Dict[Tuple[str, int, int], Any] = {}   # (kind, B, T) -> executable
        self.compile_count = 0
        self.reset_state(batch_size)

    # -- compiled steps --------------------------------------------------------------------------
    def _put(self, arr: np.ndarray) -> jax.Array:
        return jax.device_put(arr, self.dev)

    def _step_fns(self) -> Dict[str, Tuple[Callable, Tuple[int, ...]]]:
        """Kind -> (pure function, donated argument numbers). Arguments: params, [opt_state,]
        h, c, x, y, mask, reset (forward: no y, mask)."""
        L, U, tx, clip = self.spec.layers, self.unroll, self._tx, self.optimizer.clip_norm
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def train(params, opt_state, h, c, x, y, mask, reset):
            (loss, (h, c)), grads = grad_fn(params, h, c, x, y, mask, reset, L, U)
            updates, opt_state = tx.update(clip_by_global_norm(grads, clip), opt_state, params)
            return optax.apply_updates(params, updates), opt_state, h, c, loss

        def grads(params, h, c, x, y, mask, reset):
            (loss, (h, c)), g = grad_fn(params, h, c, x, y, mask, reset, L, U)
            return loss, g, h, c

        def evaluate(params, h, c, x, y, mask, reset):
            logits, h, c = logits_fn(params, h, c, x, reset, L, U)
            return jnp.sum(cross_entropy(logits, y.T) * mask.T), h, c

        def forward(params, h, c, x, reset):
            logits, h, c = logits_fn(params, h, c, x, reset, L, U)
            return jnp.swapaxes(logits, 0, 1), h, c

        return {"train": (train, (0, 1, 2, 3)), "grads": (grads, ()), "eval": (evaluate, (1, 2)),
                "forward": (forward, ())}

    def _abstract(self, tree: Any) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._sharding), tree)

    def _executable(self, kind: str, B: int, T: int):
        """The compiled ``kind`` step for batch shape (B, T); compiled once, ahead of time,
        from shapes only (nothing runs, nothing donated)."""
        key = (kind, int(B), int(T))
        if key not in self._compiled:
            fn, donate = self._step_fns()[kind]
            sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding)
            state = sds((self.spec.layers, B, self.spec.hidden), F32)
            ids, mask, reset = sds((B, T), jnp.int32), sds((B, T), F32), sds((B, T), jnp.bool_)
            args = [self._abstract(self.params)]
            if kind == "train":
                args.append(self._abstract(self.opt_state))
            args += [state, state, ids] + ([reset] if kind == "forward" else [ids, mask, reset])
            self._compiled[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.compile_count += 1
        return self._compiled[key]

    def _batch(self, batch: Batch, fields: str = "x y mask reset") -> Tuple[jax.Array, ...]:
        B = batch.x.shape[0]
        if B != self.h.shape[1]:
            raise ValueError(f"batch has {B} rows but the carried state has {self.h.shape[1]}; "
                             f"call reset_state({B}) first")
        arrays = tuple(np.ascontiguousarray(getattr(batch, f)) for f in fields.split())
        return jax.device_put(arrays, self.dev)

    # -- protocol ------------------------------------------------------------------------------
    def precompile(self, train_shapes: Sequence[Tuple[int, int]],
                   eval_shapes: Sequence[Tuple[int, int]] = ()) -> None:
        for kind, shapes in (("train", train_shapes), ("eval", eval_shapes)):
            for B, T in shapes:
                self._executable(kind, B, T)

    def train_step(self, batch: Batch) -> jax.Array:
        data = self._batch(batch)
        step = self._executable("train", *batch.x.shape)
        self.params, self.opt_state, self.h, self.c, loss = step(self.params, self.opt_state,
                                                                 self.h, self.c, *data)
        return loss

    def gradients(self, batch: Batch) -> Tuple[float, Dict[str, np.ndarray]]:
        data = self._batch(batch)
        loss, grads, self.h, self.c = self._executable("grads", *batch.x.shape)(
            self.params, self.h, self.c, *data)
        return float(loss), {k: np.asarray(g, np.float32) for k, g in grads.items()}

    def forward(self, batch: Batch) -> np.ndarray:
        data = self._batch(batch, "x reset")
        logits, self.h, self.c = self._executable("forward", *batch.x.shape)(
            self.params, self.h, self.c, *data)
        return np.asarray(logits)

    def eval_step(self, batch: Batch) -> float:
        data = self._batch(batch)
        total, self.h, self.c = self._executable("eval", *batch.x.shape)(
            self.params, self.h, self.c, *data)
        return float(total)

    def get_state(self) -> Tuple[np.ndarray, np.ndarray]:
        return np.array(self.h, np.float32), np.array(self.c, np.float32)

    def set_state(self, h: np.ndarray, c: np.ndarray) -> None:
        # two separate device buffers even if h is c: the train step donates both
        self.h = self._put(np.array(h, np.float32))
        self.c = self._put(np.array(c, np.float32))
        self.batch_size = self.h.shape[1]

    def get_weights(self) -> Dict[str, np.ndarray]:
        return {k: np.array(v, np.float32) for k, v in self.params.items()}

    def synchronize(self) -> None:
        jax.block_until_ready((self.params, self.opt_state, self.h, self.c))

    def peak_memory_bytes(self) -> Optional[int]:
        if self.device != "cuda":
            return None
        stats = self.dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else int(peak)

    def versions(self) -> Dict[str, str]:
        import jaxlib

        return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
                "numpy": np.__version__}
