"""The run summary (``summary.json``): one typed record that the harness writes and the collector reads.

Every field is listed here once, with its meaning; the file is flat, strict JSON (NaN and inf are
written as null), and also carries the framework versions (``<package>_version``) and the data
statistics (``train_*``, ``eval_*``) of :meth:`benchmarks.data.Dataset.summary` as extra keys.
``schema`` numbers the layout: files written before it existed read as schema 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

SCHEMA = 2
# status of a run; the collector adds ``stale`` (``running``, but its process is gone) and
# ``malformed`` (no readable summary)
STATUSES = ("running", "completed", "interrupted", "terminated", "diverged", "failed")
FINAL = tuple(s for s in STATUSES if s != "running")


@dataclasses.dataclass
class RunSummary:
    """What ``summary.json`` holds. ``None`` means not known (yet), e.g. eval loss of a run that
    stopped before its evaluation."""

    # -- identity: what ran (from the config, known before anything starts) --------------------
    schema: int = SCHEMA
    status: str = "running"
    stop_reason: Optional[str] = None       # steps, epochs, time_budget, token_budget, or the status
    error: Optional[str] = None             # one line, for failed runs
    exit_code: Optional[int] = None         # of the run's process, filled in when it has ended
    experiment: Optional[str] = None
    backend: Optional[str] = None
    strategy: Optional[str] = None
    data: Optional[str] = None
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    window: Optional[int] = None
    embed: Optional[int] = None
    hidden: Optional[int] = None
    layers: Optional[int] = None
    cell: Optional[str] = None              # model.cell: lstm, gru (a file in conf/cell/)
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    clip_norm: Optional[float] = None
    kernel_option: Optional[str] = None     # backend.kernel as configured
    kernel_role: Optional[str] = None       # its declared role: exact, native or peer (conf/backend/*.yaml)
    # -- where it ran ------------------------------------------------------------------------------
    kernel: Optional[str] = None            # the implementation path that ran (backend's name for it)
    device: Optional[str] = None
    framework_version: Optional[str] = None
    process_id: Optional[int] = None        # the process that trained (one per run)
    parent_process_id: Optional[int] = None  # the run.py process that started it
    process_start_ticks: Optional[int] = None
    host: Optional[str] = None
    host_cpu: Optional[str] = None
    host_cores: Optional[int] = None
    host_memory_bytes: Optional[int] = None
    platform: Optional[str] = None
    python_version: Optional[str] = None
    numpy_version: Optional[str] = None
    malloc: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    # -- was the machine quiet? --------------------------------------------------------------------
    load_avg_start: Optional[float] = None
    load_avg_end: Optional[float] = None
    other_cpu_before: Optional[float] = None   # cores used by other processes while the run set up
    other_cpu_during: Optional[float] = None   # ... and during the timed steps
    busy: Optional[bool] = None                # other processes used the cores: timings unreliable
    # -- data ----------------------------------------------------------------------------------
    data_source: Optional[str] = None
    data_hash: Optional[str] = None
    # -- training --------------------------------------------------------------------------------
    steps: Optional[int] = None
    epochs_done: Optional[int] = None
    valid_tokens: Optional[int] = None
    total_slots: Optional[int] = None
    pad_fraction: Optional[float] = None
    warmup_steps: Optional[int] = None
    timed_steps: Optional[int] = None
    timed_valid_tokens: Optional[int] = None
    train_time_s: Optional[float] = None               # timed steps only
    train_wall_s: Optional[float] = None               # training loop wall time, evaluation and compilation excluded
    compile_time_s: Optional[float] = None             # ahead-of-time compilation and warm-up steps
    valid_tokens_per_s: Optional[float] = None
    valid_tokens_per_s_median: Optional[float] = None
    step_time_median_s: Optional[float] = None
    train_loss_last: Optional[float] = None
    harness_overhead_fraction: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    peak_mem_kind: Optional[str] = None     # host_rss (this run's process) or device
    # -- evaluation --------------------------------------------------------------------------------
    eval_loss: Optional[float] = None
    eval_tokens: Optional[int] = None
    eval_bits_per_byte: Optional[float] = None
    eval_time_s: Optional[float] = None
    targets: Optional[List[float]] = None    # eval.targets; ``ttt_<axis>@<target>`` extras say when each was reached
    # -- the composed config, and extras (``*_version``, data statistics) ---------------------------
    config: Dict[str, Any] = dataclasses.field(default_factory=dict)
    extras: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RunSummary":
        """The identity fields, from a composed config (plain dict): what a run is before it ran."""
        def get(*path, default=None):
            node: Any = cfg
            for p in path:
                if not isinstance(node, Mapping) or p not in node:
                    return default
                node = node[p]
            return node
        return cls(experiment=get("experiment"), backend=get("backend", "name"), strategy=get("strategy", "name"),
                   data=get("data", "name"), seed=get("train", "seed"), batch_size=get("train", "batch_size"),
                   window=get("train", "window"), embed=get("model", "embed"), hidden=get("model", "hidden"),
                   layers=get("model", "layers"), cell=get("model", "cell"), optimizer=get("train", "optimizer"), lr=get("train", "lr"),
                   clip_norm=get("train", "clip_norm"), kernel_option=get("backend", "kernel"),
                   config=dict(cfg))

    # -- (de)serialization ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Flat: the fields, then the extras at top level (a field wins over an extra)."""
        out = {k: v for k, v in self.extras.items()}
        for f in dataclasses.fields(self):
            if f.name != "extras":
                out[f.name] = getattr(self, f.name)
        return out

    def to_json(self) -> str:
        return json.dumps(strict(self.to_dict()), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSummary":
        """Read a ``summary.json`` (any schema): known keys become fields, the rest extras."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        known = {k: v for k, v in data.items() if k in names}
        extras = {k: v for k, v in data.items() if k not in names}
        known.setdefault("schema", 1)
        return cls(**known, extras=extras)

    def update(self, **values: Any) -> "RunSummary":
        """Set fields (unknown names go to extras); returns self."""
        names = {f.name for f in dataclasses.fields(self)}
        for k, v in values.items():
            if k in names and k != "extras":
                setattr(self, k, v)
            else:
                self.extras[k] = v
        return self


def strict(value: Any) -> Any:
    """``value`` made strict-JSON-safe: NumPy scalars to Python, NaN/inf to None, tuples to lists,
    anything else unknown to its string."""
    if isinstance(value, Mapping):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)
