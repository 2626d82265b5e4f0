"""Layout speed: ``python -m benchmarks.layout_speed [--data kjv] [--batch 32 --window 64]``.

Times building a whole epoch of each layout (every file of conf/strategy/, with its options) on a
data source of conf/data/ with its default options (and iterating all its batches), median of
several repeats, after printing the environment. A benchmark, not a test.

``--synthetic-tokens 1e9`` instead lays out a synthetic corpus of that many target positions:
KJV-verse-like lengths (:func:`synthetic_corpus`) over a cheap byte pattern, the text never held
twice. Each layout runs in a fresh process, which reports layout tokens per second (build + iterate
every batch) and its peak RSS (``ru_maxrss``), the corpus included: what streaming layouts
promise is that the layout adds O(B x T) + O(sequences) to the corpus, never O(tokens).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from typing import Dict, List

import numpy as np
import yaml

from benchmarks import registry
from benchmarks.data import sample_lengths
from benchmarks.env import environment
from resetbench.corpus import Corpus

# KJV verses (train split): log-length mean 4.79 (median 120 bytes), sd 0.44, 11..530 bytes
KJV_VERSE_LENGTHS = {"median": 120, "sigma": 0.44, "min_len": 11, "max_len": 530}
_PATTERN = np.resize(np.frombuffer(b"In the beginning God created the heaven and the earth. ", np.uint8), 1 << 20)


def default_choice(group: str) -> str:
    """The option of ``group`` that conf/config.yaml's defaults list picks."""
    with open(os.path.join(registry.CONF_DIR, "config.yaml")) as fh:
        defaults = yaml.safe_load(fh)["defaults"]
    return next(d[group] for d in defaults if isinstance(d, dict) and group in d)


def synthetic_lengths(tokens: int, seed: int = 0) -> np.ndarray:
    """Sequence lengths (bytes) of KJV-verse-like sizes whose target positions (n + 1 each) add up
    to ``tokens`` or just past it, drawn in chunks from ``default_rng(seed)``."""
    rng, chunks, total = np.random.default_rng(seed), [], 0
    while total < tokens:
        chunk = sample_lengths(rng, 1 << 20, "lognormal", KJV_VERSE_LENGTHS)
        ends = total + np.cumsum(chunk + 1)
        chunk = chunk[:int(np.searchsorted(ends, tokens)) + 1]
        chunks.append(chunk)
        total += int((chunk + 1).sum())
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


def synthetic_corpus(tokens: int, seed: int = 0) -> Corpus:
    """A corpus of about ``tokens`` target positions (:func:`synthetic_lengths`) whose bytes are a
    repeated English sentence, written in place: memory is the bytes plus 8 per sequence."""
    lengths = synthetic_lengths(int(tokens), seed)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    del lengths
    data = np.empty(int(offsets[-1]), np.uint8)
    for i in range(0, len(data), len(_PATTERN)):
        piece = data[i:i + len(_PATTERN)]
        piece[:] = _PATTERN[:len(piece)]
    return Corpus(data, offsets)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024    # Linux: KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_synthetic(name: str, tokens: int, batch: int, window: int, repeats: int) -> Dict[str, float]:
    """In this process: build the synthetic corpus, then build and iterate ``repeats`` epochs of
    strategy ``name``. Returns the corpus' RSS, the peak RSS, tokens and seconds per epoch."""
    corpus = synthetic_corpus(tokens)
    rss_corpus = _rss_bytes()
    layout = registry.build_layout(registry.group_config("strategy", name), batch, window, 0)
    times: List[float] = []
    for rep in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in layout.epoch(corpus, rep))
        times.append(time.perf_counter() - t0)
    return {"sequences": len(corpus), "tokens": int(len(corpus.data) + len(corpus)), "batches": n,
            "seconds": statistics.median(times), "rss_corpus": rss_corpus, "peak_rss": _peak_rss_bytes()}


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a new process (forked before any corpus exists), so that its peak RSS is its own."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(fn, args)


def run_synthetic(tokens: int, names: List[str], batch: int, window: int, repeats: int) -> None:
    for name in names:
        r = _in_fresh_process(measure_synthetic, name, tokens, batch, window, repeats)
        print(f"{name:>9}: {r['tokens']:,} tokens, {r['sequences']:,} sequences, {r['batches']:,} batches: "
              f"build + iterate every batch {r['seconds']:.1f} s ({r['tokens'] / r['seconds'] / 1e6:.2f} M tokens/s); "
              f"peak RSS {r['peak_rss'] / 2 ** 20:,.0f} MiB ({r['rss_corpus'] / 2 ** 20:,.0f} MiB before the layout: "
              f"Python and the corpus)",
              flush=True)


def run_data(data: str, names: List[str], batch: int, window: int, repeats: int) -> None:
    t0 = time.perf_counter()
    ds = registry.build_dataset(registry.group_config("data", data)).load()
    print(f"load {data}: {time.perf_counter() - t0:.2f} s ({len(ds.train)} train sequences, "
          f"{int(ds.train.positions.sum()):,} tokens)")
    for name in names:
        layout = registry.build_layout(registry.group_config("strategy", name), batch, window, 0)
        build, full = [], []
        for rep in range(repeats):
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=default_choice("data"), choices=registry.group_options("data"))
    ap.add_argument("--synthetic-tokens", type=float, default=None,
                    help="lay out a synthetic corpus of this many tokens (e.g. 1e7, 1e9) instead of --data")
    ap.add_argument("--strategies", default=",".join(registry.group_options("strategy")),
                    help="comma-separated strategies (default: every file of conf/strategy/)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="epochs per layout (default 5, synthetic 1)")
    args = ap.parse_args(argv)
    names = [n for n in args.strategies.split(",") if n]
    unknown = sorted(set(names) - set(registry.group_options("strategy")))
    if unknown:
        ap.error(f"unknown strategies: {', '.join(unknown)}")
    env = environment()
    print(f"env | {env['host_cpu']} x{env['host_cores']} | python {env['python_version']} | numpy {env['numpy_version']}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)", flush=True)
    if args.synthetic_tokens is not None:
        run_synthetic(int(args.synthetic_tokens), names, args.batch, args.window, args.repeats or 1)
    else:
        run_data(args.data, names, args.batch, args.window, args.repeats or 5)


if __name__ == "__main__":
    main()
