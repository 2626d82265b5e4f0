"""ResetLSTM and ResetGRU trained on every Keras backend (tensorflow, jax, torch), each in its own
subprocess (tests/keras_training_worker.py; the Keras backend is fixed at Keras's first import),
one after another, against the NumPy oracle: for every loop the backend runs, the forward pass
(logits and carried state after a window with mid-window resets, from a carried state), the loss
and every gradient, and the losses, weights and carried state after ``train_on_batch`` SGD steps;
with the default loop, ``fit`` over the same windows and a ``model.save`` / ``load_model`` round
trip (variables, and the per-row state semantics of the loaded layer on a window that carries some
rows and resets others). Tiny model (E=8, H=16, B=4, T=9, three windows).

The same worker also calls ``ResetLSTM`` alone (every loop the backend runs, with an initial state
and ``return_state=True``; a stateful layer's two calls against one) against the oracle, and
imports ``backend=keras``, which must refuse a Keras on another backend (these ran in processes of
their own in tests/test_keras_layer.py: the same Keras start, twice). The worker runs the README's
Keras example first, for tests/test_keras_example.py: one worker per backend serves both modules
(the ``keras_worker`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from backends.base import Batch, ModelSpec, OptimizerSpec
from benchmarks import registry
from tests.helpers import (REQUIRE_ALL, assert_close, layer_case, mid_reset_batches, oracle, random_batch,
                           random_state, tiny_weights)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every cell the keras reset kernel declares (conf/backend/keras.yaml)
CELLS = tuple(registry.kernel_decls(registry.backend_configs()["keras"])["reset"].cells)
SPEC = ModelSpec(embed=8, hidden=16, layers=1)
SGD = OptimizerSpec("sgd", lr=0.5)
LOOPS = {"tensorflow": ("tf_bptt", "tf_while", "scan", "unroll"), "jax": ("scan", "unroll"),
         "torch": ("scan", "unroll")}
B, T = 4, 9


def _require(*modules: str) -> None:
    """Skip unless ``modules`` are installed (fail instead under RESETBENCH_REQUIRE_ALL=1)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        if REQUIRE_ALL:
            pytest.fail(f"needs {missing} (RESETBENCH_REQUIRE_ALL=1)")
        pytest.skip(f"needs {missing}")


def _case():
    """Three consecutive windows with mid-window resets (a column-0 reset in the second, padding
    in the third), a fourth one (``next``), and per cell canonical weights and a carried state."""
    windows = mid_reset_batches(30, B=B, T=T)
    nxt = random_batch(np.random.default_rng(31), B, T, resets=[(0, 0), (2, 4)])
    case = {"cells": np.array(CELLS), "lr": np.float64(SGD.lr), "next_x": nxt.x, "next_reset": nxt.reset}
    for field in ("x", "y", "mask", "reset"):
        case[field] = np.stack([getattr(b, field) for b in windows])
    for cell in CELLS:
        spec = dataclasses.replace(SPEC, cell=cell)
        case.update({f"{cell}/w/{k}": v for k, v in tiny_weights(3, spec).items()})
        state = random_state(32, spec, B)
        case.update({f"{cell}/state0/{n}": s[0] for n, s in zip(spec.state_names, state)})
    return case, windows, nxt


def _layer_case(seed: int = 5):
    """``ResetLSTM`` alone (:func:`tests.helpers.layer_case`): its inputs, resets, canonical weights
    and a carried state as ``layer/*`` arrays for the worker, and the oracle's (float64) sequence
    and final state."""
    inputs, reset, lw, state, (seq, h, c) = layer_case(seed, "lstm", B, T, spec=SPEC)
    arrays = {"layer/inputs": inputs, "layer/reset": reset, "layer/h0": state[0], "layer/c0": state[1]}
    arrays.update({f"layer/{k}": v for k, v in lw.items()})
    return arrays, {"seq": seq, "h": h, "c": c}


def run_worker(backend: str, tmp_path):
    """The worker under ``KERAS_BACKEND=backend`` on :func:`_case` and :func:`_layer_case`, the
    README's Keras example first (for tests/test_keras_example.py); returns what it wrote. Run once
    per backend by the ``keras_worker`` fixture (tests/conftest.py)."""
    case, _, _ = _case()
    return _run_worker(backend, {**case, **_layer_case()[0], "readme": np.array(True)}, tmp_path)


def _run_worker(backend: str, case, tmp_path):
    """The worker under ``KERAS_BACKEND=backend``; returns what it wrote."""
    np.savez(tmp_path / "case.npz", **case)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "tests.keras_training_worker", str(tmp_path / "case.npz"),
                           str(tmp_path / "out.npz"), str(tmp_path)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=900)
    assert proc.returncode == 0, f"KERAS_BACKEND={backend}: the worker failed:\n{proc.stderr[-4000:]}"
    return dict(np.load(tmp_path / "out.npz"))


class Oracle:
    """The oracle of one cell from the case's weights and carried state (float64)."""

    def __init__(self, case, cell: str):
        self.spec = dataclasses.replace(SPEC, cell=cell)
        self.weights = {k.split("/", 2)[2]: v for k, v in case.items() if k.startswith(f"{cell}/w/")}
        self.state = tuple(case[f"{cell}/state0/{n}"][None] for n in self.spec.state_names)

    def fresh(self):
        orc = oracle(self.spec, self.weights, SGD, B)
        orc.set_state(*self.state)
        return orc


def _check_state(got, key, orc, what):
    for name, exp in zip(orc.spec.state_names, orc.get_state()):
        assert_close(got[f"{key}/state/{name}"], exp[0], f"{what}: state {name}", rtol=5e-4, atol_scale=5e-5)


def _check_weights(got, key, orc, what):
    for k, exp in orc.get_weights().items():
        assert_close(got[f"{key}/w/{k}"], exp, f"{what}: weights {k}", rtol=5e-4, atol_scale=5e-5)


def _check_loop(got, ref: Oracle, windows, key: str) -> None:
    """``fwd``, ``grad`` and ``tob`` of one cell and loop against the oracle."""
    orc = ref.fresh()
    assert_close(got[f"{key}/fwd/logits"], orc.forward(windows[0]), f"{key}: logits")
    _check_state(got, f"{key}/fwd", orc, key)
    loss, grads = ref.fresh().gradients(windows[0])
    assert_close(got[f"{key}/grad/loss"], loss, f"{key}: loss")
    for k, g in grads.items():
        assert_close(got[f"{key}/grad/{k}"], g, f"{key}: grad {k}")
    orc = ref.fresh()
    losses = [orc.train_step(b) for b in windows]
    assert_close(got[f"{key}/tob/loss"], losses, f"{key}: train_on_batch losses")
    _check_weights(got, f"{key}/tob", orc, f"{key} train_on_batch")
    _check_state(got, f"{key}/tob", orc, f"{key} train_on_batch")


def _check_fit_and_save(got, ref: Oracle, windows, nxt, cell: str) -> None:
    """``fit`` equals the oracle's steps; the loaded model equals the saved one and the oracle on
    the next window (row 0 resets at column 0, row 2 mid-window, rows 1 and 3 carry)."""
    orc = ref.fresh()
    losses = [orc.train_step(b) for b in windows]
    assert_close(got[f"{cell}/fit/loss"], np.mean(losses), f"{cell}: fit's epoch loss")
    _check_weights(got, f"{cell}/fit", orc, f"{cell} fit")
    _check_state(got, f"{cell}/fit", orc, f"{cell} fit")
    assert str(got[f"{cell}/save/layer"]) == f"Reset{cell.upper()} stateful=True"
    assert bool(got[f"{cell}/save/same_variables"]), "load_model changed a variable (weights or carried state)"
    expected = orc.forward(Batch(nxt.x, nxt.x, np.ones((B, T), np.float32), nxt.reset))
    for name in ("saved", "loaded"):
        assert_close(got[f"{cell}/save/{name}/logits"], expected, f"{cell}: {name} model on the next window")
        _check_state(got, f"{cell}/save/{name}", orc, f"{cell} {name}")
    assert bool(got[f"{cell}/save/zero_after_reset_state"])


@pytest.mark.slow
@pytest.mark.parametrize("keras_backend", ["tensorflow", "jax", "torch"])
def test_layers_train_on_every_keras_backend(keras_backend, keras_worker):
    _require("keras", keras_backend)
    case, windows, nxt = _case()
    _, layer_exp = _layer_case()
    got = keras_worker(keras_backend)
    assert str(got["backend"]) == keras_backend
    for cell in CELLS:
        orc = Oracle(case, cell)
        for loop in LOOPS[keras_backend]:
            _check_loop(got, orc, windows, f"{cell}/{loop}")
        _check_fit_and_save(got, orc, windows, nxt, cell)
    # the layer alone, every loop, against the oracle; a stateful layer's two calls equal one
    for loop in LOOPS[keras_backend]:
        err = max(float(np.abs(got[f"layer/{loop}/{k}"] - e).max()) for k, e in layer_exp.items())
        assert err < 1e-5, f"KERAS_BACKEND={keras_backend}: ResetLSTM {loop} differs from the oracle by {err:.3g}"
    err = float(np.abs(got["layer/stateful/parts"] - got["layer/stateful/whole"]).max())
    assert err < 1e-5, f"KERAS_BACKEND={keras_backend}: two stateful calls differ from one by {err:.3g}"
    # backend=keras runs on TensorFlow only, and says so under another Keras backend
    adapter = str(got["adapter"])
    if keras_backend == "tensorflow":
        assert adapter == "imported", adapter
    else:
        assert adapter.startswith("ConfigError") and "KERAS_BACKEND" in adapter, adapter
