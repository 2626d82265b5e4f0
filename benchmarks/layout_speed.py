"""Layout speed: ``python -m benchmarks.layout_speed [--data kjv] [--batch 32 --window 64]``.

Times building a whole epoch of each layout on KJV (and iterating all its batches), median of
several repeats, after printing the environment. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.data import load_kjv
from benchmarks.env import environment
from resetbench.layouts import STRATEGIES, make_layout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    env = environment()
    print(f"env | {env['host_cpu']} x{env['host_cores']} | python {env['python_version']} | numpy {env['numpy_version']}")
    t0 = time.perf_counter()
    ds = load_kjv()
    print(f"load kjv: {time.perf_counter() - t0:.2f} s ({len(ds.train)} train sequences, "
          f"{int(ds.train.positions.sum()):,} tokens)")
    for name in STRATEGIES:
        opts = {"pad_multiple": 16} if name == "padded" else {}
        layout = make_layout(name, args.batch, args.window, 0, **opts)
        build, full = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            ep = layout.epoch(ds.train, rep)
            t1 = time.perf_counter()
            n = sum(1 for _ in ep)
            t2 = time.perf_counter()
            build.append(t1 - t0)
            full.append(t2 - t0)
        print(f"{name:>9}: epoch of {n} batches: build {statistics.median(build) * 1e3:.0f} ms, "
              f"build + iterate every batch {statistics.median(full) * 1e3:.0f} ms "
              f"({statistics.median(full) / n * 1e6:.0f} us/batch)")


if __name__ == "__main__":
    main()
