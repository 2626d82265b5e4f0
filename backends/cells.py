"""Recurrent cells as the benchmark knows them: ``conf/cell/<name>.yaml`` (``model.cell``).

A cell file names the cell's state components (what a reset zeroes; the first is the layer's
output), its gate blocks and its canonical weight keys; from these follow the canonical weight
shapes and initial values of every model (``backends.base.canonical_shapes``). Each backend
implements the cells it declares (``cells`` in its kernel declarations) as a step function; the
time loop around it, and the reset, are shared by every cell. NumPy and PyYAML only.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, Tuple

import yaml

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "cell")


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """One cell's canonical layout (see ``conf/cell/lstm.yaml`` for the meaning of each field)."""

    name: str
    state: Tuple[str, ...]
    gates: Tuple[str, ...]
    weights: Tuple[str, ...]
    init_bias: Dict[str, float]

    def shape(self, key: str, inputs: int, hidden: int) -> Tuple[int, ...]:
        """Shape of weight ``key`` for a layer with ``inputs`` inputs and ``hidden`` units."""
        G = len(self.gates) * hidden
        if key.startswith("b"):
            return (G,)
        if key.endswith("x"):
            return (inputs, G)
        if key.endswith("h"):
            return (hidden, G)
        raise ValueError(f"cell {self.name}: weight {key!r} is neither w_*x, w_*h nor b*")

    def bias_init(self, hidden: int):
        """Initial value of each bias column (gate block ``init_bias`` values, else 0)."""
        import numpy as np
        out = np.zeros(len(self.gates) * hidden)
        for gate, value in self.init_bias.items():
            k = self.gates.index(gate)
            out[k * hidden:(k + 1) * hidden] = float(value)
        return out


def cell_names() -> list:
    """Every cell with a file in ``conf/cell/``."""
    return sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))


@functools.lru_cache(maxsize=None)
def cell_spec(name: str) -> CellSpec:
    path = os.path.join(CONF_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        from backends.base import ConfigError
        raise ConfigError("model.cell", name, f"allowed: {', '.join(cell_names())}")
    with open(path) as fh:
        d = yaml.safe_load(fh)
    return CellSpec(d["name"], tuple(d["state"]), tuple(d["gates"]), tuple(d["weights"]),
                    dict(d.get("init_bias") or {}))
