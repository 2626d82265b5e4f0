"""The README's "Adding a backend" guide, done in a scratch clone: one module and one yaml file.

``python -m tests.add_backend_exercise [--full] [--keep]`` (``make exercise``) clones this
repository's committed state into a temporary folder, adds a backend named ``oracle2`` (the NumPy
oracle under a new name: ``backends/oracle2.py`` and ``conf/backend/oracle2.yaml``, nothing else),
and checks that it

1. gets its row in the README's kernel table (``python -m benchmarks.docs``, as ``make test`` does
   first) and passes the tests that select it (``pytest -k oracle2``: conformance, CLI, README,
   its kernel declarations...); ``--full`` runs the whole ``make test`` instead (minutes);
2. appears in ``python -m benchmarks.kernels --backends oracle2 --quick``;
3. appears in a ``compare_debug`` sweep with torch, and in the tables and figures built from it.

It reuses this checkout's virtual environment (no install). Exit code 0 when every step passed.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "oracle2"

MODULE = '''"""The NumPy oracle under another name: the smallest backend, as the README's guide adds it."""

from backends.reference import NumpyBackend


class Oracle2Backend(NumpyBackend):
    name = "oracle2"
    kernel = "oracle2.loop"
'''

YAML = '''# The NumPy oracle under another name (tests/add_backend_exercise.py).
name: oracle2
_target_: backends.oracle2.Oracle2Backend
requires: [numpy]
kernel: loop
kernels:
  loop: {role: exact, cells: [lstm], description: "the oracle's NumPy time loop"}
schema: {}
'''


def step(title: str, cmd: List[str], cwd: str, env: dict) -> str:
    """Run ``cmd``; print its tail and fail loudly if it fails; return its output."""
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    print("\n".join(out.strip().splitlines()[-6:]))
    print(f"-> exit {r.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if r.returncode != 0:
        raise SystemExit(f"step failed: {title}")
    return out


def check(condition: bool, what: str) -> None:
    print(f"   {'ok' if condition else 'FAILED'}: {what}", flush=True)
    if not condition:
        raise SystemExit(f"check failed: {what}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="run the whole make test in the clone")
    ap.add_argument("--keep", action="store_true", help="keep the scratch clone")
    args = ap.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="resetbench-exercise-")
    clone = os.path.join(scratch, "clone")
    py = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    try:
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        with open(os.path.join(clone, "backends", f"{NAME}.py"), "w") as fh:
            fh.write(MODULE)
        with open(os.path.join(clone, "conf", "backend", f"{NAME}.yaml"), "w") as fh:
            fh.write(YAML)
        added = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
        check(sorted(added.split()) == sorted(["??", "??", f"backends/{NAME}.py", f"conf/backend/{NAME}.yaml"]),
              f"the clone differs by two new files only: {added.split()}")
        venv = os.path.dirname(os.path.dirname(py))
        step("README kernel table (make docs)", [py, "-m", "benchmarks.docs"], clone, env)
        with open(os.path.join(clone, "README.md")) as fh:
            check(f"| {NAME} | `loop` (default) | exact |" in fh.read(), f"{NAME}'s kernel in the README table")
        if args.full:
            step("make test (the whole suite)", ["make", "test", f"VENV={venv}"], clone, env)
        else:
            step(f"the tests that select {NAME}", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", NAME],
                 clone, {**env, "RESETBENCH_REQUIRE_ALL": "1"})
        out = os.path.join(scratch, "kernels")
        step("kernel benchmark", [py, "-m", "benchmarks.kernels", "--backends", NAME, "--quick", "--out", out,
                                  "--figures", out], clone, env)
        with open(os.path.join(out, "kernels.csv")) as fh:
            rows = list(csv.DictReader(fh))
        check(any(r["backend"] == NAME for r in rows), f"{NAME} rows in kernels.csv")
        check(os.path.getsize(os.path.join(out, "kernels.png")) > 10_000, "kernels.png drawn")
        sweep = os.path.join(scratch, "sweep")
        step("compare_debug sweep with torch", [py, "run.py", "-m", "+experiment=compare_debug",
                                                f"backend={NAME},torch", f"hydra.sweep.dir={sweep}"], clone, env)
        tables, figures = os.path.join(scratch, "tables"), os.path.join(scratch, "figures")
        step("tables", [py, "-m", "benchmarks.results", sweep, "--out", tables, "--no-lengths"], clone, env)
        with open(os.path.join(tables, "runs.csv")) as fh:
            runs = list(csv.DictReader(fh))
        check({r["backend"] for r in runs} == {NAME, "torch"} and all(r["status"] == "completed" for r in runs),
              f"runs.csv: {len(runs)} completed runs of {NAME} and torch")
        step("figures", [py, "-m", "benchmarks.plots", "--tables", tables, "--out", figures, "--suffix", "_debug"],
             clone, env)
        with open(os.path.join(figures, "summary.md")) as fh:
            check(NAME in fh.read(), f"{NAME} in the ranking table (summary.md)")
        check(os.path.isfile(os.path.join(figures, "throughput.png")), "throughput.png drawn")
        print(f"\nthe exercise passed ({'make test' if args.full else f'pytest -k {NAME}'}, kernels, sweep, "
              f"tables, figures)")
        return 0
    finally:
        if args.keep:
            print(f"scratch clone kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
