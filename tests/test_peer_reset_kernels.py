"""Kernels with role ``peer_reset`` (other libraries' per-sample-reset layers: TorchRL's
``LSTMModule``/``GRUModule``, Haiku's ``ResetCore(LSTM)``): their declarations and ``requires``
(a kernel whose packages are missing is refused or skipped with one line), the kernel benchmark's
skip note, and, where the package is installed, that the weight loading is what makes them exact
(without Haiku's forget-bias correction the layer no longer matches the oracle). Their oracle
parity on every layout is tests/test_conformance.py's (they are among its variants)."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import numpy as np
import pytest

from backends.base import ConfigError, ModelSpec, OptimizerSpec, init_weights
from benchmarks import kernels, registry
from tests.helpers import backend_variants, mid_reset_batches, oracle, random_state

SGD = OptimizerSpec("sgd", lr=0.5)
PEERS = {("torch", "torchrl"): ("torchrl", "tensordict"), ("jax", "haiku"): ("haiku",)}


def test_peer_reset_kernels_are_declared_with_their_packages():
    for (backend, kernel), modules in PEERS.items():
        decl = registry.kernel_decl(registry.backend_configs()[backend], kernel)
        assert decl.role == "peer_reset" and decl.requires == modules and not decl.needs
        assert "lstm" in decl.cells
        # trains only: evaluation runs the backend's default (exact) kernel
        cfg = registry.backend_configs()[backend]
        assert registry.kernel_facts(cfg, kernel)["eval_kernel"] == registry.default_kernel(cfg)
    assert "peer_reset" in registry.ROLES
    assert {v.rsplit(":", 1)[0] for v in backend_variants()} >= {f"{b}:{k}" for b, k in PEERS}


FAKE = {"name": "fake", "_target_": "no.such.Adapter", "requires": [], "kernel": "own",
        "kernels": {"own": {"role": "exact", "cells": ["lstm"]},
                    "other": {"role": "peer_reset", "cells": ["lstm"], "requires": ["no_such_module_xyz"]}}}


def test_a_kernel_without_its_package_is_refused_in_one_line():
    spec = ModelSpec(4, 4, 1)
    with pytest.raises(ConfigError) as exc:
        registry.build_backend(FAKE, spec, init_weights(spec, 0), SGD, 2, kernel="other")
    assert str(exc.value) == ("backend.kernel='other': needs no_such_module_xyz, not installed: "
                              "pip install -e '.[peers]'")
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        registry.check_installed({**FAKE, "kernel": "other"})
    assert registry.kernel_missing(FAKE, "own") == [] and registry.kernel_missing_reason(FAKE, "own") == ""


@pytest.mark.parametrize("requires", ["haiku", [1], [""]])
def test_requires_must_be_a_list_of_module_names(requires):
    bad = {**FAKE, "kernels": {"own": {"role": "exact", "cells": ["lstm"], "requires": requires}}}
    with pytest.raises(ValueError, match="requires must be a list of module names"):
        registry.kernel_decls(bad)


def test_the_benchmark_skips_a_kernel_whose_package_is_missing(tmp_path, monkeypatch, capsys):
    """No worker starts (subprocess.run replaced); torchrl's packages are made to look missing."""
    seen, real_run = [], subprocess.run

    def fake_run(cmd, **kw):
        if "--worker" not in cmd:                                  # e.g. platform's uname
            return real_run(cmd, **kw)
        picked = [k.split(":", 1)[1] for k in cmd[cmd.index("--kernels") + 1].split(",")]
        seen.extend(picked)
        rows = [{"kind": "kernel", "backend": "torch", "cell": "lstm", "kernel_option": k, "kernel_role": "exact",
                 "kernel": k, "scope": "step", "B": 8, "T": 16, "H": 32, "density": 0.0, "tokens_per_s": 1.0,
                 "model_gflops": 1.0} for k in picked]
        return subprocess.CompletedProcess(cmd, 0, stdout="".join(f"ROW {json.dumps(r)}\n" for r in rows), stderr="")

    real = registry.kernel_missing
    monkeypatch.setattr(registry, "kernel_missing",
                        lambda cfg, k: ["torchrl"] if k == "torchrl" else real(cfg, k))
    monkeypatch.setattr(kernels.subprocess, "run", fake_run)
    kernels.main(["--quick", "--backends", "torch", "--kernels", "torch:torchrl,torch:loop",
                  "--out", str(tmp_path), "--figures", ""])
    assert seen == ["loop"]
    assert "[torch] skipped kernel torchrl: needs torchrl, not installed: pip install -e '.[peers]'" \
        in capsys.readouterr().out


def test_figure_draws_peer_reset_rows_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    rows = [{"kind": "matmul", "backend": "a", "gemm": "square2048", "gflops": 100.0}]
    for kernel, role, densities in (("own", "native", (0.0,)), ("fast", "exact", (0.0, 0.03)),
                                    ("lib", "peer_reset", (0.0, 0.03))):
        rows += [{"kind": "kernel", "backend": "a", "cell": "lstm", "kernel_option": kernel, "kernel_role": role,
                  "kernel": f"a.{kernel}", "scope": "step", "B": 1, "T": 2, "H": 3, "density": d,
                  "tokens_per_s": 100.0, "model_gflops": 1.0} for d in densities]
    ker, mm = kernels.derive(rows)
    plots.kernels_figure(ker, mm, str(tmp_path / "k.png"))
    ratio, peak = drawn[0].axes[0], drawn[0].axes[-1]
    lines = {line.get_label(): line for line in ratio.get_lines()}
    assert "peer_reset: a.lib LSTM B1 T2 H3" in lines and "a.fast LSTM B1 T2 H3" in lines
    assert lines["peer_reset: a.lib LSTM B1 T2 H3"].get_marker() != lines["a.fast LSTM B1 T2 H3"].get_marker()
    labels = [t.get_text() for t in peak.get_yticklabels()]
    assert "peer_reset: a.lib LSTM (3% resets) B1 T2 H3" in labels          # not a no-reset baseline
    assert not any("a.lib" in t and "no resets" in t for t in labels)
    plots.plt.close("all")


@pytest.mark.framework("jax")
def test_haiku_is_exact_only_with_the_forget_bias_correction():
    """Haiku's LSTM adds 1 to the forget gate: loading the canonical bias as it is (no correction)
    moves the outputs away from the oracle's, the corrected load matches it."""
    pytest.importorskip("haiku")
    import jax.numpy as jnp

    from backends.haiku_peer import haiku_layers
    spec = ModelSpec(6, 8, 2)
    w = init_weights(spec, 0)
    batch = mid_reset_batches(3, B=4, T=9)[0]
    state = random_state(4, spec, 4)
    orc = oracle(spec, w, SGD, 4)
    orc.set_state(*state)
    orc.forward(batch)
    expected = orc.get_state()                                     # each layer's final (h, c)
    params = {k: jnp.asarray(v) for k, v in w.items()}
    inp = jnp.asarray(w["embedding"])[batch.x.T]
    errors = {}
    for bias in (1.0, 0.0):
        _, finals = haiku_layers(params, tuple(jnp.asarray(s) for s in state), inp, jnp.asarray(batch.reset), None,
                                 spec.layers, 1, "lstm", forget_bias=bias)
        got = [np.stack([np.asarray(f[i]) for f in finals]) for i in range(2)]
        errors[bias] = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    assert errors[1.0] < 1e-5 and errors[0.0] > 1e-3, errors


@pytest.mark.framework("torch")
def test_torchrl_gets_the_reset_from_is_init():
    """Without ``is_init`` TorchRL carries the state through the reset: the layer moves away from
    the oracle (so the parity in test_conformance.py rests on TorchRL honouring is_init)."""
    pytest.importorskip("torchrl")
    import torch

    from backends.torchrl_peer import layers_torchrl
    spec = dataclasses.replace(ModelSpec(6, 8, 1), cell="lstm")
    w = init_weights(spec, 0)
    batch = mid_reset_batches(5, B=4, T=9)[0]
    assert batch.reset[:, 1:].any()
    state = random_state(6, spec, 4)
    orc = oracle(spec, w, SGD, 4)
    orc.set_state(*state)
    orc.forward(batch)
    layers = [{k.split(".")[-1]: torch.tensor(v) for k, v in w.items() if k.startswith("lstm.0.")}]
    inp = torch.tensor(w["embedding"])[torch.from_numpy(batch.x).long()]
    errors = {}
    for name, reset in (("is_init", batch.reset), ("none", np.zeros_like(batch.reset))):
        _, final = layers_torchrl("lstm", inp, reset, tuple(torch.tensor(s) for s in state), layers)
        errors[name] = max(float(np.abs(f.numpy() - e).max()) for f, e in zip(final, orc.get_state()))
    assert errors["is_init"] < 1e-5 and errors["none"] > 1e-3, errors
