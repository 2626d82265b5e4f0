"""The batch contract every layout produces and every layer consumes, and the one error type.

Tokens are bytes: ids 0..255, plus :data:`BOUNDARY` (256) that starts every sequence's inputs and
ends its targets, so the vocabulary has :data:`VOCAB` = 257 ids. A :class:`Batch` is four NumPy
arrays ``[B, T]``; the reset rule is: row ``b``'s state is set to zero before step ``t`` where
``reset[b, t]`` (docs/spec.md). NumPy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import numpy as np

VOCAB = 257          # byte ids 0..255 plus the boundary token
BOUNDARY = 256       # the boundary token id


class ConfigError(ValueError):
    """A user error: bad config value, bad file. Printed as one line, no traceback."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = "null" if value is None else repr(value)
        super().__init__(f"{key}={shown}: {allowed}")


def check_int(key: str, value: Any, minimum: int = 1, allow_none: bool = False) -> Any:
    """``value`` as an int when it is an integer >= ``minimum`` (a bool is not), None when it is
    None and ``allow_none``; else a ConfigError naming ``key``. Plug-ins check their options with it."""
    if value is None and allow_none:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
    raise ConfigError(key, value, f"must be {what}" + (" or null" if allow_none else ""))


@dataclasses.dataclass
class Batch:
    """A contract batch: what every strategy yields and every backend eats.

    ``x``, ``y``: int32 [B, T] ids; ``mask``: float32 [B, T], 1 where the target counts;
    ``reset``: bool [B, T], True where the row's state is zeroed before consuming ``x[b, t]``.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    reset: np.ndarray

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.x.shape)  # type: ignore[return-value]

    @property
    def valid_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def total_slots(self) -> int:
        return int(self.x.size)

    def check(self) -> "Batch":
        """Assert dtypes, shapes and id ranges; returns self. Cheap; used by tests and adapters."""
        B, T = self.x.shape
        for name, arr, dtype in (("x", self.x, np.int32), ("y", self.y, np.int32),
                                 ("mask", self.mask, np.float32), ("reset", self.reset, np.bool_)):
            if arr.shape != (B, T) or arr.dtype != dtype:
                raise ValueError(f"batch.{name}: {arr.dtype}{list(arr.shape)}, expected "
                                 f"{np.dtype(dtype)}[{B}, {T}]")
        for name, arr in (("x", self.x), ("y", self.y)):
            if arr.size and (arr.min() < 0 or arr.max() >= VOCAB):
                raise ValueError(f"batch.{name}: ids outside 0..{VOCAB - 1}")
        return self
