"""Layouts (CONTRACT section 2) on random corpora: coverage, reset rules, padding, determinism."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from backends.base import BOUNDARY
from resetbench.corpus import Corpus
from resetbench.layouts import Packed, Padded, ResetAll, STRATEGIES, balance_streams, epoch_stats, make_layout

lengths_st = st.lists(st.integers(0, 40), min_size=1, max_size=30)
B_st = st.integers(1, 6)
T_st = st.integers(1, 12)


def corpus_of(lengths: List[int], seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    return Corpus.from_sequences([bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) for n in lengths])


def layout(name: str, B: int, T: int, seed: int = 0, pad_multiple: int = 1):
    return make_layout(name, B, T, seed, **({"pad_multiple": pad_multiple} if name == "padded" else {}))


def segments(batches) -> List[bytes]:
    """Follow each row through the batches, cutting at every reset; return the masked targets of
    each segment. With a correct layout, each segment is one sequence's bytes + the boundary."""
    rows: Dict[int, List[int]] = {}
    done: List[List[int]] = []
    for b in batches:
        B, T = b.x.shape
        for r in range(B):
            for t in range(T):
                if b.reset[r, t] and rows.get(r):
                    done.append(rows.pop(r))
                if b.reset[r, t]:
                    rows[r] = []
                if b.mask[r, t]:
                    assert r in rows, "a counted target before any reset of its row"
                    rows[r].append(int(b.y[r, t]))
    done.extend(v for v in rows.values() if v)
    return sorted(bytes(s[:-1]) + b"|" if s[-1] == BOUNDARY else bytes(s) for s in done)


def expected(corpus: Corpus) -> List[bytes]:
    return sorted(corpus.sequence(k) + b"|" for k in range(len(corpus)))


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, name=st.sampled_from(STRATEGIES), seed=st.integers(0, 3))
def test_every_target_of_every_sequence_once_per_epoch(lengths, B, T, name, seed):
    corpus = corpus_of(lengths, seed)
    for epoch in (0, 1):
        batches = list(layout(name, B, T, seed).epoch(corpus, epoch))
        for b in batches:
            b.check()
        assert segments(batches) == expected(corpus)
        # inputs are targets shifted by one within each sequence: x = [256, s...]
        for b in batches:
            counted = b.mask > 0
            starts = counted & (b.x == BOUNDARY)
            assert np.all(b.y[counted & ~starts] >= 0)


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
def test_reset_rules(lengths, B, T, seed):
    corpus = corpus_of(lengths, seed)
    for b in layout("packed", B, T, seed).epoch(corpus):
        # exactly at each sequence's first position: where the input is the boundary and counts
        np.testing.assert_array_equal(b.reset, (b.x == BOUNDARY) & (b.mask > 0))
    for b in layout("padded", B, T, seed).epoch(corpus):
        assert b.reset[:, 0].all() and not b.reset[:, 1:].any()
    batches = list(layout("reset_all", B, T, seed).epoch(corpus))
    assert batches[0].reset[:, 0].all(), "the first window of the epoch must reset"
    for b in batches:
        assert b.x.shape == (B, T)
        assert not b.reset[:, 1:].any()
        assert b.reset[:, 0].all() or not b.reset[:, 0].any()
    groups = -(-len(corpus) // B)
    assert sum(bool(b.reset[0, 0]) for b in batches) == groups   # only at group starts


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, name=st.sampled_from(STRATEGIES), seed=st.integers(0, 3))
def test_declared_guarantees_hold_on_every_batch(lengths, B, T, name, seed):
    """Every property conf/strategy/<name>.yaml guarantees (what a kernel's ``needs`` are checked
    against before a run starts) holds on every batch, by the check the backends run."""
    from backends.base import check_layout
    from benchmarks import registry

    guarantees = registry.strategy_guarantees()[name]
    for b in layout(name, B, T, seed).epoch(corpus_of(lengths, seed)):
        check_layout(b, guarantees, f"<guarantees of strategy={name}>")


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
def test_valid_tokens_equal_and_pad_fraction_direct(lengths, B, T, seed):
    corpus = corpus_of(lengths, seed)
    total_positions = int(corpus.positions.sum())
    for name in STRATEGIES:
        ep = layout(name, B, T, seed).epoch(corpus)
        batches = list(ep)
        stats = epoch_stats(ep)
        assert stats["valid_tokens"] == total_positions
        mask = np.concatenate([b.mask.ravel() for b in batches])
        assert stats["total_slots"] == mask.size
        assert stats["pad_fraction"] == pytest.approx(float((mask == 0).mean()))
        assert len(batches) == len(ep) == len(ep.shapes)
        assert [b.x.shape for b in batches] == list(ep.shapes)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, name=st.sampled_from(STRATEGIES), seed=st.integers(0, 3))
def test_same_seed_same_batches(lengths, B, T, name, seed):
    corpus = corpus_of(lengths, seed)
    a = list(layout(name, B, T, seed).epoch(corpus, 1))
    b = list(layout(name, B, T, seed).epoch(corpus, 1))
    assert len(a) == len(b)
    for u, v in zip(a, b):
        for f in ("x", "y", "mask", "reset"):
            np.testing.assert_array_equal(getattr(u, f), getattr(v, f))


def test_epochs_and_seeds_change_the_order():
    corpus = corpus_of(list(range(5, 45)))
    for name in STRATEGIES:
        a = np.concatenate([b.x.ravel() for b in layout(name, 4, 8, 0).epoch(corpus, 0)])
        b = np.concatenate([b.x.ravel() for b in layout(name, 4, 8, 0).epoch(corpus, 1)])
        c = np.concatenate([b.x.ravel() for b in layout(name, 4, 8, 1).epoch(corpus, 0)])
        assert not np.array_equal(a, b) and not np.array_equal(a, c), name


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 500), min_size=1, max_size=200), B=st.integers(1, 16))
def test_packed_streams_are_balanced(lengths, B):
    lengths = np.array(lengths)
    loads = np.bincount(balance_streams(lengths, B), weights=lengths, minlength=B)
    assert loads.sum() == lengths.sum()
    assert loads.max() - loads.min() <= lengths.max()   # LPT bound


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, B=B_st, m=st.integers(1, 16), seed=st.integers(0, 3))
def test_padded_width_is_longest_rounded(lengths, B, m, seed):
    corpus = corpus_of(lengths, seed)
    order = np.random.default_rng([seed, 0]).permutation(len(corpus))
    for g, b in enumerate(layout("padded", B, 8, seed, pad_multiple=m).epoch(corpus)):
        longest = corpus.positions[order[g * B:(g + 1) * B]].max()
        assert b.x.shape[1] == -(-longest // m) * m


def test_packed_padding_only_at_stream_ends():
    corpus = corpus_of([3, 17, 5, 9, 30, 2, 11])
    grid = Packed(3, 8).layout(corpus, np.arange(len(corpus)))
    for row in grid["mask"]:
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()


def test_kjv_epoch_layout_is_fast_enough_to_build():
    """A guard, not a benchmark: building a KJV-sized packed epoch stays vectorized."""
    rng = np.random.default_rng(0)
    corpus = corpus_of(list(rng.integers(10, 500, size=3000)))
    ep = Packed(32, 64).epoch(corpus)
    assert len(ep) > 0


def test_bad_sizes_are_config_errors():
    from backends.base import ConfigError
    with pytest.raises(ConfigError, match="train.batch_size"):
        Padded(0, 4)
    with pytest.raises(ConfigError, match="train.window"):
        ResetAll(2, -1)
    with pytest.raises(ConfigError, match="strategy"):
        make_layout("bucketed", 2, 2)
