"""``python -m benchmarks.kernels``: FLOP arithmetic, derived ratios, argument errors, and a
quick end-to-end run of one backend (numbers are not checked: speed lives in the benchmark)."""

from __future__ import annotations

import csv
import os

import pytest

from benchmarks import kernels


def test_model_flops_counts_three_times_the_forward_gemms():
    # B=2, T=3, E=4, H=5, L=1, V=7: per token 2 * (4*20 + 5*20 + 5*7) = 430 FLOPs forward
    assert kernels.model_flops(2, 3, 4, 5, 1, 7) == 3 * 6 * 430
    # a second layer adds its input (H x 4H) and recurrent (H x 4H) GEMMs
    assert kernels.model_flops(1, 1, 4, 5, 2, 7) - kernels.model_flops(1, 1, 4, 5, 1, 7) == 3 * 2 * 2 * 5 * 20


def test_derive_ratios_against_native_and_best_peak():
    rows = [{"kind": "matmul", "backend": "a", "gemm": "square2048", "gflops": 100.0},
            {"kind": "matmul", "backend": "b", "gemm": "square2048", "gflops": 400.0},
            {"kind": "matmul", "backend": "b", "gemm": "recurrent_B1_T1_H1", "gflops": 50.0},
            {"kind": "kernel", "backend": "a", "kernel_option": "native", "B": 1, "T": 2, "H": 3,
             "tokens_per_s": 200.0, "model_gflops": 100.0},
            {"kind": "kernel", "backend": "a", "kernel_option": "fast", "B": 1, "T": 2, "H": 3,
             "tokens_per_s": 150.0, "model_gflops": 75.0},
            {"kind": "kernel", "backend": "a", "kernel_option": "fast", "B": 9, "T": 2, "H": 3,
             "tokens_per_s": 150.0, "model_gflops": 75.0}]
    ker, mm = kernels.derive(rows)
    fast = [r for r in ker if r["kernel_option"] == "fast"]
    assert fast[0]["reset_cost_ratio"] == pytest.approx(0.75)
    assert fast[0]["peak_fraction"] == pytest.approx(75.0 / 400.0)       # best peak of any framework
    assert fast[1]["reset_cost_ratio"] != fast[1]["reset_cost_ratio"]  # no native on that shape: NaN
    assert [r["peak_fraction"] for r in mm] == pytest.approx([0.25, 1.0, 0.125])


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
    got = {(r["kernel_option"], float(r["density"])) for r in rows}
    assert got == {("fused", 0.0), ("fused", 0.1), ("loop", 0.0), ("loop", 0.1), ("native", 0.0), ("peer", 0.0)}
    native = [r for r in rows if r["kernel_option"] == "native"][0]
    assert float(native["reset_cost_ratio"]) == pytest.approx(1.0)
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert os.path.getsize(tmp_path / "kernels.png") > 10_000
    assert (tmp_path / "matmul.csv").exists() and (tmp_path / "kernels_env.json").exists()
