"""The collector (benchmarks/results.py) on fabricated run directories: completed, interrupted,
malformed and summary-less runs are all rows, marked, and the broken ones are named in problems.

``fabricate_run`` / ``fabricate_study`` build results trees shaped like real Hydra sweeps; the plot
and notebook tests reuse them."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest

pd = pytest.importorskip("pandas")    # the analysis extra: pip install -e '.[analysis]'

from benchmarks import registry, results
from benchmarks.targets import AXES, time_to_targets  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_COLUMNS = ("step", "epoch", "loss", "valid_tokens", "total_slots", "step_time_s", "elapsed_s", "timed")
EVAL_COLUMNS = ("step", "valid_tokens_seen", "elapsed_s", "eval_loss", "eval_tokens", "eval_time_s")
PAD = {"padded": 0.35, "reset_all": 0.45, "packed": 0.01}
RATE = {"torch": 10000.0, "jax": 14000.0, "keras": 12000.0}


def fabricate_run(run_dir, *, experiment="compare", backend="torch", strategy="packed", seed=0,
                  window=64, sigma=None, data="kjv", steps=12, status="completed", rate=None,
                  pad=None, summary=True, hydra=True, eval_every=4, torn_last_line=False, lr=0.002,
                  heldout=None, targets=(), unit=None, cell="lstm"):
    """One run directory as the harness writes it (summary.json with a nested config, steps.csv,
    evals.csv, .hydra/config.yaml). Returns the summary dict (None when ``summary`` is False)."""
    os.makedirs(run_dir, exist_ok=True)
    pad = PAD[strategy] if pad is None else pad
    rate = (rate or RATE.get(backend, 9000.0)) * (1 - pad) / (1 - PAD["packed"]) * (1 + 0.03 * seed)
    B = 4
    slots = B * (window if strategy != "padded" else 96)
    valid = int(round(slots * (1 - pad)))
    length = {"dist": "lognormal", "median": 48, "sigma": sigma} if sigma is not None else None
    config = {"backend": {"name": backend, "_target_": f"backends.{backend}_lstm.X", "requires": [backend]},
              "strategy": {"name": strategy, **({"pad_multiple": 16} if strategy == "padded" else {})},
              "data": {"name": data, **({"length": length} if length else {}),
                       **({"heldout": heldout} if heldout else {}), **({"unit": unit} if unit else {})},
              "model": {"embed": 4, "hidden": 8, "layers": 1, "init": None, "cell": cell},
              "train": {"batch_size": B, "window": window, "seed": seed, "steps": None, "max_valid_tokens": 1000},
              "eval": {"every_steps": eval_every, "targets": list(targets)}, "device": "auto",
              "experiment": experiment}
    if hydra:
        os.makedirs(os.path.join(run_dir, ".hydra"), exist_ok=True)
        import yaml
        with open(os.path.join(run_dir, ".hydra", "config.yaml"), "w") as fh:
            yaml.safe_dump(config, fh)
        with open(os.path.join(run_dir, ".hydra", "overrides.yaml"), "w") as fh:
            yaml.safe_dump([f"backend={backend}", f"strategy={strategy}", f"train.seed={seed}"], fh)
    elapsed = 0.0
    loss0 = 5.5 - 0.1 * (strategy == "packed") + 0.01 * seed + 0.02 * math.log2(window / 64 if window else 1)
    with open(os.path.join(run_dir, "steps.csv"), "w", newline="") as fs, \
            open(os.path.join(run_dir, "evals.csv"), "w", newline="") as fe:
        ws, we = csv.writer(fs), csv.writer(fe)
        ws.writerow(STEP_COLUMNS)
        we.writerow(EVAL_COLUMNS)
        history = []
        for k in range(1, steps + 1):
            dt = valid / rate
            elapsed += dt
            loss = loss0 - 0.08 * k
            ws.writerow((k, 0, f"{loss:.4f}", valid, slots, f"{dt:.6f}", f"{elapsed:.6f}", int(k > 1)))
            if k % eval_every == 0 or (k == steps and status == "completed"):
                we.writerow((k, k * valid, f"{elapsed:.6f}", f"{loss + 0.05:.4f}", 997, "0.01"))
                history.append({"train_s": elapsed, "tokens": k * valid, "steps": k, "eval_loss": loss + 0.05})
        if torn_last_line:
            fs.write(f"{steps + 1},0,4.1")      # a write cut off mid-line
    if not summary:
        return None
    s = {"status": status, "backend": backend, "strategy": strategy, "data": data, "seed": seed,
         "batch_size": B, "window": window, "hidden": 8, "cell": cell, "kernel": f"{backend}.loop", "device": "cpu",
         "steps": steps, "valid_tokens": steps * valid, "total_slots": steps * slots,
         "pad_fraction": 1 - valid / slots, "valid_tokens_per_s": rate, "train_time_s": elapsed,
         "compile_time_s": 0.1, "train_loss_last": loss0 - 0.08 * steps,
         "eval_loss": (loss0 - 0.08 * steps + 0.05) if status == "completed" else None,
         "eval_tokens": 997 if status == "completed" else None,
         "data_hash": f"hash-{data}-{sigma}", "host_cpu": "Fake CPU", "host_cores": 2,
         "host_memory_bytes": 8 << 30, "platform": "Linux-test", "python_version": "3.11.0",
         "numpy_version": "2.0.0", f"{backend}_version": "1.0", "framework_version": "1.0",
         "peak_mem_bytes": 1 << 28, "stop_reason": "token_budget" if status == "completed" else status,
         "lr": lr, "targets": list(targets), "config": config}
    for t, hit in time_to_targets(history, targets).items():
        s.update({f"ttt_{a}@{t}": (hit or {}).get(a) for a in AXES})
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump(s, fh)
    return s


def _sweep(root, name):
    path = os.path.join(root, f"{name}_2026-01-02_03-04-05")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "multirun.yaml"), "w") as fh:
        fh.write("hydra: {}\n")
    return path


def study_shapes(backends):
    """(experiment, backends, data unit, cell) of every study plan of conf/study/ (not the debug
    twins): fabricated study runs take their names and shapes from the plans, as real ones do."""
    out = []
    for name in registry.study_plans():
        plan = registry.group_config("study", name)
        exp = registry.group_config("experiment", plan["experiment"])
        units = tuple(b for b in backends if b in plan["backends"]) or tuple(backends[:1])
        out.append((plan["experiment"], units, (exp.get("data") or {}).get("unit"),
                    (exp.get("model") or {}).get("cell") or registry.default_cell()))
    return out


def fabricate_study(root, backends=("torch", "jax", "keras"), seeds=(0, 1)):
    """A results tree with the experiments (compare, compare_gru, waste, window, the studies and
    window_chapters), all runs completed.
    Returns the number of runs per experiment."""
    counts = {}
    sweep, n = _sweep(root, "compare"), 0
    for backend in backends:
        for strategy in ("padded", "reset_all", "packed"):
            for seed in seeds:
                fabricate_run(os.path.join(sweep, f"{n}_{backend}_{strategy}_kjv_s{seed}"), backend=backend,
                              strategy=strategy, seed=seed)
                n += 1
    counts["compare"] = n
    sweep, n = _sweep(root, "compare_gru"), 0
    for strategy in ("padded", "packed"):
        for seed in seeds:
            fabricate_run(os.path.join(sweep, f"{n}_torch_{strategy}_kjv_s{seed}"), experiment="compare_gru",
                          strategy=strategy, seed=seed, cell="gru")
            n += 1
    counts["compare_gru"] = n
    sweep, n = _sweep(root, "waste"), 0
    for strategy in ("padded", "reset_all", "packed"):
        for sigma, pad in ((0.05, 0.2), (0.3, 0.45), (0.7, 0.7), (1.5, 0.85)):
            fabricate_run(os.path.join(sweep, f"{n}_torch_{strategy}_sigma{sigma}_s0"), experiment="waste",
                          strategy=strategy, sigma=sigma, data="synthetic",
                          pad=0.01 if strategy == "packed" else pad + 0.05 * (strategy == "reset_all"))
            n += 1
    counts["waste"] = n
    sweep, n = _sweep(root, "window"), 0
    for window in (16, 32, 64, 128, 256):
        fabricate_run(os.path.join(sweep, f"{n}_torch_packed_T{window}_s0"), experiment="window", window=window)
        n += 1
    counts["window"] = n
    for study, units, unit, cell in study_shapes(backends):
        sweep, n = _sweep(root, study), 0
        for backend in units:
            for strategy in ("padded", "packed"):
                for seed in seeds:
                    fabricate_run(os.path.join(sweep, f"{n}_{backend}_{strategy}_s{seed}"), experiment=study,
                                  backend=backend, strategy=strategy, seed=seed, heldout="eval",
                                  targets=(5.0, 4.9), unit=unit, cell=cell)
                    n += 1
        counts[study] = n
    sweep, n = _sweep(root, "window_chapters"), 0
    for window in (32, 112):
        fabricate_run(os.path.join(sweep, f"{n}_torch_packed_T{window}_s0"), experiment="window_chapters",
                      window=window, unit="chapter")
        n += 1
    counts["window_chapters"] = n
    return counts


def fabricate_lengths():
    import numpy as np
    rng = np.random.default_rng(0)
    parts = [results.length_histogram(rng.integers(12, 530, 500), "kjv", data="kjv", sigma=float("nan"))]
    for sigma in (0.05, 1.5):
        lens = np.clip(np.round(rng.lognormal(np.log(49), sigma, 500)), 2, 1025).astype(int)
        parts.append(results.length_histogram(lens, f"synthetic sigma={sigma}", data="synthetic", sigma=sigma))
    return pd.concat(parts, ignore_index=True)


def fabricate_kernel_rows():
    """Kernel-benchmark rows (as ``python -m benchmarks.kernels`` derives them): kernels, matmul."""
    from benchmarks import kernels

    rows = [{"kind": "matmul", "backend": b, "gemm": "square2048", "m": 2048, "k": 2048, "n": 2048, "gflops": g}
            for b, g in (("torch", 200.0), ("jax", 400.0))]
    for b, exact in (("torch", "fused"), ("jax", "scan")):
        for kernel, densities in ((exact, (0.0, 0.03, 0.3)), ("native", (0.0,)), ("peer", (0.0,))):
            for d in densities:
                rate = 1000.0 * (1 - d) * (0.8 if kernel == "peer" else 1.0)
                rows.append({"kind": "kernel", "backend": b, "kernel_option": kernel, "kernel": f"{b}.{kernel}",
                             "kernel_role": kernel if kernel in ("native", "peer") else "exact",
                             "B": 32, "T": 64, "E": 64, "H": 256, "density": d, "tokens_per_s": rate,
                             "model_gflops": rate * kernels.model_flops(1, 1, 64, 256, 1) / 1e9})
    return kernels.derive(rows)


def fabricate_tables(folder, root):
    """The committed-table layout (runs/steps/evals/lengths/kernels/matmul.csv, environment.json)
    from a fabricated study under ``root``, written into ``folder``."""
    from benchmarks import kernels

    fabricate_study(root)
    runs, steps, evals, problems = results.collect(root, warn=False)
    assert not problems, problems
    results.write_tables(runs, steps, evals, folder, steps_every=2, lengths=fabricate_lengths())
    ker, mm = fabricate_kernel_rows()
    kernels.write_csv(os.path.join(folder, "kernels.csv"), ker)
    kernels.write_csv(os.path.join(folder, "matmul.csv"), mm)
    return folder


# --------------------------------------------------------------------------- the collector
@pytest.fixture
def tree(tmp_path):
    sweep = _sweep(str(tmp_path), "compare")
    fabricate_run(os.path.join(sweep, "0_torch_packed_kjv_s0"), steps=12)
    fabricate_run(os.path.join(sweep, "1_torch_padded_kjv_s0"), strategy="padded", steps=7,
                  status="interrupted", torn_last_line=True)
    bad = os.path.join(sweep, "2_jax_packed_kjv_s0")
    fabricate_run(bad, backend="jax", steps=5)
    with open(os.path.join(bad, "summary.json"), "w") as fh:
        fh.write('{"status": "completed", "backend": "ja')            # cut off mid-write
    fabricate_run(os.path.join(sweep, "3_keras_reset_all_kjv_s0"), backend="keras", strategy="reset_all",
                  steps=4, summary=False)                              # died before its first summary
    bare = os.path.join(str(tmp_path), "loose", "steps_only")
    fabricate_run(bare, steps=3, summary=False, hydra=False)
    fabricate_run(os.path.join(sweep, "4_torch_reset_all_kjv_s1"), strategy="reset_all", seed=1,
                  status="diverged", steps=3)
    return tmp_path


def test_every_run_is_a_row_and_marked(tree, capsys):
    runs, steps, evals, problems = results.collect(str(tree))
    by = runs.set_index("run_dir")
    assert len(runs) == 6, runs["run_dir"].tolist()
    sweep = "compare_2026-01-02_03-04-05"
    ok = by.loc[f"{sweep}/0_torch_packed_kjv_s0"]
    assert ok["status"] == "completed" and bool(ok["complete"]) and ok["experiment"] == "compare"
    assert ok["sweep"] == sweep and ok["backend"] == "torch" and ok["strategy"] == "packed"
    assert ok["model.hidden"] == 8 and ok["train.window"] == 64 and ok["data.name"] == "kjv"
    assert ok["config.device"] == "auto" and ok["device"] == "cpu"      # requested vs actual
    assert ok["valid_tokens_per_s"] > 0 and ok["eval_loss"] == pytest.approx(5.4 - 0.96 + 0.05)
    assert ok["host_cpu"] == "Fake CPU" and "backend=torch" in ok["overrides"]
    assert pd.isna(ok["problem"])

    stopped = by.loc[f"{sweep}/1_torch_padded_kjv_s0"]
    assert stopped["status"] == "interrupted" and not bool(stopped["complete"])
    assert by.loc[f"{sweep}/4_torch_reset_all_kjv_s1"]["status"] == "diverged"

    broken = by.loc[f"{sweep}/2_jax_packed_kjv_s0"]
    assert broken["status"] == "malformed" and not bool(broken["complete"])
    assert broken["backend"] == "jax" and broken["strategy"] == "packed"   # from .hydra/config.yaml
    assert broken["steps"] == 5 and broken["valid_tokens"] > 0             # from steps.csv
    assert "summary.json unreadable" in broken["problem"]

    nosum = by.loc[f"{sweep}/3_keras_reset_all_kjv_s0"]
    assert nosum["status"] == "malformed" and nosum["backend"] == "keras" and nosum["steps"] == 4
    loose = by.loc["loose/steps_only"]
    assert loose["status"] == "malformed" and loose["experiment"] == "single" and loose["steps"] == 3

    assert len(problems) == 3
    for name in ("2_jax_packed_kjv_s0", "3_keras_reset_all_kjv_s0", "loose/steps_only"):
        assert sum(name in p for p in problems) == 1, (name, problems)
    assert all(not p.startswith(f"{sweep}/0_") for p in problems)
    err = capsys.readouterr().err
    assert err.count("warning:") == 3 and "2_jax_packed_kjv_s0" in err


def test_steps_and_evals_are_long_tables_with_run_keys(tree):
    runs, steps, evals, _ = results.collect(str(tree), warn=False)
    for df in (steps, evals):
        assert set(results.KEYS) <= set(df.columns)
    per_run = steps.groupby("run_dir").size()
    sweep = "compare_2026-01-02_03-04-05"
    assert per_run[f"{sweep}/0_torch_packed_kjv_s0"] == 12
    assert per_run[f"{sweep}/1_torch_padded_kjv_s0"] == 7      # the torn 8th line is dropped
    assert per_run["loose/steps_only"] == 3
    s = steps[steps["run_dir"] == f"{sweep}/0_torch_packed_kjv_s0"]
    assert (s["status"] == "completed").all() and (s["strategy"] == "packed").all()
    assert s["valid_tokens_seen"].iloc[-1] == runs.set_index("run_dir").loc[s["run_dir"].iloc[0], "valid_tokens"]
    e = evals[evals["run_dir"] == f"{sweep}/0_torch_packed_kjv_s0"]
    assert e["step"].tolist() == [4, 8, 12] and e["eval_loss"].is_monotonic_decreasing


def test_empty_root(tmp_path):
    runs, steps, evals, problems = results.collect(str(tmp_path))
    assert len(runs) == len(steps) == len(evals) == 0 and problems == []


def test_experiment_name_comes_from_the_sweep_dir_without_config(tmp_path):
    sweep = _sweep(str(tmp_path), "waste")
    run = os.path.join(sweep, "0_torch_padded_synthetic_s0")
    fabricate_run(run, experiment=None, strategy="padded")
    summary = json.load(open(os.path.join(run, "summary.json")))
    summary["config"].pop("experiment")
    json.dump(summary, open(os.path.join(run, "summary.json"), "w"))
    runs, *_ = results.collect(str(tmp_path), warn=False)
    assert runs["experiment"].tolist() == ["waste"]
    assert results.experiment_from_sweep("compare_debug_2026-11-29_17-07-46") == "compare_debug"


def test_downsample_keeps_first_and_last(tree):
    _, steps, _, _ = results.collect(str(tree), warn=False)
    small = results.downsample_steps(steps, 5)
    s = small[small["run_dir"].str.endswith("0_torch_packed_kjv_s0")]["step"].tolist()
    assert s == [1, 5, 10, 12]


def test_cli_writes_tables(tree, tmp_path):
    out = tmp_path / "tables"
    r = subprocess.run([sys.executable, "-m", "benchmarks.results", str(tree), "--out", str(out),
                        "--steps-every", "2", "--no-lengths"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "6 runs" in r.stdout and "3 problem(s)" in r.stdout
    assert r.stderr.count("warning:") == 3
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 and set(runs["status"]) == {"completed", "interrupted", "diverged", "malformed"}
    assert len(pd.read_csv(out / "steps.csv")) < 12 + 8 + 5 + 4 + 3 + 3
    assert len(pd.read_csv(out / "evals.csv")) > 0
    env = json.loads((out / "environment.json").read_text())
    assert env["runs"] == 6 and env["machines"][0]["host_cpu"] == "Fake CPU"
    assert env["versions"]["python"] == ["3.11.0"] and "torch" in env["versions"]
    assert not (out / "lengths.csv").exists()


def test_cli_latest_and_missing_root(tmp_path):
    for stamp in ("2026-01-01_00-00-00", "2026-02-01_00-00-00"):
        sweep = tmp_path / f"compare_{stamp}"
        fabricate_run(str(sweep / "0_torch_packed_kjv_s0"))
        (sweep / "multirun.yaml").write_text("{}\n")
    runs, *_ = results.collect(str(tmp_path), warn=False)
    latest = results.latest_sweeps(runs)
    assert len(runs) == 2 and latest["sweep"].tolist() == ["compare_2026-02-01_00-00-00"]
    r = subprocess.run([sys.executable, "-m", "benchmarks.results", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_length_tables_are_small_bin_counts():
    lengths = results.length_tables()
    kjv = lengths[lengths["dataset"] == "kjv"]
    from benchmarks.data import KJV
    assert kjv["count"].sum() == KJV.SIZES[("verse", "train")][0] and (kjv["bin_hi"] - kjv["bin_lo"] == 8).all()
    synth = lengths[lengths["data"] == "synthetic"]
    assert sorted(synth["sigma"].unique()) == [0.05, 0.3, 0.7, 1.5]    # the waste sweep's sigmas
    assert (synth.groupby("dataset")["count"].sum() == 4000).all()
    assert len(lengths) < 1000


def test_published_experiments_are_the_conf_files_without_debug_twins():
    from benchmarks.registry import group_options
    from benchmarks.results import published_experiments
    pub = published_experiments()
    assert "compare" in pub and not any(e.endswith("_debug") for e in pub)
    assert sorted(pub + [e for e in group_options("experiment") if e.endswith("_debug")]) == group_options("experiment")
