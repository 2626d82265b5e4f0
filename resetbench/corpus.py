"""A corpus: many byte sequences in one array, so layouts can gather tokens with vectorized NumPy."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Dict, Sequence

import numpy as np


@dataclasses.dataclass
class Corpus:
    """Sequences of bytes: sequence ``k`` is ``data[offsets[k]:offsets[k+1]]``."""

    data: np.ndarray      # uint8 [total bytes]
    offsets: np.ndarray   # int64 [N + 1]

    @classmethod
    def from_sequences(cls, seqs: Sequence[bytes]) -> "Corpus":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(seqs), dtype=np.uint8).copy()
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Bytes per sequence (a sequence of n bytes has n + 1 target positions)."""
        return np.diff(self.offsets)

    @property
    def positions(self) -> np.ndarray:
        """Target positions per sequence: n + 1 (the boundary target included)."""
        return self.lengths + 1

    def sequence(self, k: int) -> bytes:
        return self.data[self.offsets[k]:self.offsets[k + 1]].tobytes()

    def subset(self, ids: np.ndarray) -> "Corpus":
        ids = np.asarray(ids, np.int64)
        return Corpus.from_sequences([self.sequence(int(k)) for k in ids])

    def hash_update(self, h: "hashlib._Hash") -> None:
        h.update(self.offsets.astype("<i8").tobytes())
        h.update(self.data.tobytes())

    def stats(self) -> Dict[str, Any]:
        """Sequence count and length statistics (in target positions, n + 1)."""
        p = self.positions
        if len(p) == 0:
            return {"sequences": 0, "tokens": 0}
        return {"sequences": int(len(p)), "tokens": int(p.sum()), "len_mean": float(p.mean()),
                "len_median": float(np.median(p)), "len_min": int(p.min()), "len_max": int(p.max()),
                "len_p95": float(np.percentile(p, 95)), "len_std": float(p.std())}
