"""Layout speed: ``python -m benchmarks.layout_speed [--data kjv] [--batch 32 --window 64]``.

Times building a whole epoch of each layout (every file of conf/strategy/, with its options) on a
data source of conf/data/ with its default options (and iterating all its batches), median of
several repeats, after printing the environment. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import yaml

from benchmarks import registry
from benchmarks.env import environment


def default_choice(group: str) -> str:
    """The option of ``group`` that conf/config.yaml's defaults list picks."""
    with open(os.path.join(registry.CONF_DIR, "config.yaml")) as fh:
        defaults = yaml.safe_load(fh)["defaults"]
    return next(d[group] for d in defaults if isinstance(d, dict) and group in d)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=default_choice("data"), choices=registry.group_options("data"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    env = environment()
    print(f"env | {env['host_cpu']} x{env['host_cores']} | python {env['python_version']} | numpy {env['numpy_version']}")
    t0 = time.perf_counter()
    ds = registry.build_dataset(registry.group_config("data", args.data)).load()
    print(f"load {args.data}: {time.perf_counter() - t0:.2f} s ({len(ds.train)} train sequences, "
          f"{int(ds.train.positions.sum()):,} tokens)")
    for name in registry.group_options("strategy"):
        layout = registry.build_layout(registry.group_config("strategy", name), args.batch, args.window, 0)
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
