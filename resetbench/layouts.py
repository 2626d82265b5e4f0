"""The layouts: a corpus epoch -> contract batches (:class:`resetbench.contract.Batch`). Pure NumPy.

``Packed`` is the packing loader: B streams of whole sequences, windows of T, a reset exactly at
each sequence start, state carried between windows. ``Padded`` and ``ResetAll`` are what
frameworks offer instead (docs/spec.md).

A strategy is a data layout, not a code path: every layout yields :class:`resetbench.contract.Batch`
and a backend treats them alike. Tokens are gathered with vectorized index arithmetic; the only
Python loops run over groups or sequences, never tokens.

Every layout class is constructed as ``Cls(batch_size, window, seed, **options)`` and refuses a bad
or unknown option with a :class:`ConfigError` naming ``strategy.<option>``. The benchmark builds
them from ``conf/strategy/<name>.yaml`` (``_target_`` and the options; ``benchmarks.registry``), so
a new strategy is a class here (or anywhere importable) and a yaml file there.

Every epoch visits every training sequence exactly once, in an order drawn from
``numpy.random.default_rng([seed, epoch])``, so every backend sees identical batches.
"""

from __future__ import annotations

import heapq
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from resetbench.contract import BOUNDARY, Batch, ConfigError, check_int
from resetbench.corpus import Corpus


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // int(m)) * int(m)


def gather(corpus: Corpus, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input/target ids of sequences ``ids`` laid end to end.

    Sequence ``k`` of n bytes gives n + 1 positions: inputs ``[256, s_1..s_n]``, targets
    ``[s_1..s_n, 256]``. Laid end to end, the targets are the inputs shifted left by one with a
    final boundary, so one gather builds both. Returns flat ``x``, ``y`` (int32) and the flat
    start position of each sequence.
    """
    ids = np.asarray(ids, np.int64)
    P = corpus.lengths[ids] + 1
    starts = np.cumsum(P) - P
    total = int(P.sum())
    data = corpus.shifted_ids()
    # flat position j of sequence k reads byte offsets[k] + (j - starts[k]) - 1, i.e. data[j + delta]
    delta = corpus.offsets[ids] - starts
    x = data[np.arange(total, dtype=np.int64) + np.repeat(delta, P)]
    x[starts] = BOUNDARY
    y = np.empty_like(x)
    y[:-1] = x[1:]
    if total:
        y[-1] = BOUNDARY
    return x, y, starts


def _grid(rows: int, cols: int) -> Dict[str, np.ndarray]:
    return {"x": np.zeros((rows, cols), np.int32), "y": np.zeros((rows, cols), np.int32),
            "mask": np.zeros((rows, cols), np.float32), "reset": np.zeros((rows, cols), bool)}


def _rows_of(corpus: Corpus, ids: np.ndarray, rows: int, cols: int) -> Dict[str, np.ndarray]:
    """One sequence per row, left-aligned, padded with mask 0 to ``cols``."""
    g = _grid(rows, cols)
    x, y, starts = gather(corpus, ids)
    P = corpus.positions[np.asarray(ids, np.int64)]
    which = np.repeat(np.arange(len(P)), P)
    pos = np.arange(len(x)) - np.repeat(starts, P)
    g["x"][which, pos] = x
    g["y"][which, pos] = y
    g["mask"][which, pos] = 1.0
    return g


def _batch(g: Mapping[str, np.ndarray], t0: int = 0, t1: int | None = None) -> Batch:
    sl = slice(t0, t1)
    return Batch(g["x"][:, sl], g["y"][:, sl], g["mask"][:, sl], g["reset"][:, sl])


class Footprint(NamedTuple):
    """What a layout materializes for an epoch (the benchmark's memory estimate reads it): the
    slots of its largest training batch, the slots it holds at once, the tokens it gathers at once."""

    step_slots: int
    held_slots: int
    gathered_tokens: int


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
        raise NotImplementedError(f"{type(self).__name__}.footprint: what an epoch materializes "
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
        """One batch at a time: B rows (or max_tokens' rows) as wide as the longest sequence."""
        width = _round_up(longest, self.pad_multiple)
        rows = self.B if self.max_tokens is None else _rows_for(width, self.max_tokens, self.row_multiple)
        return Footprint(rows * width, rows * width, 0)

    def batches(self, corpus: Corpus, epoch: int) -> List[Tuple[np.ndarray, int, int]]:
        """The epoch's batches as ``(sequence ids, rows, width)``, in training order."""
        return token_batches(self.order(corpus, epoch), corpus.positions, self.B, self.pad_multiple,
                             self.max_tokens, self.row_multiple)

    def epoch(self, corpus: Corpus, epoch: int = 0) -> Epoch:
        return padded_epoch(corpus, self.batches(corpus, epoch))


def padded_epoch(corpus: Corpus, batches: List[Tuple[np.ndarray, int, int]]) -> Epoch:
    """An epoch of padded batches ``(sequence ids, rows, width)``: one sequence per row, every row
    reset at column 0."""
    def make() -> Iterator[Batch]:
        for ids, rows, width in batches:
            g = _rows_of(corpus, ids, rows, width)
            g["reset"][:, 0] = True
            yield _batch(g)
    return Epoch([(rows, width) for _, rows, width in batches], make)


class ResetAll(Layout):
    """Keras-style stateful TBPTT: groups of B sequences padded to a multiple of the window T,
    cut into windows; the whole batch's state is reset only at a group's first window."""

    name = "reset_all"

    def epoch(self, corpus: Corpus, epoch: int = 0) -> Epoch:
        order, B, T, P = self.order(corpus, epoch), self.B, self.T, corpus.positions
        groups = [order[i:i + B] for i in range(0, len(order), B)]
        widths = [_round_up(P[ids].max(), T) for ids in groups]

        def make() -> Iterator[Batch]:
            for ids, width in zip(groups, widths):
                g = _rows_of(corpus, ids, B, width)
                g["reset"][:, 0] = True
                for t0 in range(0, width, T):
                    yield _batch(g, t0, t0 + T)
        return Epoch([(B, T)] * sum(w // T for w in widths), make)

    def footprint(self, tokens: int, longest: int) -> Footprint:
        """Windows of B x T, cut from one group of B rows padded to a multiple of T."""
        return Footprint(self.B * self.T, self.B * _round_up(longest, self.T), 0)


def balance_streams(lengths: np.ndarray, streams: int) -> np.ndarray:
    """Assign items to streams longest-first, each to the currently shortest stream (LPT).
    Ties are broken by the given order. Returns the stream of each item."""
    order = np.argsort(-lengths, kind="stable")
    heap = [(0, b) for b in range(streams)]
    assign = np.empty(len(lengths), np.int64)
    for k, n in zip(order.tolist(), lengths[order].tolist()):
        load, b = heapq.heappop(heap)
        assign[k] = b
        heapq.heappush(heap, (load + n, b))
    return assign


class Packed(Layout):
    """B streams, each a concatenation of whole sequences (balanced by LPT, shuffled within each
    stream); windows of T; ``reset`` True exactly at each sequence's first position; padding only
    at stream ends."""

    name = "packed"

    def layout(self, corpus: Corpus, order: np.ndarray) -> Dict[str, np.ndarray]:
        """The epoch as ``[B, W*T]`` arrays (W windows) for sequences visited in ``order``."""
        B, T = self.B, self.T
        P = corpus.positions[order]
        stream = balance_streams(P, B)
        # within a stream keep the random visiting order: sort by (stream, rank in order)
        seq_order = np.lexsort((np.arange(len(order)), stream))
        ids, stream, P = order[seq_order], stream[seq_order], P[seq_order]
        loads = np.bincount(stream, minlength=B, weights=P).astype(np.int64)
        width = max(_round_up(int(loads.max()) if len(loads) else 0, T), T)
        g = _grid(B, width)
        x, y, starts = gather(corpus, ids)                  # streams are contiguous in x, y
        reset = np.zeros(len(x), bool)
        reset[starts] = True
        begin = 0
        for b, load in enumerate(loads.tolist()):           # one copy per stream
            g["x"][b, :load] = x[begin:begin + load]
            g["y"][b, :load] = y[begin:begin + load]
            g["reset"][b, :load] = reset[begin:begin + load]
            g["mask"][b, :load] = 1.0
            begin += load
        return g

    def epoch(self, corpus: Corpus, epoch: int = 0) -> Epoch:
        g = self.layout(corpus, self.order(corpus, epoch))
        T = self.T
        n = g["x"].shape[1] // T

        def make() -> Iterator[Batch]:
            for w in range(n):
                yield _batch(g, w * T, (w + 1) * T)
        return Epoch([(self.B, T)] * n, make)

    def footprint(self, tokens: int, longest: int) -> Footprint:
        """The whole epoch as ``[B, W*T]`` (each stream's load is at most tokens / B + the
        longest sequence, the LPT bound), and every token gathered at once."""
        width = max(_round_up(-(-int(tokens) // self.B) + int(longest), self.T), self.T)
        return Footprint(self.B * self.T, self.B * width, int(tokens))


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
