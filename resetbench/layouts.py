"""The layouts: a corpus epoch -> contract batches (:class:`resetbench.contract.Batch`). Pure NumPy.

``Packed`` is the packing loader: B streams of whole sequences, windows of T, a reset exactly at
each sequence start, state carried between windows. ``Padded`` and ``ResetAll`` are what
frameworks offer instead (docs/spec.md).

A strategy is a data layout, not a code path: every layout yields :class:`resetbench.contract.Batch`
and a backend treats them alike. Every layout is lazy: an epoch holds an index computed from the
sequence lengths alone (O(sequences)) and gathers each batch's tokens from the corpus bytes when
the batch is reached (O(B x T)), so no layout's memory grows with the tokens. Tokens are gathered
with vectorized index arithmetic; the only Python loops run over windows, groups or sequences,
never tokens.

Every layout class is constructed as ``Cls(batch_size, window, seed, **options)`` and refuses a bad
or unknown option with a :class:`ConfigError` naming ``strategy.<option>``. The benchmark builds
them from ``conf/strategy/<name>.yaml`` (``_target_`` and the options; ``benchmarks.registry``), so
a new strategy is a class here (or anywhere importable) and a yaml file there.

Every epoch visits every training sequence exactly once, in an order drawn from
``numpy.random.default_rng([seed, epoch])``, so every backend sees identical batches.
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from resetbench.contract import BOUNDARY, Batch, ConfigError, check_int
from resetbench.corpus import Corpus


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // int(m)) * int(m)


def _source(corpus: Corpus) -> np.ndarray:
    """The bytes to gather from: ``corpus.data`` itself (uint8, never copied), or one dummy byte
    when the corpus has none, so that a clipped index is always valid."""
    return corpus.data if len(corpus.data) else np.zeros(1, np.uint8)


def _tokens(data: np.ndarray, start: np.ndarray, length: np.ndarray, j: np.ndarray,
            valid: np.ndarray) -> Batch:
    """The batch whose slot reads position ``j`` of a sequence of ``length`` bytes at byte
    ``start`` of ``data`` where ``valid`` (arrays broadcast to one [rows, cols] shape).

    Sequence of n bytes ``s_1..s_n`` at position j (0..n): input ``256`` at j = 0 else ``s_j``,
    target ``s_{j+1}``, or ``256`` at j = n; reset exactly at j = 0. Invalid slots are padding
    (ids 0, mask 0, no reset). Only these slots' bytes are read."""
    pos = start + j
    x = np.take(data, pos - 1, mode="clip").astype(np.int32)     # clip: padding reads any byte
    y = np.take(data, pos, mode="clip").astype(np.int32)
    first = j == 0
    np.copyto(x, BOUNDARY, where=first)
    np.copyto(y, BOUNDARY, where=j == length)
    padding = ~valid
    np.copyto(x, 0, where=padding)
    np.copyto(y, 0, where=padding)
    return Batch(x, y, valid.astype(np.float32), valid & first)


def _rows(corpus: Corpus, ids: np.ndarray, rows: int, t0: int, cols: int) -> Batch:
    """One sequence per row (``ids``, then empty rows up to ``rows``), positions ``t0 .. t0+cols``
    of each, padded with mask 0; every row, empty ones too, reset at column 0 when ``t0 == 0``
    (a sequence's or a group's first window), nowhere else."""
    ids = np.asarray(ids, np.int64)
    start = np.zeros((rows, 1), np.int64)
    length = np.full((rows, 1), -1, np.int64)          # an empty row has no position at all
    start[:len(ids), 0] = corpus.offsets[ids]
    length[:len(ids), 0] = corpus.offsets[ids + 1] - start[:len(ids), 0]
    j = np.arange(t0, t0 + cols, dtype=np.int64)[None, :]
    batch = _tokens(_source(corpus), start, length, j, j <= length)
    batch.reset[:] = False
    batch.reset[:, 0] = t0 == 0
    return batch


class Footprint(NamedTuple):
    """What a layout holds for an epoch (the benchmark's memory estimate reads it): the slots of
    its largest training batch, the slots it holds at once, the slots it gathers at once, and the
    bytes per sequence its epoch index peaks at (order, streams: O(sequences), never O(tokens))."""

    step_slots: int
    held_slots: int
    gathered_tokens: int
    sequence_bytes: int = 0


# bytes per sequence at the peak of building an epoch's index (tracemalloc: packed ~89 for the
# order, LPT assignment, stable sort and Streams; padded/bucketed/reset_all ~31 for the order and
# the batch list)
PACKED_SEQUENCE_BYTES = 96
ROWS_SEQUENCE_BYTES = 32


def _streaming_footprint(slots: int, sequence_bytes: int) -> Footprint:
    """A layout that builds one batch of ``slots`` at a time, gathering only its tokens."""
    return Footprint(slots, slots, slots, sequence_bytes)


class Layout:
    """Base: ``epoch(corpus, epoch)`` returns an :class:`Epoch` (sized, iterable of batches).

    A subclass takes its options as keyword arguments, checks each (ConfigError naming
    ``strategy.<option>``) and passes the rest here, where any left is refused as unknown."""

    name = "abstract"

    def __init__(self, batch_size: int, window: int, seed: int = 0, **options: Any):
        self.B = check_int("train.batch_size", batch_size)
        self.T = check_int("train.window", window)
        self.seed = check_int("train.seed", seed, minimum=0)
        if options:
            key = next(iter(options))
            raise ConfigError(f"strategy.{key}", options[key], f"not an option of strategy={self.name}")

    def order(self, corpus: Corpus, epoch: int) -> np.ndarray:
        """The epoch's seeded visiting order of sequence ids."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(corpus))

    def epoch(self, corpus: Corpus, epoch: int = 0) -> "Epoch":
        raise NotImplementedError

    def footprint(self, tokens: int, longest: int) -> Footprint:
        """The :class:`Footprint` of an epoch of ``tokens`` target positions whose longest
        sequence has ``longest`` (an upper bound; sizes a run before any data is loaded)."""
        raise NotImplementedError(f"{type(self).__name__}.footprint: what an epoch holds "
                                  f"(the benchmark's memory estimate needs it)")


class Epoch:
    """An epoch's batches: ``len()`` is known up front, batches are built lazily on iteration."""

    def __init__(self, shapes: List[Tuple[int, int]], make):
        self.shapes, self._make = shapes, make    # the (B, T) of every batch, in order

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[Batch]:
        return self._make()


class Padded(Layout):
    """B sequences per batch in the epoch's random order, padded to the batch's longest (rounded
    up to ``pad_multiple``), ``reset[:, 0] = True``; full backpropagation through each sequence.
    ``max_tokens`` bounds rows x padded length per batch instead of B rows (:func:`token_batches`)."""

    name = "padded"

    def __init__(self, batch_size: int, window: int, seed: int = 0, pad_multiple: int = 1,
                 max_tokens: Optional[int] = None, row_multiple: int = 1, **options: Any):
        super().__init__(batch_size, window, seed, **options)
        self.pad_multiple = check_int("strategy.pad_multiple", pad_multiple)
        self.max_tokens = check_int("strategy.max_tokens", max_tokens, allow_none=True)
        self.row_multiple = check_int("strategy.row_multiple", row_multiple)

    def footprint(self, tokens: int, longest: int) -> Footprint:
        """One batch at a time, gathered straight from the corpus: B rows (or max_tokens' rows)
        as wide as the longest sequence."""
        width = _round_up(longest, self.pad_multiple)
        rows = self.B if self.max_tokens is None else _rows_for(width, self.max_tokens, self.row_multiple)
        return _streaming_footprint(rows * width, ROWS_SEQUENCE_BYTES)

    def batches(self, corpus: Corpus, epoch: int) -> List[Tuple[np.ndarray, int, int]]:
        """The epoch's batches as ``(sequence ids, rows, width)``, in training order."""
        return token_batches(self.order(corpus, epoch), corpus.positions, self.B, self.pad_multiple,
                             self.max_tokens, self.row_multiple)

    def epoch(self, corpus: Corpus, epoch: int = 0) -> Epoch:
        return padded_epoch(corpus, self.batches(corpus, epoch))


def padded_epoch(corpus: Corpus, batches: List[Tuple[np.ndarray, int, int]]) -> Epoch:
    """An epoch of padded batches ``(sequence ids, rows, width)``: one sequence per row, every row
    reset at column 0; each batch gathered from the corpus when it is reached."""
    def make() -> Iterator[Batch]:
        for ids, rows, width in batches:
            yield _rows(corpus, ids, rows, 0, width)
    return Epoch([(rows, width) for _, rows, width in batches], make)


class ResetAll(Layout):
    """Keras-style stateful TBPTT: groups of B sequences padded to a multiple of the window T,
    cut into windows; the whole batch's state is reset only at a group's first window. Each
    window is gathered from the corpus when it is reached."""

    name = "reset_all"

    def epoch(self, corpus: Corpus, epoch: int = 0) -> Epoch:
        order, B, T = self.order(corpus, epoch), self.B, self.T
        widths = _group_widths(corpus.positions[order], B, T)

        def make() -> Iterator[Batch]:
            for g, width in enumerate(widths.tolist()):
                ids = order[g * B:(g + 1) * B]
                for t0 in range(0, width, T):
                    yield _rows(corpus, ids, B, t0, T)
        return Epoch([(B, T)] * int(widths.sum() // T), make)

    def footprint(self, tokens: int, longest: int) -> Footprint:
        """One window of B x T at a time."""
        return _streaming_footprint(self.B * self.T, ROWS_SEQUENCE_BYTES)


def _group_widths(positions: np.ndarray, B: int, T: int) -> np.ndarray:
    """Width of each group of B consecutive sequences: its longest, rounded up to a multiple of T."""
    if len(positions) == 0:
        return np.zeros(0, np.int64)
    longest = np.maximum.reduceat(positions, np.arange(0, len(positions), B))
    return -(-longest // T) * T


def balance_streams(lengths: np.ndarray, streams: int) -> np.ndarray:
    """Assign items to streams longest-first, each to the currently shortest stream (LPT).
    Ties are broken by the given order. Returns the stream of each item.

    Needs only the lengths; walks them in chunks, so no Python list of every item is ever held."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    heap = [(0, b) for b in range(streams)]
    assign = np.empty(len(lengths), np.int64)
    for c in range(0, len(order), _CHUNK):
        ks = order[c:c + _CHUNK]
        for k, n in zip(ks.tolist(), lengths[ks].tolist()):
            load, b = heap[0]                           # the shortest stream (lowest index on ties)
            assign[k] = b
            heapq.heapreplace(heap, (load + n, b))
    return assign


_CHUNK = 1 << 16


class Streams(NamedTuple):
    """Where a packed epoch's sequences lie, from their lengths alone (O(sequences)): sequence
    ``k`` (in stream order) fills slots ``first[k] .. first[k] + length[k]`` (its n + 1
    positions), slot ``b * width + t`` being column t of stream b, and reads bytes from ``start[k]``."""

    first: np.ndarray     # int64 [N], strictly increasing
    start: np.ndarray     # int64 [N]: byte offset in corpus.data
    length: np.ndarray    # int64 [N]: bytes (positions - 1)
    width: int            # columns per stream, a multiple of T


def pack_streams(corpus: Corpus, order: np.ndarray, B: int, T: int) -> Streams:
    """Deal the sequences visited in ``order`` to B streams (LPT, :func:`balance_streams`), keep
    the visiting order within each stream, and place each stream's sequences end to end."""
    P = corpus.positions[order]
    stream = balance_streams(P, B)
    seq_order = np.argsort(stream, kind="stable")       # by stream, in visiting order within one
    ids, stream, P = order[seq_order], stream[seq_order], P[seq_order]
    del seq_order
    loads = np.bincount(stream, minlength=B, weights=P).astype(np.int64)
    width = max(_round_up(int(loads.max()) if len(loads) else 0, T), T)
    first = np.cumsum(P) - P                            # where it starts, the streams end to end
    first += (np.arange(B, dtype=np.int64) * width - (np.cumsum(loads) - loads))[stream]
    del stream, P
    start = corpus.offsets[ids]
    return Streams(first, start, corpus.offsets[ids + 1] - start, width)


def packed_window(streams: Streams, data: np.ndarray, B: int, T: int, w: int) -> Batch:
    """Window ``w`` of packed streams: the sequence and position of each of its B x T slots
    (:func:`slot_sequences`), then only those slots' bytes read from ``data``."""
    row0 = np.arange(B, dtype=np.int64) * streams.width + w * T      # the slot of each row's column 0
    slot = row0[:, None] + np.arange(T)
    if len(streams.first) == 0:
        return _tokens(data, slot, slot, slot, slot < 0)
    k = slot_sequences(streams.first, row0, T)
    before = k < 0                                      # no sequence yet (LPT fills stream 0 first)
    k[before] = 0
    j = slot - streams.first[k]
    length = streams.length[k]
    return _tokens(data, streams.start[k], length, j, ~before & (j <= length))


def slot_sequences(first: np.ndarray, row0: np.ndarray, T: int) -> np.ndarray:
    """For the slots ``row0[b] + t`` (t < T) the last sequence ``k`` with ``first[k] <= slot``
    (-1 if none), ``[len(row0), T]``. ``first`` is increasing, so two binary searches per row find
    the sequences starting inside it; a running count of those starts gives every slot's."""
    lo = np.searchsorted(first, row0)                   # first sequence starting at or after column 0
    counts = np.searchsorted(first, row0 + T) - lo      # sequences starting inside the row
    rows = np.repeat(np.arange(len(row0)), counts)
    ks = np.arange(len(rows)) + np.repeat(lo - (np.cumsum(counts) - counts), counts)
    starts = np.zeros((len(row0), T), np.int64)
    starts[rows, first[ks] - row0[rows]] = 1
    np.cumsum(starts, axis=1, out=starts)
    starts += (lo - 1)[:, None]
    return starts


class Packed(Layout):
    """B streams, each a concatenation of whole sequences (balanced by LPT, shuffled within each
    stream); windows of T; ``reset`` True exactly at each sequence's first position; padding only
    at stream ends. Lazy: an epoch holds where each sequence lies (:class:`Streams`, computed
    from the lengths) and gathers one window's B x T tokens at a time."""

    name = "packed"

    def epoch(self, corpus: Corpus, epoch: int = 0) -> Epoch:
        return self.epoch_in_order(corpus, self.order(corpus, epoch))

    def epoch_in_order(self, corpus: Corpus, order: np.ndarray) -> Epoch:
        """The epoch of sequences visited in ``order``."""
        B, T = self.B, self.T
        streams = pack_streams(corpus, order, B, T)
        n = streams.width // T

        def make() -> Iterator[Batch]:
            data = _source(corpus)
            for w in range(n):
                yield packed_window(streams, data, B, T, w)
        return Epoch([(B, T)] * n, make)

    def layout(self, corpus: Corpus, order: np.ndarray) -> Dict[str, np.ndarray]:
        """The epoch as ``[B, W*T]`` arrays (W windows side by side) for sequences visited in
        ``order``. O(tokens): for tests and small corpora."""
        batches = list(self.epoch_in_order(corpus, order))
        return {f: np.concatenate([getattr(b, f) for b in batches], axis=1) for f in ("x", "y", "mask", "reset")}

    def footprint(self, tokens: int, longest: int) -> Footprint:
        """One window of B x T at a time."""
        return _streaming_footprint(self.B * self.T, PACKED_SEQUENCE_BYTES)


def token_batches(ids: np.ndarray, positions: np.ndarray, batch_size: int, pad_multiple: int,
                  max_tokens: Optional[int] = None, row_multiple: int = 1) -> List[Tuple[np.ndarray, int, int]]:
    """Cut the sequences ``ids`` (in this order) into padded batches: ``(ids, rows, width)``.

    Without ``max_tokens``: ``batch_size`` sequences per batch, ``rows = batch_size``. With it
    (fairseq's ``--max-tokens``): as many sequences as fit ``rows x width <= max_tokens``, where
    ``width`` is the longest rounded up to ``pad_multiple`` and ``rows`` is a multiple of
    ``row_multiple`` (empty rows pad a batch up to it). Each width then has one row count, so
    compiling backends see few batch shapes."""
    P = positions[ids]
    out: List[Tuple[np.ndarray, int, int]] = []
    start, n = 0, len(ids)
    while start < n:
        if max_tokens is None:
            end = min(start + batch_size, n)
            out.append((ids[start:end], batch_size, _round_up(P[start:end].max(), pad_multiple)))
            start = end
            continue
        end, width = start + 1, _round_up(P[start], pad_multiple)
        while end < n:
            w = max(width, _round_up(P[end], pad_multiple))
            if _rows_for(w, max_tokens, row_multiple) < end + 1 - start:
                break
            end, width = end + 1, w
        rows = _rows_for(width, max_tokens, row_multiple)
        end = min(end, start + rows)
        out.append((ids[start:end], rows, width))
        start = end
    return out


def _rows_for(width: int, max_tokens: int, row_multiple: int) -> int:
    """Rows of a batch of this width under ``max_tokens``: a multiple of ``row_multiple`` (at least one)."""
    return max(row_multiple, (max_tokens // width) // row_multiple * row_multiple)


class Bucketed(Padded):
    """Length bucketing, what practitioners use instead of packing (torchtext's BucketIterator,
    tf.data's ``bucket_by_sequence_length``, fairseq's batching): padded batches of sequences of
    similar length. The epoch's random order is cut into pools of ``pool_batches x B`` sequences;
    each pool is sorted by length and cut into batches; the epoch's batches are then shuffled.
    Otherwise as :class:`Padded` (``pad_multiple``, ``max_tokens``, reset at column 0)."""

    name = "bucketed"

    def __init__(self, batch_size: int, window: int, seed: int = 0, pool_batches: int = 100,
                 pad_multiple: int = 16, **options: Any):
        super().__init__(batch_size, window, seed, pad_multiple=pad_multiple, **options)
        self.pool_batches = check_int("strategy.pool_batches", pool_batches)

    def batches(self, corpus: Corpus, epoch: int) -> List[Tuple[np.ndarray, int, int]]:
        order, P = self.order(corpus, epoch), corpus.positions
        pool = self.pool_batches * self.B
        out: List[Tuple[np.ndarray, int, int]] = []
        for start in range(0, len(order), pool):
            ids = order[start:start + pool]
            out += token_batches(ids[np.argsort(P[ids], kind="stable")], P, self.B, self.pad_multiple,
                                 self.max_tokens, self.row_multiple)
        shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(out))
        return [out[k] for k in shuffle]


def eval_batches(corpus: Corpus, batch_size: int, window: int) -> Epoch:
    """Eval layout: packed streams of the eval set. Resets at every sequence start make this
    exactly 'each sequence from a zero state', whatever strategy trained the model."""
    return Packed(batch_size, window).epoch(corpus, 0)


def epoch_stats(epoch: Epoch) -> Dict[str, float]:
    """valid tokens, total slots and pad fraction of a whole epoch (iterates it)."""
    valid = total = 0
    for b in epoch:
        valid += b.valid_tokens
        total += b.total_slots
    return {"valid_tokens": valid, "total_slots": total,
            "pad_fraction": 1.0 - valid / total if total else 0.0}
