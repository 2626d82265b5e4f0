"""When training stops (:class:`StopRule`) and how its steps are timed (:class:`StepTimer`).

Timing follows the contract: the device is synchronized before every clock read; the first
``train.warmup_steps`` steps train but are not timed (their time is reported as compilation);
each new batch shape is compiled ahead of time (``Backend.precompile``) outside the clock; the
training clock excludes compilation and evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass
class Progress:
    """How far training got: completed steps, epochs, valid tokens and slots, the last loss."""

    step: int = 0
    epoch: int = 0
    valid: int = 0
    slots: int = 0
    loss: Optional[float] = None

    @property
    def pad_fraction(self) -> Optional[float]:
        return (1.0 - self.valid / self.slots) if self.slots else None


class StopRule:
    """Stop at the first of ``steps``, ``epochs``, ``time_budget_s`` (training clock) and
    ``max_valid_tokens``; None means no limit of that kind. The reason is recorded as
    ``stop_reason``: ``steps``, ``epochs``, ``time_budget`` or ``token_budget``."""

    def __init__(self, steps: Optional[int] = None, epochs: Optional[int] = None,
                 time_budget_s: Optional[float] = None, max_valid_tokens: Optional[int] = None):
        self.steps = math.inf if steps is None else int(steps)
        self.epochs = epochs
        self.time_budget_s = time_budget_s
        self.max_valid_tokens = max_valid_tokens

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> "StopRule":
        return cls(train.get("steps"), train.get("epochs"), train.get("time_budget_s"), train.get("max_valid_tokens"))

    @property
    def total_steps(self) -> Optional[int]:
        return None if self.steps == math.inf else int(self.steps)

    def before_epoch(self, p: Progress) -> Optional[str]:
        if self.epochs is not None and p.epoch >= int(self.epochs):
            return "epochs"
        return "steps" if p.step >= self.steps else None

    def before_step(self, p: Progress, elapsed_s: float) -> Optional[str]:
        if p.step >= self.steps:
            return "steps"
        if self.time_budget_s is not None and elapsed_s >= float(self.time_budget_s):
            return "time_budget"
        if self.max_valid_tokens is not None and p.valid >= int(self.max_valid_tokens):
            return "token_budget"
        return None


class StepTimer:
    """Runs and times training steps of ``backend``; keeps the training clock.

    ``step(batch)`` compiles a new batch shape first (outside the clock), runs one train step,
    synchronizes the device, reads the loss, and counts the step as timed once ``warmup`` steps
    have run. ``excluded()`` wraps work that the training clock must not count (evaluation)."""

    def __init__(self, backend: Any, warmup: int):
        self.backend = backend
        self.warmup = int(warmup)
        self.steps = 0                    # steps run (warm-up included)
        self.timed_steps = 0
        self.timed_valid = 0
        self.timed_time = 0.0
        self.step_time = 0.0              # every step's time, warm-up included
        self.compile_time = 0.0           # precompile + warm-up steps
        self.excluded_time = 0.0          # compilation and evaluation: off the training clock
        self.step_times: List[float] = []
        self.step_rates: List[float] = []
        self._compiled = set()
        self._t0 = time.perf_counter()

    def start(self) -> None:
        """Start the training clock."""
        self._t0 = time.perf_counter()
        self.excluded_time = 0.0

    def elapsed(self) -> float:
        """Training clock: wall time since :meth:`start` without compilation and evaluation."""
        return time.perf_counter() - self._t0 - self.excluded_time

    @contextlib.contextmanager
    def excluded(self) -> Iterator[List[float]]:
        """Keep the block off the training clock; yields a list that receives its seconds."""
        out: List[float] = []
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            self.backend.synchronize()
            dt = time.perf_counter() - t0
            self.excluded_time += dt
            out.append(dt)

    def compile(self, train_shapes: Sequence[Tuple[int, int]], eval_shapes: Sequence[Tuple[int, int]] = ()) -> None:
        """Ahead-of-time compilation, counted as compile time, off the training clock."""
        with self.excluded() as dt:
            self.backend.precompile(list(train_shapes), list(eval_shapes))
        self.compile_time += dt[0]
        self._compiled.update(tuple(s) for s in train_shapes)

    def step(self, batch: Any) -> Tuple[float, float, bool]:
        """One training step: ``(loss, seconds, timed)``."""
        if batch.shape not in self._compiled:
            self.compile([batch.shape])
        t0 = time.perf_counter()
        loss_value = self.backend.train_step(batch)
        self.backend.synchronize()
        loss = float(loss_value)
        dt = time.perf_counter() - t0
        timed = self.steps >= self.warmup
        self.steps += 1
        self.step_time += dt
        if timed:
            valid = batch.valid_tokens
            self.timed_steps += 1
            self.timed_valid += valid
            self.timed_time += dt
            self.step_times.append(dt)
            self.step_rates.append(valid / dt if dt > 0 else 0.0)
        else:
            self.compile_time += dt
        return loss, dt, timed

    def rate(self) -> float:
        return self.timed_valid / self.timed_time if self.timed_time > 0 else 0.0

    def fields(self) -> dict:
        """The timing fields of the run summary."""
        wall = self.elapsed()
        return {"warmup_steps": min(self.warmup, self.steps), "timed_steps": self.timed_steps,
                "timed_valid_tokens": self.timed_valid, "train_time_s": self.timed_time, "train_wall_s": wall,
                "compile_time_s": self.compile_time,
                "valid_tokens_per_s": self.rate() if self.timed_time > 0 else None,
                "step_time_median_s": float(np.median(self.step_times)) if self.step_times else None,
                "valid_tokens_per_s_median": float(np.median(self.step_rates)) if self.step_rates else None,
                "harness_overhead_fraction": (max(wall - self.step_time, 0.0) / wall)
                if self.steps and wall > 0 else None}
