"""The Keras adapter's kernel option: names, recorded kernel strings, option errors.

``kernel=reset`` (the default, exact) runs the shared suite in test_conformance.py; the baselines
(``native``, ``peer``: ``keras.layers.LSTM``) run test_baseline_kernels.py against the oracle.
"""

from __future__ import annotations

import pytest

from backends.base import ConfigError, ModelSpec, OptimizerSpec
from tests.helpers import make_backend, tiny_weights  # a missing TensorFlow skips (fails in CI)

SPEC = ModelSpec(embed=6, hidden=8, layers=2)
ADAM = OptimizerSpec("adam", lr=0.01, clip_norm=0.5)


def test_kernel_option_errors():
    w = tiny_weights(0, SPEC)
    with pytest.raises(ConfigError, match="allowed for backend=keras: reset, native, peer"):
        make_backend("keras", SPEC, w, ADAM, 2, kernel="fused")
    with pytest.raises(ConfigError, match="backend.loop"):
        make_backend("keras", SPEC, w, ADAM, 2, kernel="native", loop="tf_while")
    be = make_backend("keras", SPEC, w, ADAM, 2, kernel="native", jit_compile=False)
    assert be.kernel == "keras.tf_function.native.LSTM"


def test_gru_baselines_are_keras_gru():
    """With model.cell=gru the baselines run keras.layers.GRU (recorded as such), and the loop
    option is refused naming ResetGRU's loop and keras.layers.GRU."""
    spec = ModelSpec(embed=6, hidden=8, layers=2, cell="gru")
    w = tiny_weights(0, spec)
    with pytest.raises(ConfigError, match="ResetGRU's loop; kernel=native runs keras.layers.GRU's own loop"):
        make_backend("keras", spec, w, ADAM, 2, kernel="native", loop="tf_while")
    for kernel, name in (("native", "keras.tf_function.native.GRU"), ("peer", "keras.tf_function.peer.GRU_mask")):
        be = make_backend("keras", spec, w, ADAM, 2, kernel=kernel, jit_compile=False)
        assert be.kernel == name
        assert [type(rnn).__name__ for rnn in be.rnns] == ["GRU", "GRU"]
        assert all(rnn.cell.reset_after for rnn in be.rnns)
    assert make_backend("keras", spec, w, ADAM, 2, loop="tf_while").kernel == "keras.xla.tf_while"
