"""``backend=keras``: the contract model on Keras 3 with the TensorFlow backend.

Embedding -> L reset-aware layers of ``model.cell`` (:class:`resetbench.keras_layers.ResetLSTM` or
:class:`~resetbench.keras_layers.ResetGRU`) -> Dense head, cross-entropy on the logits. The
variables are the Keras layers' own, in Keras's layouts; canonical weights are converted on the
way in and out by the layer class (``from_canonical`` / ``to_canonical``: the identity for the
LSTM, whose Keras layout and gate order i, f, g, o are the contract's; for the GRU the r and z
blocks swap and the two biases form Keras's [2, 3H] ``bias``). A conversion is a re-indexing, so
gradients convert the same way, and the optimizer (elementwise, with a global-norm clip) gives the
same update in either layout.

The train step is one ``tf.function`` (optionally XLA, ``jit_compile``) traced once with
``input_signature`` dims ``[None, None]``: no retracing for a new padded length or batch size
(XLA still compiles once per concrete shape; :meth:`KerasBackend.precompile` does that ahead of
the timed loop). The optimizer is written in TensorFlow here, because ``keras.optimizers.Adam``
adds epsilon to ``sqrt(v)`` before bias correction ("epsilon hat") while the contract's Adam
(PyTorch's) adds it to ``sqrt(v_hat)``. The carried state (a tuple, one [L, B, H] tensor per state
component of the cell: ``(h, c)`` or ``(h,)``) stays on the device as tensors passed into and
returned from the compiled functions (detached: the tape never sees them as variables).

Options (``conf/backend/keras.yaml``): ``kernel``, ``jit_compile`` (``auto``/``true``/``false``),
``loop`` (the layer's time-loop implementation), ``threads``.

Kernels (``kernel``, declared in ``conf/backend/keras.yaml``; recorded as
``keras.{xla,tf_function}[.LOOP]`` for ``reset``, and with ``.native.LSTM`` / ``.peer.LSTM_mask``
(``.native.GRU`` / ``.peer.GRU_mask``) for the baselines):

- ``reset`` (exact): the ResetLSTM / ResetGRU layers above.
- ``native``: Keras's built-in ``keras.layers.LSTM`` / ``keras.layers.GRU(reset_after=True)`` (its
  own ``tf.while_loop`` with TensorFlow's autodiff, or cuDNN on a GPU in graph mode), which cannot
  reset a row mid-window: a column-0 reset zeroes that row's initial state (``initial_state``), a
  later one is refused (ValueError, checked on the host). On 2 CPU cores the LSTM is slower than
  ``reset`` (see ``_baseline_jit``).
- ``peer``: what a Keras user writes for variable-length batches: the same Keras layer with a
  padding mask (``positions < length``), on the ``padded`` layout only (ValueError otherwise).
  Masked steps carry the state, so the state left is each row's state after its last token; the
  logits at padded positions are Keras's (they do not count in the loss).

Both baselines are the same model as ``reset`` with the Keras layer in place of the reset-aware one
(the same variable layout), the same loss, tape and optimizer. Each batch is checked on the host
for the layout properties the kernel declares (``needs``). Their ``eval_step`` runs
``self.eval_kernel`` (``reset``: the reset-aware loop on the same weights), because the eval set is
packed streams (every sequence from a zero state).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from backends.base import (Backend, Batch, ConfigError, ModelSpec, OptimizerSpec, canonical_shapes,
                           check_weights)


def _prepare_environment() -> None:
    """Before TensorFlow/Keras load: Keras on TensorFlow, and no start-up log noise."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "keras" in sys.modules:
        import keras
        loaded = keras.backend.backend()
        if loaded != "tensorflow":
            raise ConfigError("backend", "keras", f"Keras was already imported in this process with "
                              f"KERAS_BACKEND={loaded}; backend=keras needs tensorflow (it is fixed at "
                              f"Keras's first import: run in a fresh process)")
    elif os.environ["KERAS_BACKEND"] != "tensorflow":
        raise ConfigError("backend", "keras", f"the environment sets KERAS_BACKEND="
                          f"{os.environ['KERAS_BACKEND']}; backend=keras runs Keras on TensorFlow: "
                          f"unset it or set KERAS_BACKEND=tensorflow")
    try:
        import absl.logging
        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with TensorFlow
        pass


_ABSL_LINE = re.compile(r"^([IWEF])\d{4} ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called"


def _gpu_memory_growth(tf_module) -> None:
    """Let TensorFlow grow its GPU memory instead of taking it all at start-up (possible only
    before its runtime starts; a runtime already started keeps what it has)."""
    for gpu in tf_module.config.list_physical_devices("GPU"):
        try:
            tf_module.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


def _import_quietly():
    """Import TensorFlow and Keras with the C-level stderr captured. TensorFlow 2.21 logs through
    absl before absl's log is initialized, and those lines ignore ``TF_CPP_MIN_LOG_LEVEL`` (for
    example "oneDNN custom operations are on", "Could not find cuda drivers"). The captured lines
    below the requested level are dropped; anything else (and everything, if the import fails)
    is written back to stderr."""
    import tempfile

    fd = 2                                    # the C-level stderr, whatever sys.stderr is now
    try:
        saved = os.dup(fd)
    except OSError:                           # no fd 2 in this process: nothing to guard
        import tensorflow
        _gpu_memory_growth(tensorflow)
        import keras
        return tensorflow, keras
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    drop = "IWEF"[:max(0, min(level, 3))]
    sys.stderr.flush()
    ok = False
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            import tensorflow
            _gpu_memory_growth(tensorflow)
            import keras
            ok = True
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            keep = [ln for ln in text.splitlines(True) if not ok or not (
                (drop and ln.startswith(_ABSL_BANNER)) or
                ((m := _ABSL_LINE.match(ln)) is not None and m.group(1) in drop))]
            if keep:
                sys.stderr.write("".join(keep))
                sys.stderr.flush()
    return tensorflow, keras


_prepare_environment()
tf, keras = _import_quietly()

from resetbench.keras_layers import IMPLEMENTATIONS, LAYERS, ResetRNN, reset_rnn  # noqa: E402

tf.get_logger().setLevel("ERROR")
_CONFIGURED: Dict[str, Any] = {}


def _configure_runtime(threads: Optional[int]) -> None:
    """TensorFlow's thread pools (``threads: null`` keeps its default). They are fixed once its
    runtime starts, so a later, different request is refused instead of silently ignored."""
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError("backend.threads", threads, "a positive integer, or null for TensorFlow's default")
    if _CONFIGURED.get("threads") == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current != threads:
            raise ConfigError("backend.threads", threads, f"TensorFlow already started in this process "
                              f"with {current or 'default'} threads; set it in a fresh process") from None
    _CONFIGURED["threads"] = threads


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when TensorFlow sees a GPU, else ``cpu``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", device, "allowed: auto, cpu, cuda")
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if device == "cuda" and not has_gpu:
        raise ConfigError("device", device, "TensorFlow sees no GPU here; use auto or cpu")
    if device == "auto":
        device = "cuda" if has_gpu else "cpu"
    return device


# the kernels this adapter implements (backend.kernel) -> their suffix of the recorded ``kernel``
# ({LAYER}: the Keras layer of the baselines, KERAS_LAYERS)
KERNEL_SUFFIXES = {"reset": "", "native": ".native.{LAYER}", "peer": ".peer.{LAYER}_mask"}
# cell -> the Keras layer the baselines run (``keras.layers.<name>``) and its options
KERAS_LAYERS = {"lstm": ("LSTM", {}), "gru": ("GRU", {"reset_after": True})}


def _parse_jit(value: Any) -> Any:
    """``auto``, ``true`` or ``false`` (YAML booleans or strings) -> "auto", True or False."""
    if isinstance(value, str):
        value = {"true": True, "false": False, "auto": "auto"}.get(value.lower(), value)
    if value is True or value is False or value == "auto":
        return value
    raise ConfigError("backend.jit_compile", value, "allowed: auto, true, false")


def _rnn_variables(rnn) -> List[Any]:
    """A recurrent layer's ``[kernel, recurrent_kernel, bias]`` (Keras layout): ours hold them
    directly, ``keras.layers.LSTM`` / ``GRU`` in their ``.cell``."""
    holder = rnn if isinstance(rnn, ResetRNN) else rnn.cell
    return [holder.kernel, holder.recurrent_kernel, holder.bias]


class KerasBackend(Backend):
    """Keras 3 (TensorFlow) adapter: ResetLSTM / ResetGRU layers (or ``keras.layers.LSTM`` /
    ``GRU`` for the baseline kernels), compiled train step, Adam or SGD, clipping."""

    name = "keras"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray], optimizer: OptimizerSpec,
                 batch_size: int, device: str = "auto", kernel: str = "reset", jit_compile: Any = "auto",
                 loop: str = "auto", threads: Optional[int] = None, **options: Any):
        super().__init__(spec, weights, optimizer, batch_size, device, kernel=kernel, **options)
        for k in (self.kernel_option, self.eval_kernel):
            if k not in KERNEL_SUFFIXES:
                raise ConfigError("backend.kernel", k, f"allowed for backend=keras: {', '.join(KERNEL_SUFFIXES)}")
        if spec.cell not in LAYERS:
            raise ConfigError("model.cell", spec.cell, f"allowed for backend=keras: {', '.join(LAYERS)}")
        if optimizer.name not in ("adam", "sgd"):
            raise ConfigError("train.optimizer", optimizer.name, "allowed: adam, sgd")
        if loop not in IMPLEMENTATIONS or loop == "unroll":
            raise ConfigError("backend.loop", loop, "allowed for backend=keras: auto, tf_bptt, tf_while, scan")
        if kernel != "reset" and loop != "auto":
            raise ConfigError("backend.loop", loop, f"{LAYERS[spec.cell].__name__}'s loop; kernel={kernel} runs "
                              f"keras.layers.{KERAS_LAYERS[spec.cell][0]}'s own loop: leave loop=auto")
        _configure_runtime(threads)
        self.device = resolve_device(device)
        self._tf_device = "/GPU:0" if self.device == "cuda" else "/CPU:0"
        jit = _parse_jit(jit_compile)
        if loop == "scan" and jit is True:
            # keras.ops.scan builds its tf.while_loop without maximum_iterations, which XLA needs
            # when T is only known at run time ("XLA compilation requires a fixed tensor list size")
            raise ConfigError("backend.jit_compile", jit_compile, "XLA cannot compile loop=scan (Keras's "
                              "scan sets no maximum_iterations); use loop=tf_while or jit_compile=false")
        # auto: XLA. Measured on 2 CPU cores (B=32, T=64, E=64, H=256, L=1, Adam, loop=tf_bptt, LSTM):
        # ~37k valid tokens/s with XLA vs ~25k with the plain tf.function graph, and the same
        # ordering at T=256 and 512 (XLA compiles ~2.5 s per (B, T) vs ~1.5 s to trace once).
        # loop=scan cannot compile under XLA, so auto means graph mode there.
        self.jit = (loop != "scan") if jit == "auto" else bool(jit)
        self.loop = "tf_bptt" if loop == "auto" else loop
        # the train and eval steps' compilation: the reset-aware loop as self.jit, the Keras layer
        # as _baseline_jit says
        self.train_jit, self.eval_jit = (self.jit if k == "reset" else self._baseline_jit(jit)
                                         for k in (self.kernel_option, self.eval_kernel))
        self.kernel = ("keras.xla" if self.train_jit else "keras.tf_function") + (
            KERNEL_SUFFIXES[kernel].replace("{LAYER}", KERAS_LAYERS[spec.cell][0])
            or ("" if self.loop == "tf_bptt" else f".{self.loop}"))
        self._build_model(weights)
        self._build_functions()
        self.reset_state(batch_size)

    def _build_model(self, weights: Mapping[str, np.ndarray]) -> None:
        """The layers (``_make_rnn``: the training kernel's recurrent layer) from canonical
        ``weights``, their variables in canonical-key order (``_tvars``), and the optimizer's
        slots, on this backend's device."""
        spec = self.spec
        L, H, E, V = spec.layers, spec.hidden, spec.embed, spec.vocab
        with tf.device(self._tf_device):
            self.embedding = keras.layers.Embedding(V, E, name="embedding")
            self.embedding.build((None, None))
            self.rnns: List[Any] = []
            for layer in range(L):
                rnn = self._make_rnn(layer)
                rnn.build((None, None, E if layer == 0 else H))
                self.rnns.append(rnn)
            self.head = keras.layers.Dense(V, name="head")
            self.head.build((None, None, H))
            variables = [self.embedding.embeddings] + [v for rnn in self.rnns for v in _rnn_variables(rnn)]
            self._tvars = [v.value for v in variables + [self.head.kernel, self.head.bias]]   # the tf.Variables
            for var, value in zip(self._tvars, self._from_canonical(check_weights(weights, spec))):
                var.assign(value)
            self._m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self._tvars]
            self._v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self._tvars]
            self._t = tf.Variable(0, dtype=tf.int64, trainable=False)

    # -- canonical weights <-> the variables' layout ------------------------------------------
    def _from_canonical(self, weights: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """Canonical weights -> one float32 array per variable of ``_tvars`` (Keras's layouts)."""
        cell = self.spec.cell
        arrays = [weights["embedding"]]
        for layer in range(self.spec.layers):
            prefix = f"{cell}.{layer}."
            arrays += LAYERS[cell].from_canonical({k[len(prefix):]: v for k, v in weights.items()
                                                   if k.startswith(prefix)})
        arrays += [weights["head.w"], weights["head.b"]]
        return [np.asarray(a, np.float32) for a in arrays]

    def _to_canonical(self, arrays: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        """The inverse of :meth:`_from_canonical`, for weights and for their gradients (a
        re-indexing): float32 copies by canonical key, in canonical order."""
        cell = self.spec.cell
        out = {"embedding": arrays[0], "head.w": arrays[-2], "head.b": arrays[-1]}
        for layer in range(self.spec.layers):
            parts = LAYERS[cell].to_canonical(*arrays[1 + 3 * layer:4 + 3 * layer])
            out.update({f"{cell}.{layer}.{k}": v for k, v in parts.items()})
        return {k: np.array(out[k], np.float32) for k in canonical_shapes(self.spec)}

    def _baseline_jit(self, jit: Any) -> bool:
        """jit_compile=auto for kernel=native/peer: XLA on a CPU, measured there (2 cores, B=32,
        T=64, E=64, H=256, L=1, Adam, valid tokens/s, LSTM): native 34k with XLA vs 26k as a
        tf.function graph, peer 27k vs 16k (reset: 40k with XLA); the GRU follows the LSTM (not
        measured). On a GPU the graph, where keras.layers.LSTM / GRU take their cuDNN kernel,
        which XLA cannot compile (not measured here)."""
        if jit != "auto":
            return bool(jit)
        return self.device != "cuda"

    # -- model ---------------------------------------------------------------------------------
    def _make_rnn(self, layer: int):
        """Layer ``layer``'s recurrent layer: the one place where the kernels' models differ."""
        H, cell = self.spec.hidden, self.spec.cell
        name = f"{cell}_{layer}"
        if self.kernel_option != "reset":
            keras_name, options = KERAS_LAYERS[cell]
            return getattr(keras.layers, keras_name)(H, return_sequences=True, return_state=True, name=name,
                                                     **options)
        return LAYERS[cell](H, return_state=True, implementation=self.loop, name=name)

    def _logits(self, x, mask, reset, state, kernel: str):
        """Logits and final state (a tuple of [L, B, H]) with ``kernel`` (see :meth:`_layers`)."""
        out, state = self._layers(self.embedding(x), mask, reset, state, kernel)
        return self.head(out), state

    def _layers(self, inp, mask, reset, state, kernel: str):
        """The recurrent layers' outputs and final state with ``kernel``: ``reset`` runs the
        reset-aware loop (our layers, or the same loop on a Keras layer's weights: a baseline's
        eval step), ``native`` and ``peer`` the Keras layer (``peer`` with a padding mask)."""
        finals = []
        keep = 1.0 - tf.cast(reset[:, :1], tf.float32)        # [B, 1]: the column-0 resets
        seq_mask = None
        if kernel == "peer":
            lengths = tf.reduce_sum(tf.cast(mask > 0, tf.int32), axis=1)   # checked on the host
            seq_mask = tf.sequence_mask(lengths, tf.shape(reset)[1])
        for layer, rnn in enumerate(self.rnns):
            s0 = tuple(s[layer] for s in state)
            if isinstance(rnn, ResetRNN):
                inp, *final = rnn(inp, reset, initial_state=s0)
            elif kernel == "reset":
                inp, final = reset_rnn(self.spec.cell, inp, reset, s0, *_rnn_variables(rnn), self.loop)
            else:
                inp, *final = rnn(inp, mask=seq_mask, initial_state=[s * keep for s in s0])
            finals.append(tuple(final))
        return inp, tuple(tf.stack(parts) for parts in zip(*finals))

    @staticmethod
    def _ce(logits, y):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    def _loss(self, x, y, mask, reset, state):
        logits, state = self._logits(x, mask, reset, state, self.kernel_option)
        loss = tf.reduce_sum(self._ce(logits, y) * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
        return loss, state

    def _grads(self, x, y, mask, reset, state):
        with tf.GradientTape() as tape:
            loss, state = self._loss(x, y, mask, reset, state)
        grads = tape.gradient(loss, self._tvars)
        # the embedding's gradient comes as IndexedSlices (maybe with repeated rows): make every
        # gradient dense so the global norm and Adam see the summed per-row gradient
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, self._tvars)]
        return loss, grads, state

    def _apply(self, grads):
        s = self.optimizer
        if s.clip_norm is not None:
            norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
            clip = tf.constant(s.clip_norm, tf.float32)
            scale = clip / tf.maximum(norm, clip)
            grads = [g * scale for g in grads]
        if s.name == "sgd":
            for v, g in zip(self._tvars, grads):
                v.assign_sub(s.lr * g)
            return
        t = self._t.assign_add(1)
        t64 = tf.cast(t, tf.float64)                    # bias corrections in double, as PyTorch
        bc1 = tf.cast(1.0 - tf.pow(tf.constant(s.beta1, tf.float64), t64), tf.float32)
        bc2 = tf.cast(1.0 - tf.pow(tf.constant(s.beta2, tf.float64), t64), tf.float32)
        for v, m, u, g in zip(self._tvars, self._m, self._v, grads):
            m_new = m.assign(s.beta1 * m + (1.0 - s.beta1) * g)
            u_new = u.assign(s.beta2 * u + (1.0 - s.beta2) * tf.square(g))
            v.assign_sub(s.lr * (m_new / bc1) / (tf.sqrt(u_new / bc2) + s.eps))

    def _build_functions(self) -> None:
        L, H = self.spec.layers, self.spec.hidden
        ids = tf.TensorSpec([None, None], tf.int32)
        sig_batch = [ids, ids, tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.bool)]
        sig_state = [tuple(tf.TensorSpec([L, None, H], tf.float32) for _ in self.spec.state_names)]

        def train(x, y, mask, reset, state):
            loss, grads, state = self._grads(x, y, mask, reset, state)
            self._apply(grads)
            return loss, state

        def evaluate(x, y, mask, reset, state):
            logits, state = self._logits(x, mask, reset, state, self.eval_kernel)
            return tf.reduce_sum(self._ce(logits, y) * mask), state

        def forward(x, mask, reset, state):
            return self._logits(x, mask, reset, state, self.kernel_option)

        def layer(x, mask, reset, state):                  # the layers alone: see Backend.layer_timer
            inp = self.embedding(x)
            with tf.GradientTape() as tape:
                tape.watch(inp)
                loss = tf.reduce_sum(self._layers(inp, mask, reset, state, self.kernel_option)[0])
            grads = tape.gradient(loss, [inp] + self._tvars)
            return loss, [g for g in grads if g is not None]

        # train and eval steps: XLA if chosen (XLA compiles once per (B, T); see precompile).
        # forward and gradients serve the tests, which feed many shapes: graph mode only, so the
        # tests do not pay one XLA compile per shape (train_step's numerics under XLA are checked
        # by the conformance tests through the weights after several steps).
        self._train_fn = tf.function(train, input_signature=sig_batch + sig_state, jit_compile=self.train_jit)
        self._eval_fn = tf.function(evaluate, input_signature=sig_batch + sig_state, jit_compile=self.eval_jit)
        self._grad_fn = tf.function(self._grads, input_signature=sig_batch + sig_state, jit_compile=False)
        self._fwd_fn = tf.function(forward, input_signature=[ids] + sig_batch[2:] + sig_state, jit_compile=False)
        self._layer_fn = tf.function(layer, input_signature=[ids] + sig_batch[2:] + sig_state, jit_compile=self.train_jit)

    def _args(self, batch: Batch):
        """The batch's arrays for the train, gradient and forward functions, after the host-side
        check of the layout properties the kernel needs (ValueError: see backends.base)."""
        self.check_batch(batch)
        return (batch.x, batch.y, batch.mask, batch.reset)

    # -- protocol ------------------------------------------------------------------------------
    def train_step(self, batch: Batch):
        with tf.device(self._tf_device):
            loss, self._state = self._train_fn(*self._args(batch), self._state)
        return loss

    def layer_timer(self, batch: Batch):
        self.check_batch(batch)
        args = (batch.x, batch.mask, batch.reset, self._state)

        def run():
            with tf.device(self._tf_device):
                return self._layer_fn(*args)[0]
        return run

    def gradients(self, batch: Batch) -> Tuple[float, Dict[str, np.ndarray]]:
        with tf.device(self._tf_device):
            loss, grads, self._state = self._grad_fn(*self._args(batch), self._state)
        return float(loss), self._to_canonical([g.numpy() for g in grads])

    def forward(self, batch: Batch) -> np.ndarray:
        with tf.device(self._tf_device):
            x, _, mask, reset = self._args(batch)
            logits, self._state = self._fwd_fn(x, mask, reset, self._state)
        return logits.numpy()

    def eval_step(self, batch: Batch) -> float:
        with tf.device(self._tf_device):   # self.eval_kernel: an exact one (packed eval set)
            total, self._state = self._eval_fn(batch.x, batch.y, batch.mask, batch.reset, self._state)
        return float(total)

    def get_state(self) -> Tuple[np.ndarray, ...]:
        return tuple(s.numpy().copy() for s in self._state)

    def set_state(self, *state: np.ndarray) -> None:
        if len(state) != len(self.spec.state_names):
            raise ValueError(f"set_state: {len(state)} arrays; model.cell={self.spec.cell} has "
                             f"{len(self.spec.state_names)} state components ({', '.join(self.spec.state_names)})")
        with tf.device(self._tf_device):
            self._state = tuple(tf.identity(np.asarray(s, np.float32)) for s in state)
        self.batch_size = int(self._state[0].shape[1])

    def get_weights(self) -> Dict[str, np.ndarray]:
        return self._to_canonical([v.numpy() for v in self._tvars])

    def precompile(self, train_shapes: Sequence[Tuple[int, int]],
                   eval_shapes: Sequence[Tuple[int, int]] = ()) -> None:
        """Trace once and run each distinct (B, T) on a dummy batch (so XLA compiles every shape and
        TensorFlow's graph optimizations run), then restore weights, optimizer and carried state."""
        train_shapes = sorted({(int(b), int(t)) for b, t in train_shapes})
        eval_shapes = sorted({(int(b), int(t)) for b, t in eval_shapes})
        if not train_shapes and not eval_shapes:
            return
        L, H = self.spec.layers, self.spec.hidden
        saved = [tf.identity(v) for v in self._tvars + self._m + self._v] + [tf.identity(self._t)]
        state_keep = self._state

        def dummy(B, T):
            z = np.zeros((B, T), np.int32)
            reset = np.zeros((B, T), bool)
            reset[:, 0] = True
            s = np.zeros((L, B, H), np.float32)
            return z, z, np.zeros((B, T), np.float32), reset, tuple(s for _ in self.spec.state_names)

        try:
            with tf.device(self._tf_device):
                for B, T in train_shapes:
                    self._train_fn(*dummy(B, T))[0].numpy()
                for B, T in eval_shapes:
                    self._eval_fn(*dummy(B, T))[0].numpy()
        finally:
            for var, val in zip(self._tvars + self._m + self._v + [self._t], saved):
                var.assign(val)
            self._state = state_keep

    def synchronize(self) -> None:
        if self.device == "cuda":
            tf.test.experimental.sync_devices()

    def peak_memory_bytes(self) -> Optional[int]:
        if self.device == "cuda":
            return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
        return None

    def versions(self) -> Dict[str, str]:
        return {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}

    def matmul(self, m: int, k: int, n: int):
        mm = tf.function(tf.linalg.matmul, jit_compile=False)
        with tf.device(self._tf_device):
            a, b = tf.random.normal((m, k)), tf.random.normal((k, n))
            mm(a, b).numpy()

        def run() -> None:
            with tf.device(self._tf_device):
                mm(a, b).numpy()
        return run
