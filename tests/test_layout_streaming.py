"""Streaming layouts: every layout builds its windows lazily from the sequence lengths and gathers
only a batch's tokens from ``corpus.data``, yet yields exactly the batches of the materializing
implementation it replaced (kept below as the reference), and holds memory O(B x T) plus
O(sequences), never O(tokens)."""

from __future__ import annotations

import heapq
import tracemalloc
from typing import Dict, Iterator, List

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from benchmarks import registry
from benchmarks.config import GATHER_BYTES, SLOT_BYTES
from benchmarks.layout_speed import synthetic_corpus
from resetbench.contract import BOUNDARY, Batch
from resetbench.corpus import Corpus
from resetbench.layouts import Bucketed, Layout, Packed, Padded, ResetAll, eval_batches
from tests.test_plugins import corpus_of


# --------------------------------------------------------------------------- the old implementation
# Verbatim logic of resetbench/layouts.py before streaming (commit 1157624): the whole epoch as
# [B, W*T] arrays gathered from an int32 copy of the corpus.
def _ref_round_up(n, m):
    return -(-int(n) // int(m)) * int(m)


def _ref_balance_streams(lengths, streams):
    order = np.argsort(-lengths, kind="stable")
    heap = [(0, b) for b in range(streams)]
    assign = np.empty(len(lengths), np.int64)
    for k, n in zip(order.tolist(), lengths[order].tolist()):
        load, b = heapq.heappop(heap)
        assign[k] = b
        heapq.heappush(heap, (load + n, b))
    return assign


def _ref_gather(corpus, ids):
    ids = np.asarray(ids, np.int64)
    P = corpus.lengths[ids] + 1
    starts = np.cumsum(P) - P
    total = int(P.sum())
    data = np.empty(len(corpus.data) + 1, np.int32)
    data[0] = 256
    data[1:] = corpus.data
    delta = corpus.offsets[ids] - starts
    x = data[np.arange(total, dtype=np.int64) + np.repeat(delta, P)]
    x[starts] = BOUNDARY
    y = np.empty_like(x)
    y[:-1] = x[1:]
    if total:
        y[-1] = BOUNDARY
    return x, y, starts


def _ref_grid(rows, cols):
    return {"x": np.zeros((rows, cols), np.int32), "y": np.zeros((rows, cols), np.int32),
            "mask": np.zeros((rows, cols), np.float32), "reset": np.zeros((rows, cols), bool)}


def _ref_rows_of(corpus, ids, rows, cols):
    g = _ref_grid(rows, cols)
    x, y, starts = _ref_gather(corpus, ids)
    P = corpus.positions[np.asarray(ids, np.int64)]
    which = np.repeat(np.arange(len(P)), P)
    pos = np.arange(len(x)) - np.repeat(starts, P)
    g["x"][which, pos] = x
    g["y"][which, pos] = y
    g["mask"][which, pos] = 1.0
    return g


def _ref_batch(g, t0=0, t1=None):
    sl = slice(t0, t1)
    return Batch(g["x"][:, sl], g["y"][:, sl], g["mask"][:, sl], g["reset"][:, sl])


def _ref_packed_grid(B, T, corpus, order):
    P = corpus.positions[order]
    stream = _ref_balance_streams(P, B)
    seq_order = np.lexsort((np.arange(len(order)), stream))
    ids, stream, P = order[seq_order], stream[seq_order], P[seq_order]
    loads = np.bincount(stream, minlength=B, weights=P).astype(np.int64)
    width = max(_ref_round_up(int(loads.max()) if len(loads) else 0, T), T)
    g = _ref_grid(B, width)
    x, y, starts = _ref_gather(corpus, ids)
    reset = np.zeros(len(x), bool)
    reset[starts] = True
    begin = 0
    for b, load in enumerate(loads.tolist()):
        g["x"][b, :load] = x[begin:begin + load]
        g["y"][b, :load] = y[begin:begin + load]
        g["reset"][b, :load] = reset[begin:begin + load]
        g["mask"][b, :load] = 1.0
        begin += load
    return g


def _ref_packed(layout, corpus, epoch) -> Iterator[Batch]:
    g = _ref_packed_grid(layout.B, layout.T, corpus, layout.order(corpus, epoch))
    for w in range(g["x"].shape[1] // layout.T):
        yield _ref_batch(g, w * layout.T, (w + 1) * layout.T)


def _ref_padded(layout, corpus, epoch) -> Iterator[Batch]:
    # the batches (ids, rows, width) are cut by token_batches / Bucketed.batches, which streaming
    # leaves unchanged; the reference rebuilds every batch's arrays the old way
    for ids, rows, width in layout.batches(corpus, epoch):
        g = _ref_rows_of(corpus, ids, rows, width)
        g["reset"][:, 0] = True
        yield _ref_batch(g)


def _ref_reset_all(layout, corpus, epoch) -> Iterator[Batch]:
    order, B, T, P = layout.order(corpus, epoch), layout.B, layout.T, corpus.positions
    for i in range(0, len(order), B):
        ids = order[i:i + B]
        width = _ref_round_up(P[ids].max(), T)
        g = _ref_rows_of(corpus, ids, B, width)
        g["reset"][:, 0] = True
        for t0 in range(0, width, T):
            yield _ref_batch(g, t0, t0 + T)


REFERENCE = {Packed: _ref_packed, Padded: _ref_padded, Bucketed: _ref_padded, ResetAll: _ref_reset_all}


def reference(layout: Layout, corpus: Corpus, epoch: int) -> List[Batch]:
    return list(REFERENCE[type(layout)](layout, corpus, epoch))


# --------------------------------------------------------------------------- equality
def assert_same_batches(new: List[Batch], old: List[Batch]) -> None:
    assert len(new) == len(old)
    for k, (u, v) in enumerate(zip(new, old)):
        for f in ("x", "y", "mask", "reset"):
            a, b = getattr(u, f), getattr(v, f)
            assert a.dtype == b.dtype and a.shape == b.shape, (k, f, a.dtype, a.shape, b.dtype, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=f"batch {k}, {f}")


def layouts_for(B: int, T: int, seed: int) -> List[Layout]:
    """Every class at its defaults, every strategy file as configured, and padded options varied."""
    out: List[Layout] = [Packed(B, T, seed), Padded(B, T, seed), ResetAll(B, T, seed), Bucketed(B, T, seed)]
    out += [registry.build_layout(registry.group_config("strategy", n), B, T, seed)
            for n in registry.group_options("strategy")]
    out += [Padded(B, T, seed, pad_multiple=5, max_tokens=3 * T, row_multiple=2),
            Bucketed(B, T, seed, pool_batches=2, pad_multiple=3)]
    return out


CORPORA: Dict[str, List[int]] = {
    "single": [17],
    "single_empty": [0],
    "empties": [0, 0, 3, 0, 0],
    "longer_than_T": [150, 3, 90, 0, 41],
    "few_for_B": [5, 9],                       # B larger than the number of sequences
    "mixed": [3, 17, 5, 9, 30, 2, 11, 0, 64, 1, 7],
    "many": list(np.random.default_rng(5).integers(0, 200, size=300)),
}


@pytest.mark.parametrize("name,B,T", [(n, B, T) for n in sorted(CORPORA)
                                      for B, T in [(1, 1), (3, 8), (4, 16), (16, 5), (7, 64)]
                                      if n != "many" or B * T > 8])          # (cheap: < 10 s in all)
def test_streaming_equals_the_old_layouts(name, B, T):
    corpus = corpus_of(CORPORA[name], seed=B + T)
    for seed in (0, 3):
        for layout in layouts_for(B, T, seed):
            for epoch in (0, 1):
                assert_same_batches(list(layout.epoch(corpus, epoch)), reference(layout, corpus, epoch))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 80), min_size=1, max_size=40), B=st.integers(1, 9),
       T=st.integers(1, 20), seed=st.integers(0, 3), epoch=st.integers(0, 2))
def test_streaming_equals_the_old_layouts_on_random_corpora(lengths, B, T, seed, epoch):
    corpus = corpus_of(lengths, seed)
    for layout in layouts_for(B, T, seed):
        assert_same_batches(list(layout.epoch(corpus, epoch)), reference(layout, corpus, epoch))


def test_eval_batches_and_the_full_grid_equal_the_old():
    corpus = corpus_of(CORPORA["many"], seed=1)
    assert_same_batches(list(eval_batches(corpus, 8, 32)), reference(Packed(8, 32), corpus, 0))
    order = np.random.default_rng(2).permutation(len(corpus))
    new, old = Packed(6, 16).layout(corpus, order), _ref_packed_grid(6, 16, corpus, order)
    for f in ("x", "y", "mask", "reset"):
        assert new[f].dtype == old[f].dtype
        np.testing.assert_array_equal(new[f], old[f])


def test_empty_corpus_is_one_empty_window():
    corpus = Corpus(np.zeros(0, np.uint8), np.zeros(1, np.int64))
    assert_same_batches(list(Packed(3, 4).epoch(corpus)), reference(Packed(3, 4), corpus, 0))


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("cls", [Packed, Padded, Bucketed, ResetAll])
def test_layout_memory_is_batch_sized_not_corpus_sized(cls):
    """On a synthetic corpus of ~5M tokens, building an epoch allocates at most the footprint's
    bytes per sequence and iterating 200 batches at most the estimate's bytes per held slot
    (benchmarks.config): O(B x T + sequences), far below the 4 bytes per token of the int32
    corpus copy the old layouts gathered from (packed held 13 more per slot of the whole epoch)."""
    corpus = synthetic_corpus(5_000_000)
    tokens, sequences = int(corpus.positions.sum()), len(corpus)
    layout = cls(32, 64)
    fp = layout.footprint(tokens, int(corpus.positions.max()))
    tracemalloc.start()
    try:
        ep = layout.epoch(corpus, 0)
        built, built_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _, batch in zip(range(200), ep):
            assert batch.total_slots <= fp.held_slots
        _, iter_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert built_peak <= fp.sequence_bytes * sequences < tokens, (built_peak, sequences, tokens)
    assert iter_peak - built <= (SLOT_BYTES + GATHER_BYTES) * fp.held_slots, (iter_peak - built, fp)
