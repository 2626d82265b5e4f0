"""Each layout class's own rules (docs/spec.md section 2) on random corpora: where it resets, how it
pads, how packed balances its streams. The properties every strategy shares (every target once,
determinism, the guarantees its yaml declares) are checked over conf/strategy/ in tests/test_plugins.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from backends.base import BOUNDARY
from resetbench.layouts import Packed, Padded, ResetAll, balance_streams
from tests.test_plugins import B_st, T_st, corpus_of, lengths_st


@settings(max_examples=60, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
def test_reset_rules(lengths, B, T, seed):
    corpus = corpus_of(lengths, seed)
    for b in Packed(B, T, seed).epoch(corpus):
        # exactly at each sequence's first position: where the input is the boundary and counts
        np.testing.assert_array_equal(b.reset, (b.x == BOUNDARY) & (b.mask > 0))
    for b in Padded(B, T, seed).epoch(corpus):
        assert b.reset[:, 0].all() and not b.reset[:, 1:].any()
    batches = list(ResetAll(B, T, seed).epoch(corpus))
    assert batches[0].reset[:, 0].all(), "the first window of the epoch must reset"
    for b in batches:
        assert b.x.shape == (B, T)
        assert not b.reset[:, 1:].any()
        assert b.reset[:, 0].all() or not b.reset[:, 0].any()
    groups = -(-len(corpus) // B)
    assert sum(bool(b.reset[0, 0]) for b in batches) == groups   # only at group starts


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
    for g, b in enumerate(Padded(B, 8, seed, pad_multiple=m).epoch(corpus)):
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
    with pytest.raises(ConfigError, match="strategy.pad_multiple"):
        Padded(2, 2, pad_multiple=0)
    with pytest.raises(ConfigError, match="strategy.bucket_size"):
        Packed(2, 2, bucket_size=4)
