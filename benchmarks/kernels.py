"""Kernel benchmark: every backend's kernels against its framework's native no-reset LSTM.

``python -m benchmarks.kernels`` runs, for each backend in its own subprocess (one framework per
process), a full training step (forward, backward, clipping, Adam) of every kernel the backend
declares (``exact_kernels`` and ``baseline_kernels`` in ``conf/backend/*.yaml``) over a grid of
shapes (B, T, H) and reset densities (share of positions where a row resets), interleaved in
rounds so that drift of this machine hits every kernel alike. It also measures the matmul peak
through each framework (a large float32 matmul, and the model's own GEMM shapes). It writes

- ``results/tables/kernels.csv``: one tidy row per (backend, kernel, shape, density) with the
  median tokens/s, ``reset_cost_ratio`` (tokens/s over the same backend's ``native`` kernel on
  the same shape without resets) and ``peak_fraction`` (useful model FLOP/s over the best
  framework's large-matmul GFLOP/s on this machine);
- ``results/tables/matmul.csv``: GFLOP/s per framework and GEMM shape;
- ``results/tables/kernels_env.json``: the environment of the run;
- ``results/figures/kernels.png`` (via :func:`benchmarks.plots.kernels_figure`).

The baselines run where they can: ``native`` on windows without resets, ``peer`` on full-length
padded rows. Speed lives here, never in tests. ``--quick`` is a tiny grid for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from backends.base import BASELINE_KERNELS, Batch, ModelSpec, OptimizerSpec, init_weights
from benchmarks import registry
from benchmarks.env import environment, malloc_state, tune_malloc

ROOT = registry.ROOT
DENSITIES = (0.0, 0.01, 0.03, 0.1, 0.3)
SHAPES = ((32, 64, 256), (64, 128, 512))     # (B, T, H); the two target shapes
BIG_MATMUL = 2048
# left out by default: minutes of compilation per shape (add with --kernels torch:compile)
DEFAULT_SKIP = {("torch", "compile")}


# --------------------------------------------------------------------------- arithmetic
def model_flops(B: int, T: int, E: int, H: int, L: int, V: int = 257) -> float:
    """Useful FLOPs of one training step: 3x the forward GEMMs (forward, and backward's two
    products per GEMM), counting the B*T real positions only. Elementwise work is left out."""
    per_token = 2 * (E * 4 * H + (L - 1) * H * 4 * H + L * H * 4 * H + H * V)
    return 3.0 * B * T * per_token


def gemm_shapes(B: int, T: int, E: int, H: int, V: int = 257) -> Dict[str, Tuple[int, int, int]]:
    """The model's GEMMs as (m, k, n): the recurrent step, the hoisted input projection, the head."""
    return {"recurrent": (B, H, 4 * H), "input_projection": (B * T, E, 4 * H), "head": (B * T, H, V)}


def random_batch(B: int, T: int, density: float, seed: int = 0) -> Batch:
    """Random ids, every target counted; each position resets with probability ``density``.
    Density 0 is a fresh padded-style window: every row resets at column 0, nowhere else."""
    rng = np.random.default_rng(seed)
    reset = rng.random((B, T)) < density
    if density == 0:
        reset[:, 0] = True
    return Batch(rng.integers(0, 257, (B, T)).astype(np.int32), rng.integers(0, 257, (B, T)).astype(np.int32),
                 np.ones((B, T), np.float32), reset)


# --------------------------------------------------------------------------- matmul peak, per framework
def _matmul_runner(framework: str, device: str) -> Callable[[int, int, int], Callable[[], None]]:
    """``make(m, k, n)`` -> a no-argument call that runs one float32 matmul and waits for it."""
    if framework == "torch":
        import torch
        dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")

        def make(m, k, n):
            a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)

            def run():
                torch.matmul(a, b)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
            return run
        return make
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        mm = jax.jit(jnp.matmul)

        def make(m, k, n):
            a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
            b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
            mm(a, b).block_until_ready()
            return lambda: mm(a, b).block_until_ready()
        return make
    if framework == "keras":
        from backends.keras_lstm import tf
        mm = tf.function(tf.linalg.matmul, jit_compile=False)

        def make(m, k, n):
            a, b = tf.random.normal((m, k)), tf.random.normal((k, n))
            mm(a, b).numpy()
            return lambda: mm(a, b).numpy()
        return make
    if framework == "numpy":
        def make(m, k, n):
            a = np.random.default_rng(0).standard_normal((m, k), np.float32)
            b = np.random.default_rng(1).standard_normal((k, n), np.float32)
            return lambda: a @ b
        return make
    raise ValueError(f"no matmul runner for {framework}")


def matmul_gflops(run: Callable[[], None], flops: float, min_time: float = 0.3, repeats: int = 5) -> float:
    """Median GFLOP/s of ``run`` (called enough times per sample to last ``min_time`` seconds)."""
    run()
    t0 = time.perf_counter()
    run()
    reps = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        rates.append(flops * reps / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


# --------------------------------------------------------------------------- one backend, in-process
def time_steps(step: Callable[[Batch], object], sync: Callable[[], None], batch: Batch, warmup: int,
               repeats: int) -> List[float]:
    """Seconds of ``repeats`` training steps after ``warmup`` untimed ones; the device is
    synchronized and the loss read before each clock read."""
    for _ in range(warmup):
        float(step(batch))
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step(batch)
        sync()
        float(loss)
        times.append(time.perf_counter() - t0)
    return times


def worker(backend: str, kernels: Sequence[str], shapes: Sequence[Tuple[int, int, int]], densities: Sequence[float],
           embed: int, rounds: int, repeats: int, device: str, emit: Callable[[dict], None],
           tune: bool = True) -> None:
    """Measure one backend (this process imports its framework) and emit one dict per result.
    ``tune``: :func:`benchmarks.env.tune_malloc` first, as ``run.py`` does by default."""
    cfg = registry.backend_configs()[backend]
    registry.check_installed(cfg)
    if tune:
        tune_malloc()
    emit({"kind": "env", "backend": backend, "malloc": malloc_state()})
    make_mm = _matmul_runner(backend, device)
    n = BIG_MATMUL
    emit({"kind": "matmul", "backend": backend, "gemm": f"square{n}", "m": n, "k": n, "n": n,
          "gflops": matmul_gflops(make_mm(n, n, n), 2.0 * n ** 3)})
    for B, T, H in shapes:
        for name, (m, k, nn) in gemm_shapes(B, T, embed, H).items():
            emit({"kind": "matmul", "backend": backend, "gemm": f"{name}_B{B}_T{T}_H{H}", "m": m, "k": k,
                  "n": nn, "gflops": matmul_gflops(make_mm(m, k, nn), 2.0 * m * k * nn)})
    for B, T, H in shapes:
        spec = ModelSpec(embed, H, 1)
        weights = init_weights(spec, 0)
        configs = []     # (kernel option, density, backend, batch)
        for kernel in kernels:
            dens = [0.0] if kernel in BASELINE_KERNELS else densities
            for d in dens:
                be = registry.build_backend(cfg, spec, weights, OptimizerSpec("adam", 2e-3, clip_norm=1.0), B,
                                            device=device, kernel=kernel)
                batch = random_batch(B, T, d, seed=int(d * 1000) + 1)
                t0 = time.perf_counter()
                be.precompile([(B, T)])
                configs.append((kernel, d, be, batch, time.perf_counter() - t0))
        samples: Dict[int, List[float]] = {i: [] for i in range(len(configs))}
        for r in range(rounds):
            for i, (kernel, d, be, batch, _) in enumerate(configs):
                samples[i] += time_steps(be.train_step, be.synchronize, batch, 3 if r == 0 else 1, repeats)
        for i, (kernel, d, be, batch, compile_s) in enumerate(configs):
            step = statistics.median(samples[i])
            mid = batch.reset[:, 1:].sum()
            emit({"kind": "kernel", "backend": backend, "kernel_option": kernel, "kernel": be.kernel,
                  "device": be.device, "B": B, "T": T, "E": embed, "H": H, "density": d,
                  "mid_window_resets": int(mid), "max_resets_in_a_row": int(batch.reset[:, 1:].sum(1).max()),
                  "step_ms_median": step * 1e3, "tokens_per_s": B * T / step,
                  "model_gflops": model_flops(B, T, embed, H, 1) / step / 1e9, "steps_timed": len(samples[i]),
                  "precompile_s": compile_s})
        del configs


# --------------------------------------------------------------------------- the parent: tables and figure
def derive(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """Split rows into kernel and matmul rows and add ``reset_cost_ratio`` and ``peak_fraction``."""
    mm = [r for r in rows if r["kind"] == "matmul"]
    ker = [r for r in rows if r["kind"] == "kernel"]
    peak = max((r["gflops"] for r in mm if r["gemm"].startswith("square")), default=float("nan"))
    native = {(r["backend"], r["B"], r["T"], r["H"]): r["tokens_per_s"] for r in ker
              if r["kernel_option"] == "native"}
    for r in ker:
        base = native.get((r["backend"], r["B"], r["T"], r["H"]))
        r["reset_cost_ratio"] = r["tokens_per_s"] / base if base else float("nan")
        r["best_matmul_gflops"] = peak
        r["peak_fraction"] = r["model_gflops"] / peak
    for r in mm:
        r["peak_fraction"] = r["gflops"] / peak
    return ker, mm


def write_csv(path: str, rows: List[dict]) -> None:
    import csv
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r if k != "kind"))
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k != "kind"})
    os.replace(tmp, path)


def summary_lines(ker: List[dict], mm: List[dict]) -> List[str]:
    """Human-readable summary: peaks, and per backend and shape, the best exact kernel at 3%."""
    out = ["matmul GFLOP/s (float32, 2048^3): " + ", ".join(
        f"{r['backend']} {r['gflops']:.0f}" for r in mm if r["gemm"].startswith("square"))]
    out.append(f"{'backend':<7} {'kernel':<34} {'B':>3} {'T':>4} {'H':>4} {'resets':>6} "
               f"{'tokens/s':>10} {'vs native':>9} {'of peak':>8}")
    for r in sorted(ker, key=lambda r: (r["backend"], r["B"], r["T"], r["H"], r["kernel_option"], r["density"])):
        out.append(f"{r['backend']:<7} {r['kernel']:<34} {r['B']:>3} {r['T']:>4} {r['H']:>4} "
                   f"{r['density']:>6.0%} {r['tokens_per_s']:>10,.0f} {r['reset_cost_ratio']:>8.2f}x "
                   f"{r['peak_fraction']:>7.1%}")
    return out


def _parse_shapes(text: str) -> List[Tuple[int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes={text!r}: give BxTxH triples separated by commas, e.g. 32x64x256,64x128x512")
    return shapes  # type: ignore[return-value]


def _kernels_for(backend: str, chosen: Optional[Iterable[str]]) -> List[str]:
    k = registry.kernel_options(registry.backend_configs()[backend])
    declared = k["exact"] + k["baseline"]
    if chosen:
        picked = [c.split(":", 1)[1] for c in chosen if c.split(":", 1)[0] == backend]
        bad = [p for p in picked if p not in declared]
        if bad:
            raise SystemExit(f"--kernels: {backend}:{bad[0]} is not a kernel of backend={backend}; "
                             f"allowed: {', '.join(declared)}")
        if picked:
            return picked
    return [x for x in declared if (backend, x) not in DEFAULT_SKIP]


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="torch,jax,keras")
    ap.add_argument("--kernels", default="", help="backend:kernel,... to add or restrict (default: every "
                    "declared kernel except torch script/compile)")
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES), help="BxTxH,...")
    ap.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds (noise control: many short "
                    "rounds spread this machine's drift over every kernel alike)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per kernel, density and round")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's malloc thresholds "
                    "(run.py's tune_malloc=false); by default they are raised as in run.py")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "tables"))
    ap.add_argument("--figures", default=os.path.join(ROOT, "results", "figures"))
    ap.add_argument("--quick", action="store_true", help="tiny grid (smoke test): 8x16x32, densities 0 and 0.1")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = _parse_shapes("8x16x32" if args.quick else args.shapes)
    try:
        densities = [float(d) for d in ("0,0.1" if args.quick else args.densities).split(",")]
    except ValueError:
        raise SystemExit(f"--densities={args.densities!r}: give fractions separated by commas, e.g. 0,0.03") from None
    if any(not 0 <= d < 1 for d in densities):
        raise SystemExit(f"--densities={args.densities!r}: each must be in [0, 1)")
    known = registry.group_options("backend")
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in known:
            raise SystemExit(f"--backends: {b!r} is not a backend; allowed: {', '.join(known)}")
    chosen = [c for c in args.kernels.split(",") if c]
    rounds, repeats = (1, 2) if args.quick else (args.rounds, args.repeats)

    if args.worker:                               # child: one framework, rows as JSON lines on stdout
        worker(args.worker, _kernels_for(args.worker, chosen), shapes, densities, args.embed, rounds, repeats,
               args.device, lambda row: print("ROW " + json.dumps(row), flush=True), not args.default_malloc)
        return []

    env = environment()
    print(f"env | {env.get('host_cpu')} x{env.get('host_cores')} | python {env.get('python_version')} | "
          f"numpy {env.get('numpy_version')} | load {os.getloadavg()[0]:.2f}", flush=True)
    rows: List[dict] = []
    for b in backends:
        kernels = _kernels_for(b, chosen)
        cmd = [sys.executable, "-m", "benchmarks.kernels", "--worker", b, "--shapes",
               ",".join("x".join(map(str, s)) for s in shapes), "--densities", ",".join(map(str, densities)),
               "--embed", str(args.embed), "--rounds", str(rounds), "--repeats", str(repeats),
               "--device", args.device, "--kernels", ",".join(f"{b}:{k}" for k in kernels)]
        cmd += ["--default-malloc"] if args.default_malloc else []
        print(f"[{b}] kernels {', '.join(kernels)} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(f"[{b}] failed (exit {proc.returncode}); kept {len(got)} rows:\n  " + "\n  ".join(tail), flush=True)
        print(f"[{b}] {len(got)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += [r for r in got if r["kind"] != "env"]
        env.setdefault("malloc_by_backend", {}).update({r["backend"]: r["malloc"] for r in got if r["kind"] == "env"})
    ker, mm = derive(rows)
    for line in summary_lines(ker, mm):
        print(line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(os.path.join(args.out, "kernels.csv"), ker)
        write_csv(os.path.join(args.out, "matmul.csv"), mm)
        env["load_avg_end"] = os.getloadavg()[0]
        env["command"] = "python -m benchmarks.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(args.out, "kernels_env.json"), "w") as fh:
            json.dump(env, fh, indent=2, sort_keys=True)
        print(f"wrote {os.path.join(args.out, 'kernels.csv')} and matmul.csv")
    if args.figures and ker:
        try:
            from benchmarks.plots import kernels_figure
        except ImportError as exc:                                       # matplotlib missing
            print(f"no figure ({exc}); pip install -e '.[analysis]'")
        else:
            os.makedirs(args.figures, exist_ok=True)
            path = kernels_figure(ker, mm, os.path.join(args.figures, "kernels.png"))
            print(f"wrote {path}")
    return ker


if __name__ == "__main__":
    main()
