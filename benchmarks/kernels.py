"""Kernel benchmark: every backend's kernels against its framework's native no-reset LSTM.

``python -m benchmarks.kernels`` runs, for each backend in its own subprocess (one framework per
process), a full training step (forward, backward, clipping, Adam) of every kernel the backend
declares (``kernels:`` in ``conf/backend/*.yaml``; by default every backend but the oracle and
every kernel but those ``slow_to_build``) over a grid of shapes (B, T, H) and reset densities
(share of positions where a row resets), interleaved in rounds so that drift of this machine hits
every kernel alike. It also measures the matmul peak through each backend (its adapter's
``matmul``, or NumPy's: a large float32 matmul, and the model's own GEMM shapes). This module
imports no framework. It writes

- ``results/tables/kernels.csv``: one tidy row per (backend, cell, kernel, shape, density,
  ``scope``) with the median tokens/s (``scope`` ``step``: a full train step; ``layer``: the
  recurrent layers' forward and backward alone, where the adapter offers ``layer_timer``),
  ``kernel_role``, ``reset_cost_ratio`` (tokens/s over the same backend's kernel with role
  ``native`` on the same cell, shape and scope without resets; NaN for a backend without one) and
  ``peak_fraction`` (useful model FLOP/s over the best framework's large-matmul GFLOP/s here);
- ``results/tables/matmul.csv``: GFLOP/s per framework and GEMM shape;
- ``results/tables/kernels_env.json``: the environment of the run;
- ``results/figures/kernels.png`` (via :func:`benchmarks.plots.kernels_figure`).

Each kernel runs the densities whose batches have the layout properties it ``needs`` (a kernel
with ``no_mid_reset`` runs density 0 only: fresh full-length rows, no resets after column 0). A
kernel whose packages (``requires``: the ``peer_reset`` kernels of other libraries, the ``peers``
extra) are not installed is skipped with a one-line note. A
worker that fails or leaves a kernel without rows makes the command exit 1 with one line naming
the backend, after writing the rows that did come. Speed lives here, never in tests. ``--quick``
is a tiny grid for smoke tests.
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

from backends.base import Batch, ModelSpec, OptimizerSpec, check_layout, init_weights
from backends.cells import cell_names, cell_spec
from benchmarks import registry
from benchmarks.env import environment, malloc_state, tune_malloc

ROOT = registry.ROOT
DENSITIES = (0.0, 0.01, 0.03, 0.1, 0.3)
SHAPES = ((32, 64, 256), (64, 128, 512))     # (B, T, H); the two target shapes
BIG_MATMUL = 2048


# --------------------------------------------------------------------------- arithmetic
def model_flops(B: int, T: int, E: int, H: int, L: int, V: int = 257, gates: int = 4) -> float:
    """Useful FLOPs of one training step: 3x the forward GEMMs (forward, and backward's two
    products per GEMM), counting the B*T real positions only; ``gates`` blocks of H per cell
    (LSTM 4, GRU 3). Elementwise work is left out."""
    G = gates * H
    per_token = 2 * (E * G + (L - 1) * H * G + L * H * G + H * V)
    return 3.0 * B * T * per_token


def layer_flops(B: int, T: int, E: int, H: int, L: int, gates: int = 4) -> float:
    """Useful FLOPs of the recurrent layers' forward and backward alone (the layer rows)."""
    G = gates * H
    return 3.0 * B * T * 2 * (E * G + (L - 1) * H * G + L * H * G)


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


# --------------------------------------------------------------------------- matmul peak
def numpy_matmul(m: int, k: int, n: int) -> Callable[[], None]:
    """One float32 ``[m, k] x [k, n]`` matmul in NumPy: the peak of a backend without ``matmul``."""
    a = np.random.default_rng(0).standard_normal((m, k), np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), np.float32)
    return lambda: a @ b


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


ADAM = OptimizerSpec("adam", 2e-3, clip_norm=1.0)


def matmul_rows(backend: str, be, shapes: Sequence[Tuple[int, int, int]], embed: int) -> List[dict]:
    """GFLOP/s of a large square float32 matmul and of the model's GEMM shapes, through the
    adapter's :meth:`backends.base.Backend.matmul` (``matmul_by``: the backend), or NumPy's."""
    gemms = {f"square{BIG_MATMUL}": (BIG_MATMUL,) * 3}
    for B, T, H in shapes:
        gemms.update({f"{name}_B{B}_T{T}_H{H}": mkn for name, mkn in gemm_shapes(B, T, embed, H).items()})
    rows = []
    for gemm, (m, k, n) in gemms.items():
        run, by = be.matmul(m, k, n), backend
        if run is None:
            run, by = numpy_matmul(m, k, n), "numpy"
        rows.append({"kind": "matmul", "backend": backend, "matmul_by": by, "gemm": gemm, "m": m, "k": k, "n": n,
                     "gflops": matmul_gflops(run, 2.0 * m * k * n)})
    return rows


def runs_on(batch: Batch, decl: registry.KernelDecl) -> bool:
    """Whether ``batch`` has every layout property kernel ``decl`` needs."""
    try:
        check_layout(batch, decl.needs, decl.name)
    except ValueError:
        return False
    return True


def kernel_configs(cfg: dict, kernels: Sequence[str], shape: Tuple[int, int, int], embed: int,
                   densities: Sequence[float], device: str, cell: str = "lstm") -> List[tuple]:
    """``(declaration, density, backend, batch, precompile seconds)`` for every kernel that runs
    ``cell`` and every density whose batch the kernel can consume, each backend built and
    precompiled for ``shape``."""
    B, T, H = shape
    spec = ModelSpec(embed, H, 1, cell=cell)
    weights = init_weights(spec, 0)
    decls = registry.kernel_decls(cfg)
    out = []
    for kernel in kernels:
        if cell not in decls[kernel].cells:
            continue
        for d in densities:
            batch = random_batch(B, T, d, seed=int(d * 1000) + 1)
            if not runs_on(batch, decls[kernel]):
                continue
            be = registry.build_backend(cfg, spec, weights, ADAM, B, device=device, kernel=kernel)
            t0 = time.perf_counter()
            be.precompile([(B, T)])
            out.append((decls[kernel], d, be, batch, time.perf_counter() - t0))
    return out


def kernel_row(backend: str, config: tuple, times: List[float], embed: int, scope: str = "step") -> dict:
    """The kernels.csv row of one (kernel, density) config from its timed steps; ``scope``:
    ``step`` (a full train step) or ``layer`` (the recurrent layers' forward and backward alone,
    :meth:`backends.base.Backend.layer_timer`)."""
    decl, d, be, batch, compile_s = config
    B, T = batch.x.shape
    H = be.spec.hidden
    step = statistics.median(times)
    cell = be.spec.cell
    gates = len(cell_spec(cell).gates)
    flops = model_flops(B, T, embed, H, 1, gates=gates) if scope == "step" else layer_flops(B, T, embed, H, 1, gates)
    return {"kind": "kernel", "backend": backend, "cell": cell, "kernel_option": decl.name, "kernel_role": decl.role,
            "kernel": be.kernel, "scope": scope, "device": be.device, "B": B, "T": T, "E": embed, "H": H, "density": d,
            "mid_window_resets": int(batch.reset[:, 1:].sum()),
            "max_resets_in_a_row": int(batch.reset[:, 1:].sum(1).max()),
            "step_ms_median": step * 1e3, "tokens_per_s": B * T / step,
            "model_gflops": flops / step / 1e9,
            "steps_timed": len(times),
            "precompile_s": compile_s}


def worker(backend: str, kernels: Sequence[str], shapes: Sequence[Tuple[int, int, int]], densities: Sequence[float],
           embed: int, rounds: int, repeats: int, device: str, emit: Callable[[dict], None],
           tune: bool = True, cells: Sequence[str] = ("lstm",)) -> None:
    """Measure one backend (this process imports its framework) and emit one dict per result.
    ``tune``: :func:`benchmarks.env.tune_malloc` first, as ``run.py`` does by default."""
    cfg = registry.backend_configs()[backend]
    registry.check_installed(cfg)
    if tune:
        tune_malloc()
    emit({"kind": "env", "backend": backend, "malloc": malloc_state()})
    small = ModelSpec(embed, 8, 1)
    for row in matmul_rows(backend, registry.build_backend(cfg, small, init_weights(small, 0), ADAM, 1, device=device),
                           shapes, embed):
        emit(row)
    for cell, shape in ((c, sh) for c in cells for sh in shapes):
        configs = kernel_configs(cfg, kernels, shape, embed, densities, device, cell)
        layers = [be.layer_timer(batch) for _, _, be, batch, _ in configs]
        samples: List[List[float]] = [[] for _ in configs]
        layer_samples: List[List[float]] = [[] for _ in configs]
        for r in range(rounds):                       # interleaved: drift hits every config alike
            for i, (_, _, be, batch, _) in enumerate(configs):
                samples[i] += time_steps(be.train_step, be.synchronize, batch, 3 if r == 0 else 1, repeats)
                if layers[i] is not None:
                    layer_samples[i] += time_steps(lambda _, run=layers[i]: run(), be.synchronize, batch,
                                                   3 if r == 0 else 1, repeats)
        for config, times, layer_times in zip(configs, samples, layer_samples):
            emit(kernel_row(backend, config, times, embed))
            if layer_times:
                emit(kernel_row(backend, config, layer_times, embed, scope="layer"))
        del configs, layers


# --------------------------------------------------------------------------- the parent: tables and figure
def derive(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """Split rows into kernel and matmul rows and add ``reset_cost_ratio`` (over the same backend's
    kernel with role ``native``, density 0, same cell, shape and scope; NaN without one) and
    ``peak_fraction``."""
    mm = [r for r in rows if r["kind"] == "matmul"]
    ker = [r for r in rows if r["kind"] == "kernel"]
    peak = max((r["gflops"] for r in mm if r["gemm"].startswith("square")), default=float("nan"))
    key = lambda r: (r["backend"], r.get("cell", "lstm"), r.get("scope", "step"), r["B"], r["T"], r["H"])
    native = {key(r): r["tokens_per_s"] for r in ker if r.get("kernel_role") == "native" and r["density"] == 0}
    for r in ker:
        base = native.get(key(r))
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
    out.append(f"{'backend':<7} {'cell':<4} {'kernel':<34} {'scope':<5} {'B':>3} {'T':>4} {'H':>4} {'resets':>6} "
               f"{'tokens/s':>10} {'vs native':>9} {'of peak':>8}")
    for r in sorted(ker, key=lambda r: (r["backend"], r.get("cell", "lstm"), r.get("scope", "step"), r["B"], r["T"],
                                        r["H"], r["kernel_option"], r["density"])):
        out.append(f"{r['backend']:<7} {r.get('cell', 'lstm'):<4} {r['kernel']:<34} {r.get('scope', 'step'):<5} "
                   f"{r['B']:>3} {r['T']:>4} {r['H']:>4} "
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
    """The kernels to measure for ``backend``: those picked with ``--kernels backend:kernel``, else
    every declared one that is not ``slow_to_build``."""
    decls = registry.kernel_decls(registry.backend_configs()[backend])
    picked = [c.split(":", 1)[1] for c in chosen or () if c.split(":", 1)[0] == backend]
    bad = [p for p in picked if p not in decls]
    if bad:
        raise SystemExit(f"--kernels: {backend}:{bad[0]} is not a kernel of backend={backend}; "
                         f"allowed: {', '.join(decls)}")
    return picked or [name for name, d in decls.items() if not d.slow_to_build]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: ``shapes``, ``densities``, ``backends``, ``chosen`` (the
    ``--kernels`` items), ``rounds`` and ``repeats`` added (``--quick`` applied)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default=",".join(registry.timed_backends()),
                    help="backends, comma-separated (default: every registered one but the oracle)")
    ap.add_argument("--kernels", default="", help="backend:kernel,... to add or restrict (default: every "
                    "declared kernel that is not slow_to_build)")
    ap.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES), help="BxTxH,...")
    ap.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    ap.add_argument("--cells", default="lstm", help=f"cells, comma-separated (of conf/cell/: {', '.join(cell_names())}); "
                    "each kernel runs the cells it declares")
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
    args.shapes = _parse_shapes("8x16x32" if args.quick else args.shapes)
    try:
        args.densities = [float(d) for d in ("0,0.1" if args.quick else args.densities).split(",")]
    except ValueError:
        raise SystemExit(f"--densities={args.densities!r}: give fractions separated by commas, e.g. 0,0.03") from None
    if any(not 0 <= d < 1 for d in args.densities):
        raise SystemExit(f"--densities={args.densities!r}: each must be in [0, 1)")
    known = registry.group_options("backend")
    args.backends = [b for b in args.backends.split(",") if b]
    for b in args.backends:
        if b not in known:
            raise SystemExit(f"--backends: {b!r} is not a backend; allowed: {', '.join(known)}")
    args.chosen = [c for c in args.kernels.split(",") if c]
    args.cells = [c for c in args.cells.split(",") if c]
    bad = [c for c in args.cells if c not in cell_names()]
    if bad or not args.cells:
        raise SystemExit(f"--cells={','.join(args.cells)!r}: allowed: {', '.join(cell_names())}")
    args.rounds, args.repeats = (1, 2) if args.quick else (args.rounds, args.repeats)
    return args


def run_worker(args: argparse.Namespace, backend: str, kernels: Sequence[str]) -> Tuple[int, List[dict], List[str]]:
    """One backend's worker process: its exit code, the rows it printed, the tail of its output."""
    cmd = [sys.executable, "-m", "benchmarks.kernels", "--worker", backend, "--shapes",
           ",".join("x".join(map(str, s)) for s in args.shapes), "--densities", ",".join(map(str, args.densities)),
           "--embed", str(args.embed), "--rounds", str(args.rounds), "--repeats", str(args.repeats),
           "--device", args.device, "--kernels", ",".join(f"{backend}:{k}" for k in kernels),
           "--cells", ",".join(args.cells)]
    cmd += ["--default-malloc"] if args.default_malloc else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    return proc.returncode, rows, (proc.stderr or proc.stdout).strip().splitlines()[-5:]


def worker_failure(backend: str, code: int, rows: List[dict], kernels: Sequence[str],
                   cells: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why a backend's worker did not deliver (a non-zero exit, or a kernel without rows), or None."""
    if code != 0:
        return f"backend {backend} failed (exit {code})"
    declared = registry.kernel_decls(registry.backend_configs()[backend])
    missing = [k for k in kernels if any(c in declared[k].cells for c in (cells or ("lstm",)))
               and not any(r["kind"] == "kernel" and r["kernel_option"] == k for r in rows)]
    if missing:
        return f"backend {backend} left no rows for kernel {', '.join(missing)} (exit {code})"
    return None


def measure(args: argparse.Namespace, env: dict) -> Tuple[List[dict], List[str]]:
    """Every backend's rows (one worker process each) and the failures, one line per backend."""
    rows: List[dict] = []
    failures: List[str] = []
    for b in args.backends:
        kernels, cfg = _kernels_for(b, args.chosen), registry.backend_configs()[b]
        for k in [k for k in kernels if registry.kernel_missing(cfg, k)]:   # another library's, not installed
            print(f"[{b}] skipped kernel {k}: {registry.kernel_missing_reason(cfg, k)}", flush=True)
            kernels.remove(k)
        print(f"[{b}] kernels {', '.join(kernels)} ...", flush=True)
        t0 = time.perf_counter()
        code, got, tail = run_worker(args, b, kernels)
        problem = worker_failure(b, code, got, kernels, args.cells)
        if problem:
            failures.append(problem)
            print(f"[{b}] {problem}; kept {len(got)} rows:\n  " + "\n  ".join(tail), flush=True)
        print(f"[{b}] {len(got)} rows in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += [r for r in got if r["kind"] != "env"]
        env.setdefault("malloc_by_backend", {}).update({r["backend"]: r["malloc"] for r in got if r["kind"] == "env"})
    return rows, failures


def write_tables(out: str, ker: List[dict], mm: List[dict], env: dict, argv) -> None:
    """kernels.csv, matmul.csv (each only if it has rows) and kernels_env.json into ``out``."""
    os.makedirs(out, exist_ok=True)
    for name, rows in (("kernels.csv", ker), ("matmul.csv", mm)):
        if rows:
            write_csv(os.path.join(out, name), rows)
            print(f"wrote {os.path.join(out, name)} ({len(rows)} rows)")
    env["load_avg_end"] = os.getloadavg()[0]
    env["command"] = "python -m benchmarks.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(out, "kernels_env.json"), "w") as fh:
        json.dump(env, fh, indent=2, sort_keys=True)


def draw(figures: str, ker: List[dict], mm: List[dict]) -> None:
    """results/figures/kernels.png (a note instead when matplotlib is missing)."""
    try:
        from benchmarks.plots import kernels_figure
    except ImportError as exc:                                       # matplotlib missing
        print(f"no figure ({exc}); pip install -e '.[analysis]'")
        return
    os.makedirs(figures, exist_ok=True)
    print(f"wrote {kernels_figure(ker, mm, os.path.join(figures, 'kernels.png'))}")


def main(argv=None) -> List[dict]:
    """The benchmark (or, with ``--worker``, one backend's worker). Returns the kernel rows; exits 1
    with one line naming each backend whose worker failed, after writing the rows that came."""
    args = parse_args(argv)
    if args.worker:                               # child: one framework, rows as JSON lines on stdout
        worker(args.worker, _kernels_for(args.worker, args.chosen), args.shapes, args.densities, args.embed,
               args.rounds, args.repeats, args.device, lambda row: print("ROW " + json.dumps(row), flush=True),
               not args.default_malloc, args.cells)
        return []
    env = environment()
    print(f"env | {env.get('host_cpu')} x{env.get('host_cores')} | python {env.get('python_version')} | "
          f"numpy {env.get('numpy_version')} | load {os.getloadavg()[0]:.2f}", flush=True)
    rows, failures = measure(args, env)
    ker, mm = derive(rows)
    for line in summary_lines(ker, mm):
        print(line)
    if args.out:
        write_tables(args.out, ker, mm, env, argv)
    if args.figures and ker:
        draw(args.figures, ker, mm)
    if failures:
        raise SystemExit("error: kernel benchmark: " + "; ".join(failures))
    return ker


if __name__ == "__main__":
    main()
