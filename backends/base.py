"""The backend adapter protocol and canonical-weight helpers.

Every framework adapter implements :class:`Backend`. It receives contract batches
(NumPy ``x``, ``y``, ``mask``, ``reset``; see docs/spec.md section 2) and applies
one rule: zero the state of row ``b`` before step ``t`` where ``reset[b, t]``, count the loss
where ``mask[b, t]``. It never knows which strategy produced a batch.

This module imports NumPy only, so the harness can validate configs and weights before any
framework is imported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from backends.cells import cell_spec
from resetbench.contract import BOUNDARY, VOCAB, Batch, ConfigError  # noqa: F401  (re-exported)



@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The contract model: embedding V x E, L recurrent layers of cell ``cell`` (a file in
    ``conf/cell/``) and width H, head H x V."""

    embed: int
    hidden: int
    layers: int = 1
    vocab: int = VOCAB
    cell: str = "lstm"

    @property
    def state_names(self) -> Tuple[str, ...]:
        """The cell's state components (``("h", "c")`` for the LSTM); the first is the output."""
        return cell_spec(self.cell).state


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer settings with one meaning on every backend.

    ``adam``: PyTorch semantics (bias-corrected moments, ``eps`` added to ``sqrt(v_hat)``).
    ``sgd``: plain ``w -= lr * g``. Clipping: ``g *= clip_norm / max(global_norm, clip_norm)``
    applied before the update when ``clip_norm`` is not None.
    """

    name: str = "adam"
    lr: float = 1e-3
    clip_norm: Optional[float] = None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


# --------------------------------------------------------------------------- canonical weights
def canonical_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of every canonical weight array, in a stable order: ``embedding`` [V, E], per
    layer ``l`` the cell's weights ``<cell>.<l>.<key>`` (``conf/cell/<cell>.yaml``), ``head.w``
    [H, V], ``head.b`` [V]."""
    E, H, V = spec.embed, spec.hidden, spec.vocab
    cell = cell_spec(spec.cell)
    shapes: Dict[str, Tuple[int, ...]] = {"embedding": (V, E)}
    for layer in range(spec.layers):
        for key in cell.weights:
            shapes[f"{cell.name}.{layer}.{key}"] = cell.shape(key, E if layer == 0 else H, H)
    shapes["head.w"] = (H, V)
    shapes["head.b"] = (V,)
    return shapes


def init_weights(spec: ModelSpec, seed: int) -> Dict[str, np.ndarray]:
    """Draw the initial canonical weights once, in NumPy, from ``seed``.

    Cell and head weights ~ U(-1/sqrt(H), 1/sqrt(H)) as in PyTorch's defaults, cell biases as the
    cell file says (LSTM: zero except the forget gate at 1.0), head bias zero, embedding
    ~ N(0, 0.1^2). Every backend starts from these.
    """
    rng = np.random.default_rng([seed, 20160517])
    H = spec.hidden
    cell = cell_spec(spec.cell)
    bound = 1.0 / math.sqrt(H)
    weights: Dict[str, np.ndarray] = {}
    for key, shape in canonical_shapes(spec).items():
        if key == "embedding":
            w = rng.normal(0.0, 0.1, size=shape)
        elif key.startswith(f"{cell.name}.") and key.rsplit(".", 1)[1].startswith("b"):
            w = cell.bias_init(H)
        elif key == "head.b":
            w = np.zeros(shape)
        else:
            w = rng.uniform(-bound, bound, size=shape)
        weights[key] = w.astype(np.float32)
    return weights


def check_weights(weights: Mapping[str, np.ndarray], spec: ModelSpec,
                  key_name: str = "model.init", source: Any = "<weights>") -> Dict[str, np.ndarray]:
    """Return float32 copies of ``weights`` after checking them against ``spec``: every canonical
    key present with its shape, a floating-point dtype and finite values, and no other key.

    Raises :class:`ConfigError` (``key_name=source: key 'K' ...``; ``source`` is the file) naming
    the first missing, extra or bad key.
    """
    shapes = canonical_shapes(spec)

    def bad(message: str) -> ConfigError:
        return ConfigError(key_name, source, message)

    out: Dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key not in weights:
            raise bad(f"missing canonical key {key!r} (expected keys: {', '.join(shapes)})")
        arr = np.asarray(weights[key])
        if arr.dtype.kind != "f":
            raise bad(f"key {key!r} has dtype {arr.dtype}; canonical weights are floating-point arrays")
        if tuple(arr.shape) != shape:
            raise bad(f"key {key!r} has shape {tuple(arr.shape)} but model.embed/hidden/layers require {shape}")
        if not np.all(np.isfinite(arr)):
            raise bad(f"key {key!r} contains NaN or inf")
        out[key] = arr.astype(np.float32, copy=True)
    for key in weights:
        if key in shapes:
            continue
        parts = str(key).split(".")
        if len(parts) == 3 and parts[0] == spec.cell and parts[1].isdigit() and int(parts[1]) >= spec.layers:
            raise bad(f"key {key!r} is a weight of {spec.cell.upper()} layer {parts[1]}, but model.layers={spec.layers} "
                      f"(set model.layers to the file's layer count)")
        raise bad(f"unknown key {key!r} (canonical keys: {', '.join(shapes)})")
    return out


NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")     # an .npz is a zip archive (np.savez); empty or not


def load_weights(path: str, spec: ModelSpec) -> Dict[str, np.ndarray]:
    """Load and check a canonical ``.npz`` (``model.init=PATH``); every error names the file."""
    if not os.path.isfile(path):
        raise ConfigError("model.init", path, "file not found; give a canonical weights .npz")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ConfigError("model.init", path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if magic not in NPZ_MAGIC:
        raise ConfigError("model.init", path, "not an .npz archive (np.savez writes one: canonical weights "
                          "by key, docs/spec.md section 5)")
    raw: Dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    raw[key] = npz[key]
                except ValueError:     # object arrays need pickle, which is never allowed
                    raise ConfigError("model.init", path, f"key {key!r} holds Python objects; canonical "
                                      f"weights are floating-point arrays") from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError("model.init", path, f"not a readable .npz ({type(exc).__name__}"
                          f"{': ' + detail if detail else ''})") from None
    return check_weights(raw, spec, source=path)


def save_weights(path: str, weights: Mapping[str, np.ndarray], atomic: bool = True) -> None:
    """Write canonical weights as a float32 ``.npz`` at exactly ``path``; ``atomic``: through a
    temporary file renamed over ``path`` (removed again if the write fails)."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    target = f"{path}.tmp" if atomic else path
    try:
        with open(target, "wb") as fh:          # a file object: np.savez adds no ".npz" suffix
            np.savez(fh, **arrays)
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic and os.path.exists(target):
            os.unlink(target)
        raise


# --------------------------------------------------------------------------- the protocol
class Backend(ABC):
    """One framework's per-sample-reset LSTM language model.

    Lifecycle: ``__init__`` builds the model from canonical weights on ``device`` and sets a zero
    carried state for ``batch_size`` rows. Each call that consumes a batch starts from the
    carried state and leaves the batch's final state as the new carried state (detached: no
    gradient crosses a batch boundary). ``reset[b, 0]`` zeroes row ``b`` first.

    Subclasses set ``name`` and ``kernel`` (which implementation path runs; recorded in
    ``summary.json``) and ``device`` (the resolved device: ``cpu`` or ``cuda``).

    Kernels: ``kernel_option`` is the value of ``backend.kernel`` (what trains); ``eval_kernel``
    is what ``eval_step`` runs (the backend's default exact kernel when ``kernel_option`` is a
    baseline); ``needs`` are the layout properties ``kernel_option`` requires, checked on each
    batch it consumes (:meth:`check_batch`). ``benchmarks.registry.build_backend`` passes
    ``eval_kernel`` and ``needs`` from the kernel's declaration in ``conf/backend/<name>.yaml``;
    an adapter built directly reads them from that declaration itself. An adapter dispatches on
    the kernel names it implements and raises ConfigError for any other.
    """

    name: str = "abstract"
    kernel: str = "unknown"
    device: str = "cpu"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray],
                 optimizer: OptimizerSpec, batch_size: int, device: str = "auto", kernel: Optional[str] = None,
                 eval_kernel: Optional[str] = None, needs: Optional[Sequence[str]] = None, **options: Any):
        self.spec = spec
        self.optimizer = optimizer
        self.batch_size = batch_size
        if options:
            raise ConfigError(f"backend.{next(iter(options))}", options[next(iter(options))],
                              f"not an option of backend={self.name}")
        if eval_kernel is None or needs is None:            # built directly, not by the registry
            eval_kernel, needs = _declared_facts(self.name, kernel)
        self.kernel_option = kernel
        self.eval_kernel = eval_kernel
        self.needs = tuple(needs)

    def check_batch(self, batch: "Batch") -> None:
        """Raise ValueError unless ``batch`` has the layout properties the training kernel needs
        (call it before the training kernel consumes a batch; evaluation runs an exact kernel)."""
        check_layout(batch, self.needs, str(self.kernel_option))

    # -- training ---------------------------------------------------------------------------
    @abstractmethod
    def train_step(self, batch) -> Any:
        """One optimizer step on ``batch``; returns the batch loss (anything ``float()`` accepts;
        it may stay on the device until read)."""

    @abstractmethod
    def gradients(self, batch) -> Tuple[float, Dict[str, np.ndarray]]:
        """Loss and gradients w.r.t. every canonical weight on ``batch``, without updating the
        weights (advances the carried state). Used by the conformance tests."""

    # -- inference ---------------------------------------------------------------------------
    @abstractmethod
    def forward(self, batch) -> np.ndarray:
        """Logits ``[B, T, V]`` for ``batch`` (advances the carried state). For tests."""

    @abstractmethod
    def eval_step(self, batch) -> float:
        """Sum over the batch of ``cross_entropy * mask`` in nats (advances the carried state)."""

    # -- state and weights -------------------------------------------------------------------
    @abstractmethod
    def get_state(self) -> Tuple[np.ndarray, ...]:
        """The carried state as NumPy arrays, one per state component of the cell
        (``spec.state_names``: ``(h, c)`` for the LSTM), each ``[L, B, H]`` float32."""

    @abstractmethod
    def set_state(self, *state: np.ndarray) -> None:
        """Replace the carried state (one ``[L, B, H]`` array per component). ``B`` may differ."""

    def reset_state(self, batch_size: Optional[int] = None) -> None:
        """Zero the carried state of every row (optionally for a new row count)."""
        B = self.batch_size if batch_size is None else batch_size
        self.batch_size = B
        z = np.zeros((self.spec.layers, B, self.spec.hidden), np.float32)
        self.set_state(*(z for _ in self.spec.state_names))

    @abstractmethod
    def get_weights(self) -> Dict[str, np.ndarray]:
        """The current weights as canonical float32 NumPy arrays."""

    # -- compilation ---------------------------------------------------------------------------
    def precompile(self, train_shapes: Sequence[Tuple[int, int]],
                   eval_shapes: Sequence[Tuple[int, int]] = ()) -> None:
        """Compile the train and eval steps for these ``(B, T)`` batch shapes ahead of the timed
        loop, without changing weights, optimizer or carried state. The harness times this call
        as part of ``compile_time_s``. Eager backends need not override it."""

    # -- environment -------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Block until queued device work is done (call before reading a clock)."""

    def peak_memory_bytes(self) -> Optional[int]:
        """Peak device memory on an accelerator, or None on the CPU (the harness then reports
        the process's peak resident memory)."""
        return None

    def versions(self) -> Dict[str, str]:
        """Framework versions to record in ``summary.json``."""
        return {}

    def matmul(self, m: int, k: int, n: int) -> Optional[Callable[[], None]]:
        """A no-argument call that runs one float32 ``[m, k] x [k, n]`` matmul through this
        backend's framework on its device and waits for it (the kernel benchmark's matmul peak);
        None: the benchmark measures NumPy's instead."""
        return None

    def layer_timer(self, batch: Batch) -> Optional[Callable[[], Any]]:
        """A no-argument call that runs the recurrent layers alone on ``batch`` with the training
        kernel: forward from the carried state and backward of the sum of the last layer's
        outputs to the layers' weights and inputs (no embedding, head, loss or optimizer; the
        state is not advanced); returns a scalar to read after synchronizing. The kernel
        benchmark's layer-only rows (a full step's ratio hides the layer's own gap). None: not
        offered."""
        return None


def _declared_facts(backend: str, kernel: Optional[str]) -> Tuple[str, Tuple[str, ...]]:
    """``(eval_kernel, needs)`` of ``kernel`` from ``conf/backend/<backend>.yaml``, for an adapter
    built without ``benchmarks.registry.build_backend`` (imported here, lazily: the registry
    imports this module)."""
    from benchmarks import registry

    if backend not in registry.group_options("backend"):
        raise ConfigError("backend", backend, "has no conf/backend file declaring its kernels; build it with "
                          "benchmarks.registry.build_backend, or pass eval_kernel and needs")
    facts = registry.kernel_facts(registry.group_config("backend", backend), kernel)
    return facts["eval_kernel"], facts["needs"]


# --------------------------------------------------------------------------- shared math helpers
def clip_scale(global_norm: float, clip_norm: Optional[float]) -> float:
    """The factor that global-norm clipping multiplies every gradient by."""
    if clip_norm is None:
        return 1.0
    return float(clip_norm) / max(float(global_norm), float(clip_norm))


# --------------------------------------------------------------------------- layout properties
# What a kernel may declare under ``needs`` and a strategy under ``guarantees`` (docs/spec.md
# section 4): property -> a check of one batch that returns why it fails ("" if it holds).
def _fresh_rows(batch: "Batch") -> str:
    if batch.reset[:, 0].all():
        return ""
    b = int(np.flatnonzero(~batch.reset[:, 0])[0])
    return f"row {b} carries state into the window (reset[{b}, 0] is False)"


def _no_mid_reset(batch: "Batch") -> str:
    mid = np.argwhere(batch.reset[:, 1:])
    if not mid.size:
        return ""
    return f"a row resets mid-window (row {int(mid[0][0])}, column {int(mid[0][1]) + 1})"


def _prefix_mask(batch: "Batch") -> str:
    lengths = (batch.mask != 0).sum(axis=1)
    T = batch.mask.shape[1]
    prefix = np.arange(T)[None, :] < lengths[:, None]
    if np.array_equal(batch.mask != 0, prefix):
        return ""
    b = int(np.flatnonzero((batch.mask != 0) != prefix)[0] // T)
    return f"row {b}'s mask is not a prefix of ones"


LAYOUT_CHECKS = {"fresh_rows": _fresh_rows, "no_mid_reset": _no_mid_reset, "prefix_mask": _prefix_mask}


def check_layout(batch: "Batch", needs: Sequence[str], kernel: str) -> None:
    """Raise ValueError, naming ``kernel``, the property and the first offending row, unless
    ``batch`` has every layout property in ``needs`` (a kernel's declared ``needs``)."""
    for prop in needs:
        if prop not in LAYOUT_CHECKS:
            raise ValueError(f"backend.kernel={kernel} needs {prop!r}, which is not a known layout property "
                             f"({', '.join(LAYOUT_CHECKS)})")
        why = LAYOUT_CHECKS[prop](batch)
        if why:
            raise ValueError(f"backend.kernel={kernel} needs {prop}: {why}; use a layout that guarantees "
                             f"{prop}, or a reset-aware kernel")


def row_lengths(batch: "Batch") -> np.ndarray:
    """Per-row counts of valid targets (int32 [B]): each row's length when its mask is a prefix
    of ones (``check_layout(batch, ["prefix_mask"], ...)`` first)."""
    return (batch.mask != 0).sum(axis=1).astype(np.int32)
