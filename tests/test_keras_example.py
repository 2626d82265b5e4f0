"""The README example: per-sample resets in a stateful Keras model trained with train_on_batch,
on each Keras backend (tensorflow, jax, torch), each in a fresh process (the Keras backend is fixed
at Keras's first import; the example's ``setdefault`` keeps the one the environment names): the
process of tests/keras_training_worker.py under that backend, where the example runs first, before
the worker's own checks (tests/test_keras_backends.py; the ``keras_worker`` fixture of
tests/conftest.py runs it once per backend for both modules).

What keras-team/keras#2750 asked for in 2016: a boolean vector per sample passed with each
``train_on_batch``, resetting only those rows (here also in the middle of a window, #11175).
Packed streams hold many sequences per row; each sequence starts from a zero state.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.helpers import REQUIRE_ALL

if importlib.util.find_spec("keras") is None:
    pytest.skip("the Keras example needs keras", allow_module_level=True)


def readme_example():
    """The README's Keras example, verbatim between the markers (tests/test_readme.py checks that
    the README holds this text); returns its losses. Runs in the child process only."""
    # --- README example start ---
    import os
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")   # before the first `import keras`
    import keras
    from resetbench.corpus import Corpus
    from resetbench.keras_layers import ResetLSTM
    from resetbench.layouts import Packed

    B, T = 16, 32                                           # 16 streams, windows of 32 steps
    ids = keras.Input(shape=(T,), batch_size=B, dtype="int32")
    resets = keras.Input(shape=(T,), batch_size=B, dtype="bool")   # True: zero this row's state
    h = keras.layers.Embedding(257, 32)(ids)
    h = ResetLSTM(128, stateful=True)(h, resets)            # [B, T, 128], state kept per row
    logits = keras.layers.Dense(257)(h)
    model = keras.Model([ids, resets], logits)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    words = [b"abc", b"hello", b"packed", b"streams", b"of", b"sequences"]   # your data: any bytes
    corpus = Corpus.from_sequences([b" ".join(words[k:] + words[:k]) * (1 + k % 3) for k in range(300)])
    losses = []
    for batch in Packed(batch_size=B, window=T, seed=0).epoch(corpus):   # consecutive windows
        # batch.reset is True at each sequence's first position, anywhere in the window
        loss = model.train_on_batch([batch.x, batch.reset], batch.y, sample_weight=batch.mask)
        losses.append(float(loss))
    # --- README example end ---
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("keras_backend", ["tensorflow", "jax", "torch"])
def test_readme_example_loss_drops(keras_backend, keras_worker):
    if importlib.util.find_spec(keras_backend) is None:
        if REQUIRE_ALL:
            pytest.fail(f"KERAS_BACKEND={keras_backend} needs {keras_backend} (RESETBENCH_REQUIRE_ALL=1)")
        pytest.skip(f"KERAS_BACKEND={keras_backend} needs {keras_backend}")
    res = keras_worker(keras_backend)           # the worker failing fails here with its stderr
    assert str(res["backend"]) == keras_backend
    losses = [float(v) for v in res["readme/losses"]]
    assert len(losses) >= 24, len(losses)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert np.isfinite(losses).all()
    assert last < first - 1.0, f"KERAS_BACKEND={keras_backend}: loss did not drop: first {first:.3f}, last {last:.3f}"
