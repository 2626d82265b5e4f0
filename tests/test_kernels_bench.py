"""``python -m benchmarks.kernels``: FLOP arithmetic, derived ratios (against the kernel with role
``native``), argument errors, defaults derived from the declarations, the figure for a backend
without a ``native`` kernel, a failed worker's exit, and a quick end-to-end run of one backend
(numbers are not checked: speed lives in the benchmark)."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest

from benchmarks import kernels, registry


def test_model_flops_counts_three_times_the_forward_gemms():
    # B=2, T=3, E=4, H=5, L=1, V=7: per token 2 * (4*20 + 5*20 + 5*7) = 430 FLOPs forward
    assert kernels.model_flops(2, 3, 4, 5, 1, 7) == 3 * 6 * 430
    # a second layer adds its input (H x 4H) and recurrent (H x 4H) GEMMs
    assert kernels.model_flops(1, 1, 4, 5, 2, 7) - kernels.model_flops(1, 1, 4, 5, 1, 7) == 3 * 2 * 2 * 5 * 20


def test_derive_ratios_against_native_and_best_peak():
    rows = [{"kind": "matmul", "backend": "a", "gemm": "square2048", "gflops": 100.0},
            {"kind": "matmul", "backend": "b", "gemm": "square2048", "gflops": 400.0},
            {"kind": "matmul", "backend": "b", "gemm": "recurrent_B1_T1_H1", "gflops": 50.0},
            {"kind": "kernel", "backend": "a", "kernel_option": "own", "kernel_role": "native", "B": 1, "T": 2,
             "H": 3, "density": 0.0, "tokens_per_s": 200.0, "model_gflops": 100.0},
            {"kind": "kernel", "backend": "a", "kernel_option": "fast", "kernel_role": "exact", "B": 1, "T": 2,
             "H": 3, "density": 0.1, "tokens_per_s": 150.0, "model_gflops": 75.0},
            {"kind": "kernel", "backend": "a", "kernel_option": "fast", "kernel_role": "exact", "B": 9, "T": 2,
             "H": 3, "density": 0.1, "tokens_per_s": 150.0, "model_gflops": 75.0},
            {"kind": "kernel", "backend": "b", "kernel_option": "native", "kernel_role": "exact", "B": 1, "T": 2,
             "H": 3, "density": 0.0, "tokens_per_s": 900.0, "model_gflops": 75.0}]
    ker, mm = kernels.derive(rows)
    fast = [r for r in ker if r["kernel_option"] == "fast"]
    assert fast[0]["reset_cost_ratio"] == pytest.approx(0.75)
    assert fast[0]["peak_fraction"] == pytest.approx(75.0 / 400.0)       # best peak of any framework
    assert fast[1]["reset_cost_ratio"] != fast[1]["reset_cost_ratio"]  # no native on that shape: NaN
    named = [r for r in ker if r["backend"] == "b"][0]                   # the role counts, not the name
    assert named["reset_cost_ratio"] != named["reset_cost_ratio"]
    assert [r["peak_fraction"] for r in mm] == pytest.approx([0.25, 1.0, 0.125])


def test_layer_flops_are_the_recurrent_gemms_alone():
    # B=2, T=3, E=4, H=5, L=1: per token 2 * (4*20 + 5*20) FLOPs forward, 3x with the backward
    assert kernels.layer_flops(2, 3, 4, 5, 1) == 3 * 6 * 2 * (4 * 20 + 5 * 20)
    assert kernels.model_flops(2, 3, 4, 5, 1, 7) - kernels.layer_flops(2, 3, 4, 5, 1) == 3 * 6 * 2 * 5 * 7


def test_layer_rows_are_compared_with_the_native_layer_rows():
    rows = [{"kind": "kernel", "backend": "a", "kernel_option": "own", "kernel_role": "native", "B": 1, "T": 2,
             "H": 3, "density": 0.0, "tokens_per_s": tps, "model_gflops": 1.0, "scope": scope}
            for scope, tps in (("step", 100.0), ("layer", 400.0))]
    rows += [{"kind": "kernel", "backend": "a", "kernel_option": "fast", "kernel_role": "exact", "B": 1, "T": 2,
              "H": 3, "density": 0.1, "tokens_per_s": 200.0, "model_gflops": 1.0, "scope": scope}
             for scope in ("step", "layer")]
    ker, _ = kernels.derive(rows)
    ratio = {r["scope"]: r["reset_cost_ratio"] for r in ker if r["kernel_option"] == "fast"}
    assert ratio == {"step": pytest.approx(2.0), "layer": pytest.approx(0.5)}


def test_random_batch_density():
    b = kernels.random_batch(64, 128, 0.03, seed=1)
    assert 0.02 < b.reset.mean() < 0.04
    fresh = kernels.random_batch(4, 8, 0.0)
    assert fresh.reset[:, 0].all() and not fresh.reset[:, 1:].any()


@pytest.mark.parametrize("args, message", [
    (["--shapes", "32x64"], "BxTxH"),
    (["--densities", "0,1.5"], "[0, 1)"),
    (["--backends", "nosuch"], "not a backend"),
    (["--kernels", "torch:nosuch", "--backends", "torch"], "not a kernel"),
])
def test_bad_arguments_are_one_line_errors(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace(")", r"\)")):
        kernels.main(args + ["--out", str(tmp_path), "--figures", ""])


@pytest.mark.slow
def test_quick_run_writes_the_tables_and_figure(tmp_path):
    import importlib.util
    if importlib.util.find_spec("torch") is None:     # the benchmark imports it in its own worker
        pytest.skip("torch not installed")
    pytest.importorskip("matplotlib")
    kernels.main(["--quick", "--backends", "torch", "--out", str(tmp_path), "--figures", str(tmp_path)])
    with open(tmp_path / "kernels.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = {(r["kernel_option"], r["kernel_role"], float(r["density"]), r["scope"]) for r in rows}
    # every torch kernel but the slow-to-build ones; those with layout needs at density 0 only;
    # each as a full train step and as the layers alone (torch offers layer_timer)
    decls = registry.kernel_decls(registry.backend_configs()["torch"]).values()
    expected = {(d.name, d.role, density, scope) for d in decls if not d.slow_to_build
                for density in ((0.0,) if d.needs else (0.0, 0.1)) for scope in ("step", "layer")}
    assert got == expected
    for native in [r for r in rows if r["kernel_role"] == "native"]:
        assert float(native["reset_cost_ratio"]) == pytest.approx(1.0)      # each scope over its own native
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert os.path.getsize(tmp_path / "kernels.png") > 10_000
    assert (tmp_path / "matmul.csv").exists() and (tmp_path / "kernels_env.json").exists()


def test_defaults_derive_from_the_declarations():
    """Default backends: every registered one without ``oracle: true``; default kernels: every
    declared one that is not ``slow_to_build``; ``--kernels`` restricts."""
    configs = registry.backend_configs()
    args = kernels.parse_args([])
    assert args.backends == [b for b in sorted(configs) if not configs[b].get("oracle")]
    assert "numpy" in configs and "numpy" not in args.backends
    for b in args.backends:
        decls = configs[b]["kernels"]
        assert kernels._kernels_for(b, []) == [k for k, d in decls.items() if not d.get("slow_to_build")]
    slow = [(b, k) for b in args.backends for k, d in configs[b]["kernels"].items() if d.get("slow_to_build")]
    for b, k in slow:
        assert k not in kernels._kernels_for(b, []) and kernels._kernels_for(b, [f"{b}:{k}"]) == [k]


def _fake_rows(backend, kernel_roles, densities=(0.0, 0.1)):
    """Kernel rows as a worker emits them (before derive), and one square matmul row."""
    rows = [{"kind": "matmul", "backend": backend, "matmul_by": "numpy", "gemm": "square2048", "m": 1, "k": 1,
             "n": 1, "gflops": 50.0}]
    for kernel, role in kernel_roles.items():
        for d in (densities if role == "exact" else (0.0,)):
            rows.append({"kind": "kernel", "backend": backend, "kernel_option": kernel, "kernel_role": role,
                         "kernel": f"{backend}.{kernel}", "device": "cpu", "B": 4, "T": 8, "E": 64, "H": 16,
                         "density": d, "tokens_per_s": 1000.0 * (1 - d), "model_gflops": 1.0 - d})
    return rows


def test_figure_shows_a_backend_without_a_native_kernel(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    ker, mm = kernels.derive(_fake_rows("withnative", {"fast": "exact", "own": "native"})
                             + _fake_rows("solo", {"alone": "exact"}))
    plots.kernels_figure(ker, mm, str(tmp_path / "k.png"))
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in drawn[0].axes}
    ratio = next(labels for title, labels in panels.items() if "Cost of per-sample resets" in title)
    absolute = next(labels for title, labels in panels.items() if "without a native kernel" in title)
    assert any("withnative.fast" in label for label in ratio) and not any("solo" in label for label in ratio)
    assert any("solo.alone" in label for label in absolute)
    # only backends without a native kernel: no ratio panel, no NoData
    ker, mm = kernels.derive(_fake_rows("solo", {"alone": "exact"}))
    plots.kernels_figure(ker, mm, str(tmp_path / "solo.png"))
    assert not any("Cost of per-sample resets" in ax.get_title() for ax in drawn[1].axes)
    plots.plt.close("all")


@pytest.mark.parametrize("code, message", [(3, "backend jax failed (exit 3)"),
                                           (0, "backend jax left no rows for kernel {kernels} (exit 0)")])
def test_a_failed_worker_exits_non_zero_after_writing_the_rest(tmp_path, monkeypatch, capsys, code, message):
    """No worker process starts (subprocess.run is replaced): torch's worker delivers, jax's exits
    with ``code`` and no kernel rows."""
    failing = "jax"

    def fake_run(cmd, **kw):
        backend = cmd[cmd.index("--worker") + 1]
        picked = [k.split(":", 1)[1] for k in cmd[cmd.index("--kernels") + 1].split(",")]
        if backend == failing:
            rows, rc = _fake_rows(backend, {})[:1], code          # a matmul row, no kernel rows
        else:
            rows, rc = _fake_rows(backend, {k: "exact" for k in picked}), 0
        out = "".join(f"ROW {json.dumps(r)}\n" for r in rows)
        return subprocess.CompletedProcess(cmd, rc, stdout=out, stderr="Traceback ...\nRuntimeError: boom\n")

    monkeypatch.setattr(kernels.subprocess, "run", fake_run)
    with pytest.raises(SystemExit) as exc:
        kernels.main(["--quick", "--backends", f"torch,{failing}", "--out", str(tmp_path), "--figures", ""])
    message = message.format(kernels=", ".join(kernels._kernels_for(failing, [])))
    assert str(exc.value).startswith("error: kernel benchmark: ") and message in str(exc.value)
    assert "\n" not in str(exc.value) and "torch" not in str(exc.value)
    with open(tmp_path / "kernels.csv") as fh:
        assert {r["backend"] for r in csv.DictReader(fh)} == {"torch"}      # what did succeed is written
    assert "boom" in capsys.readouterr().out                                 # the worker's own error shown


def test_figure_has_a_layer_panel_when_layer_rows_exist(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from benchmarks import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    step = _fake_rows("a", {"fast": "exact", "own": "native"})
    layer = [dict(r, scope="layer", tokens_per_s=r["tokens_per_s"] * 2) for r in step if r["kind"] == "kernel"]
    ker, mm = kernels.derive(step + layer)
    plots.kernels_figure(ker, mm, str(tmp_path / "k.png"))
    titles = [ax.get_title() for ax in drawn[0].axes]
    assert any("layers alone" in t for t in titles) and any("full train step" in t for t in titles)
    ker, mm = kernels.derive(step)                                   # tables without layer rows
    plots.kernels_figure(ker, mm, str(tmp_path / "k2.png"))
    assert not any("layers alone" in ax.get_title() for ax in drawn[1].axes)
    plots.plt.close("all")
