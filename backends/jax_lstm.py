"""``backend=jax``: the contract's per-sample-reset LSTM in JAX, compiled by XLA.

The time loop is a ``jax.lax.scan`` (:func:`layer_scan`, the same for every cell); before step
``t`` it replaces the carried state of the rows with ``reset[:, t]`` by zeros (``jnp.where``: a
select, so a NaN or inf state is cleared too, and no gradient crosses the reset), then runs the
cell (:func:`lstm_cell`: ``x_t W_x + h W_h + b`` and the gate arithmetic). Parameters stay
in canonical layout (``w_x`` [in, 4H], gates i, f, g, o), so import and export are copies.

A whole training step (forward, loss, gradients, global-norm clipping, optax update) is one
``jax.jit`` with the parameters, optimizer state and carried state donated. Executables are
compiled ahead of time per batch shape ``(B, T)`` and kept in a cache, so :meth:`precompile`
takes every compilation out of the timed loop. The carried state never leaves the device, and
``train_step`` returns the loss as a device scalar: no host round trip per step.

Option ``kernel`` (recorded in ``summary.json`` as ``kernel``):

- ``scan`` (exact, the default): the reset-aware ``lax.scan`` above.
- ``native`` (baseline): flax ``nn.RNN(nn.OptimizedLSTMCell)``, the framework's own LSTM, which
  cannot reset mid-window: column-0 resets zero the initial state of their rows, any later reset
  is refused (``ValueError``, checked on the host before dispatch).
- ``peer`` (baseline): what a JAX user writes for variable-length batches, flax ``nn.RNN`` with
  ``seq_lengths`` (``padded`` layout only); the state left is each row's state after its last
  valid token. The lengths are computed on the device from the mask (a runtime array: no
  recompilation per length pattern), after the host has checked the layout.

The baselines keep the parameters canonical and build flax's parameter tree from them inside the
jitted step, so autodiff maps the gradients back to canonical keys and the optimizer update is the
same as for ``scan``. Each batch is checked on the host for the layout properties the kernel
declares (``needs`` in ``conf/backend/jax.yaml``). ``eval_step`` runs ``self.eval_kernel`` (``scan``
for every kernel): the eval layout is packed streams with mid-window resets, which the baselines
cannot consume, and the eval loss must not depend on the training kernel. flax is imported only by
the baselines.

- ``haiku`` (role ``peer_reset``: another library's reset-aware layer, the same semantics as
  ``scan``): ``hk.dynamic_unroll(hk.ResetCore(hk.LSTM(H)))`` on the canonical weights
  (:mod:`backends.haiku_peer`; needs the ``peers`` extra). Trains only, like the baselines.

Option ``unroll``: the time loop's unroll factor (``lax.scan`` / ``nn.RNN``), recorded in ``kernel``.

Option ``hoist`` (``scan`` only, recorded as ``jax.scan.hoisted``): project the whole window's
input with one matmul before the loop, so only ``h W_h`` runs per step. On the CPU this measured
~20 % slower than projecting step by step (B=32, T=64, E=64, H=256: the hoisted ``[T, B, 4H]``
projection and its gradient are materialized and transposed, flax's ``OptimizedLSTMCell`` projects
per step too); it may suit a GPU, where it replaces T small matmuls by one large one.
"""

from __future__ import annotations

import functools
import os

# Allocate GPU memory on demand so JAX can share a GPU with another framework in one process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from resetbench.jax_layers import State, gru_layer, gru_layer_vjp, lstm_layer, lstm_layer_vjp  # noqa: E402
from backends.haiku_peer import haiku_layers  # noqa: E402  (imports haiku only when the kernel runs)
from backends.base import Backend, Batch, ConfigError, ModelSpec, OptimizerSpec  # noqa: E402

Params = Dict[str, jax.Array]
F32 = jnp.float32
FLAX_KERNELS = ("native", "peer")           # the kernels built on flax (imported only for them)
# internal kernel key (kernel=scan with hoist=true: "scan.hoisted") -> the recorded kernel name,
# before any .unrollN suffix
KERNEL_NAMES = {"scan": "jax.scan", "scan.hoisted": "jax.scan.hoisted", "scan.autodiff": "jax.scan.autodiff",
                "native": "jax.native.flax_{CELL}",
                "peer": "jax.peer.flax_rnn_seq_lengths",
                "haiku": "jax.peer_reset.haiku_ResetCore_LSTM"}
FLAX_CELLS = {"lstm": "OptimizedLSTMCell", "gru": "GRUCell"}


def scan_layers(params: Params, state: State, inp: jax.Array, reset: jax.Array, mask: Optional[jax.Array],
                layers: int, unroll: int, cell: str, hoist: bool = False, autodiff: bool = False):
    """Kernel ``scan``: the reset-aware stack of ``cell`` layers. ``inp`` [T, B, E] time-major,
    ``reset`` [B, T], ``state`` one [L, B, H] array per state component; returns the last layer's
    outputs [T, B, H] and each layer's final state. ``hoist``: the input projection of the whole
    window is one matmul before the loop (JAX's autodiff); else per step, with the hand-written
    backward (:func:`lstm_layer_vjp`, :func:`gru_layer_vjp`) unless ``autodiff``."""
    r = reset.T[:, :, None]                                     # [T, B, 1] bool
    finals = []
    for layer in range(layers):
        p = {k.rsplit(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{cell}.{layer}.")}
        s0 = tuple(s[layer] for s in state)
        if cell == "lstm":
            if hoist:
                inp, h, c = lstm_layer(inp @ p["w_x"] + p["b"], r, *s0, p["w_h"], unroll)
            elif not autodiff:
                inp, h, c = lstm_layer_vjp(inp, r, *s0, p["w_x"], p["w_h"], p["b"], unroll)
            else:
                inp, h, c = lstm_layer(inp, r, *s0, p["w_h"], unroll, p["w_x"], p["b"])
            finals.append((h, c))
            continue
        if hoist:
            inp, h = gru_layer(inp @ p["w_x"] + p["b_x"], r, *s0, p["w_h"], p["b_h"], unroll)
        elif not autodiff:
            inp, h = gru_layer_vjp(inp, r, *s0, p["w_x"], p["w_h"], p["b_x"], p["b_h"], unroll)
        else:
            inp, h = gru_layer(inp, r, *s0, p["w_h"], p["b_h"], unroll, p["w_x"], p["b_x"])
        finals.append((h,))
    return inp, finals


def flax_cell_params(cell: str, p: Params) -> Dict[str, Any]:
    """Canonical layer weights -> the variables of flax's ``nn.OptimizedLSTMCell`` (per gate g in
    i, f, g, o: an input kernel ``i{g}`` without bias, a recurrent kernel ``h{g}`` with the bias)
    or ``nn.GRUCell`` (``ir``, ``iz``, ``in`` with biases: b_x + b_h for r and z, b_x for n;
    ``hr``, ``hz`` without, ``hn`` with b_h). Pure slicing, so gradients flow back."""
    H = p["w_h"].shape[0]
    blocks = lambda a, k: a[..., k * H:(k + 1) * H]                 # noqa: E731
    out: Dict[str, Any] = {}
    if cell == "lstm":
        for k, gate in enumerate("ifgo"):
            out[f"i{gate}"] = {"kernel": blocks(p["w_x"], k)}
            out[f"h{gate}"] = {"kernel": blocks(p["w_h"], k), "bias": blocks(p["b"], k)}
        return {"params": {"cell": out}}
    for k, gate in enumerate("rzn"):
        bias = blocks(p["b_x"], k) + (blocks(p["b_h"], k) if gate != "n" else 0.0)
        out[f"i{gate}"] = {"kernel": blocks(p["w_x"], k), "bias": bias}
        out[f"h{gate}"] = {"kernel": blocks(p["w_h"], k), **({"bias": blocks(p["b_h"], k)} if gate == "n" else {})}
    return {"params": {"cell": out}}


def flax_layers(params: Params, state: State, inp: jax.Array, reset: jax.Array, mask: Optional[jax.Array],
                layers: int, unroll: int, cell: str, lengths: bool = False):
    """Kernels ``native`` (``lengths=False``) and ``peer`` (``lengths=True``: ``seq_lengths`` from
    the prefix ``mask``): flax ``nn.RNN(nn.OptimizedLSTMCell)`` / ``nn.RNN(nn.GRUCell)`` per layer.
    Only column-0 resets are applied (they zero the initial state); the host has refused every
    other layout."""
    import flax.linen as nn

    keep0 = 1.0 - reset[:, :1].astype(F32)                    # [B, 1]
    seq_lengths = jnp.sum(mask, axis=1).astype(jnp.int32) if lengths else None
    H = state[0].shape[-1]
    flax_cell = nn.OptimizedLSTMCell(H) if cell == "lstm" else nn.GRUCell(H)
    rnn = nn.RNN(flax_cell, time_major=True, return_carry=True, unroll=unroll)
    finals = []
    for layer in range(layers):
        p = {k.rsplit(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{cell}.{layer}.")}
        s0 = tuple(s[layer] * keep0 for s in state)
        carry = (s0[1], s0[0]) if cell == "lstm" else s0[0]      # flax's LSTM carry is (c, h)
        carry, inp = rnn.apply(flax_cell_params(cell, p), inp, initial_carry=carry, seq_lengths=seq_lengths)
        finals.append((carry[1], carry[0]) if cell == "lstm" else (carry,))
    return inp, finals


# internal kernel key -> layer stack ("scan.hoisted": kernel scan with hoist=true)
LAYER_STACKS: Dict[str, Callable] = {"scan": scan_layers,
                                     "scan.hoisted": functools.partial(scan_layers, hoist=True),
                                     "scan.autodiff": functools.partial(scan_layers, autodiff=True),
                                     "native": flax_layers,
                                     "peer": functools.partial(flax_layers, lengths=True),
                                     "haiku": haiku_layers}


def logits_fn(params: Params, state: State, x: jax.Array, reset: jax.Array, layers: int, unroll: int,
              cell: str, mask: Optional[jax.Array] = None, kernel: str = "scan") -> Tuple[jax.Array, State]:
    """Time-major logits [T, B, V] of batch-major ``x``/``reset``/``mask`` [B, T] from ``state``
    (one [L, B, H] array per state component of ``cell``), and the final state (detached: no
    gradient crosses a batch boundary). ``mask`` is read only by kernel ``peer`` (its lengths)."""
    inp = params["embedding"][x.T]                             # [T, B, E]
    inp, finals = LAYER_STACKS[kernel](params, state, inp, reset, mask, layers, unroll, cell)
    logits = inp @ params["head.w"] + params["head.b"]
    return logits, tuple(jax.lax.stop_gradient(jnp.stack(parts)) for parts in zip(*finals))


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-position cross-entropy in nats; ``logits`` [T, B, V], ``y`` [T, B]."""
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def loss_fn(params: Params, state: State, x: jax.Array, y: jax.Array, mask: jax.Array, reset: jax.Array,
            layers: int, unroll: int, cell: str, kernel: str = "scan"):
    """Masked-mean loss ``sum(ce * mask) / max(sum(mask), 1)`` and the final state."""
    logits, state = logits_fn(params, state, x, reset, layers, unroll, cell, mask, kernel)
    m = mask.T
    loss = jnp.sum(cross_entropy(logits, y.T) * m) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, state


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
    """JAX adapter: ``lax.scan`` reset-aware LSTM (or a flax baseline kernel), one jitted train
    step, optax Adam or SGD."""

    name = "jax"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optimizer: OptimizerSpec,
                 batch_size: int, device: str = "auto", kernel: str = "scan", unroll: int = 1,
                 hoist: bool = False, autodiff: bool = False, **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, kernel=kernel, **options)
        if not isinstance(unroll, (int, np.integer)) or isinstance(unroll, bool) or unroll < 1:
            raise ConfigError("backend.unroll", unroll, "allowed: a positive integer (1: no unrolling)")
        for key, value in (("hoist", hoist), ("autodiff", autodiff)):
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"backend.{key}", value, "allowed: true, false")
        variant = "scan.hoisted" if hoist else ("scan.autodiff" if autodiff else "scan")
        # the layer stacks (LAYER_STACKS keys) of the training and the evaluation kernel
        self._kernel, self._eval = (self._stack(k, variant) for k in (self.kernel_option, self.eval_kernel))
        if self._kernel in FLAX_KERNELS:
            try:
                import flax.linen  # noqa: F401
            except ImportError as err:
                raise ConfigError("backend.kernel", kernel,
                                  f"needs flax ({err}); pip install 'resetbench[jax]'") from None
        self.unroll = int(unroll)
        self.kernel = KERNEL_NAMES[self._kernel].replace("{CELL}", FLAX_CELLS.get(spec.cell, spec.cell)) + (
            "" if self.unroll == 1 else f".unroll{self.unroll}")
        self.dev, self.device = resolve_device(device)
        self._sharding = jax.sharding.SingleDeviceSharding(self.dev)
        self._tx = make_optimizer(optimizer)
        self.params: Params = {k: self._put(np.asarray(v, np.float32)) for k, v in weights.items()}
        self.opt_state = jax.device_put(self._tx.init(self.params), self.dev)
        self._compiled: Dict[Tuple[str, int, int], Any] = {}   # (kind, B, T) -> executable
        self.compile_count = 0
        self.reset_state(batch_size)

    @staticmethod
    def _stack(kernel: Any, variant: str) -> str:
        """The LAYER_STACKS key of ``kernel`` (``scan``: the ``hoist``/``autodiff`` ``variant``);
        ConfigError for a kernel this adapter does not implement."""
        implemented = list(dict.fromkeys(k.split(".")[0] for k in LAYER_STACKS))
        if kernel not in implemented:
            raise ConfigError("backend.kernel", kernel, f"allowed for backend=jax: {', '.join(implemented)}")
        return variant if kernel == "scan" else kernel

    # -- compiled steps --------------------------------------------------------------------------
    def _put(self, arr: np.ndarray) -> jax.Array:
        return jax.device_put(arr, self.dev)

    def _step_fns(self) -> Dict[str, Tuple[Callable, Tuple[int, ...]]]:
        """Kind -> (pure function, donated argument numbers). Arguments: params, [opt_state,]
        state (a tuple), x, y, mask, reset (forward: no y). Train, grads and forward run the
        configured kernel; eval runs ``self.eval_kernel`` (see the module docstring)."""
        L, U, K, E, C = self.spec.layers, self.unroll, self._kernel, self._eval, self.spec.cell
        tx, clip = self._tx, self.optimizer.clip_norm
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def train(params, opt_state, state, x, y, mask, reset):
            (loss, state), grads = grad_fn(params, state, x, y, mask, reset, L, U, C, K)
            updates, opt_state = tx.update(clip_by_global_norm(grads, clip), opt_state, params)
            return optax.apply_updates(params, updates), opt_state, state, loss

        def grads(params, state, x, y, mask, reset):
            (loss, state), g = grad_fn(params, state, x, y, mask, reset, L, U, C, K)
            return loss, g, state

        def evaluate(params, state, x, y, mask, reset):
            logits, state = logits_fn(params, state, x, reset, L, U, C, kernel=E)
            return jnp.sum(cross_entropy(logits, y.T) * mask.T), state

        def forward(params, state, x, mask, reset):
            logits, state = logits_fn(params, state, x, reset, L, U, C, mask, K)
            return jnp.swapaxes(logits, 0, 1), state

        def layer_sum(params, inp, state, reset, mask):
            out, _ = LAYER_STACKS[K](params, state, inp, reset, mask, L, U, C)
            return jnp.sum(out)

        def layer(params, state, x, mask, reset):         # the layers alone: see Backend.layer_timer
            inp = jax.lax.stop_gradient(params["embedding"][x.T])
            return jax.value_and_grad(layer_sum, argnums=(0, 1))(params, inp, state, reset, mask)

        return {"train": (train, (0, 1, 2)), "grads": (grads, ()), "eval": (evaluate, (1,)),
                "forward": (forward, ()), "layer": (layer, ())}

    def _abstract(self, tree: Any) -> Any:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._sharding), tree)

    def _executable(self, kind: str, B: int, T: int):
        """The compiled ``kind`` step for batch shape (B, T); compiled once, ahead of time,
        from shapes only (nothing runs, nothing donated)."""
        key = (kind, int(B), int(T))
        if key not in self._compiled:
            fn, donate = self._step_fns()[kind]
            sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self._sharding)
            state = tuple(sds((self.spec.layers, B, self.spec.hidden), F32) for _ in self.spec.state_names)
            ids, mask, reset = sds((B, T), jnp.int32), sds((B, T), F32), sds((B, T), jnp.bool_)
            args = [self._abstract(self.params)]
            if kind == "train":
                args.append(self._abstract(self.opt_state))
            args += [state, ids] + ([] if kind in ("forward", "layer") else [ids]) + [mask, reset]
            self._compiled[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.compile_count += 1
        return self._compiled[key]

    def _batch(self, batch: Batch, fields: str = "x y mask reset", train: bool = True) -> Tuple[jax.Array, ...]:
        """The batch's ``fields`` on the device, after checking its rows against the carried state
        and, for the training kernel (``train``), its layout against the kernel's ``needs``."""
        B = batch.x.shape[0]
        if B != self.state[0].shape[1]:
            raise ValueError(f"batch has {B} rows but the carried state has {self.state[0].shape[1]}; "
                             f"call reset_state({B}) first")
        if train:
            self.check_batch(batch)
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
        self.params, self.opt_state, self.state, loss = step(self.params, self.opt_state, self.state, *data)
        return loss

    def layer_timer(self, batch: Batch):
        data = self._batch(batch, "x mask reset")
        step = self._executable("layer", *batch.x.shape)
        return lambda: step(self.params, self.state, *data)[0]

    def gradients(self, batch: Batch) -> Tuple[float, Dict[str, np.ndarray]]:
        data = self._batch(batch)
        loss, grads, self.state = self._executable("grads", *batch.x.shape)(self.params, self.state, *data)
        return float(loss), {k: np.asarray(g, np.float32) for k, g in grads.items()}

    def forward(self, batch: Batch) -> np.ndarray:
        data = self._batch(batch, "x mask reset")
        logits, self.state = self._executable("forward", *batch.x.shape)(self.params, self.state, *data)
        return np.asarray(logits)

    def eval_step(self, batch: Batch) -> float:
        data = self._batch(batch, train=False)
        total, self.state = self._executable("eval", *batch.x.shape)(self.params, self.state, *data)
        return float(total)

    def get_state(self) -> Tuple[np.ndarray, ...]:
        return tuple(np.array(s, np.float32) for s in self.state)

    def set_state(self, *state: np.ndarray) -> None:
        # separate device buffers even if the arrays are one object: the train step donates them
        self.state = tuple(self._put(np.array(s, np.float32)) for s in state)
        self.batch_size = self.state[0].shape[1]

    def get_weights(self) -> Dict[str, np.ndarray]:
        return {k: np.array(v, np.float32) for k, v in self.params.items()}

    def synchronize(self) -> None:
        jax.block_until_ready((self.params, self.opt_state, self.state))

    def peak_memory_bytes(self) -> Optional[int]:
        if self.device != "cuda":
            return None
        stats = self.dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else int(peak)

    def versions(self) -> Dict[str, str]:
        import jaxlib

        out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__,
               "numpy": np.__version__}
        if self._kernel in FLAX_KERNELS:
            import flax

            out["flax"] = flax.__version__
        if self._kernel == "haiku":
            from backends.haiku_peer import versions
            out.update(versions())
        return out

    def matmul(self, m: int, k: int, n: int):
        mm = jax.jit(jnp.matmul)
        a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (m, k), F32), self.dev)
        b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (k, n), F32), self.dev)
        mm(a, b).block_until_ready()
        return lambda: mm(a, b).block_until_ready()
