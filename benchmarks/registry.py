"""Backend registry: one Hydra config file per adapter in ``conf/backend/``.

Each file names the adapter class (``_target_``), the Python modules it needs (``requires``) and
its options. Nothing here imports a framework: :func:`build_backend` checks that the modules are
installed (a one-line error if not) and imports the adapter only then.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Dict, Mapping

import yaml

from backends.base import Backend, ConfigError, ModelSpec, OptimizerSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(ROOT, "conf")
# what describes a config file rather than an option passed to the adapter (``schema``: the option
# types, checked before the framework is imported, see benchmarks.config.parse_type)
META_KEYS = ("name", "_target_", "requires", "exact_kernels", "baseline_kernels", "schema", "guarantees")


def kernel_options(cfg: Mapping[str, Any]) -> Dict[str, list]:
    """``{"exact": [...], "baseline": [...]}``: the ``backend.kernel`` values a backend config
    declares. Exact kernels are reset-aware and pass the oracle conformance suite; baseline
    kernels (``native``, ``peer``; see ``backends.base.BASELINE_KERNELS``) are for comparison."""
    return {"exact": list(cfg.get("exact_kernels") or []), "baseline": list(cfg.get("baseline_kernels") or [])}


def group_options(group: str) -> list:
    """Names of the files in ``conf/<group>/`` (the allowed values of a config group)."""
    folder = os.path.join(CONF_DIR, group)
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))


def group_config(group: str, name: str) -> Dict[str, Any]:
    """The contents of ``conf/<group>/<name>.yaml``."""
    with open(os.path.join(CONF_DIR, group, f"{name}.yaml")) as fh:
        return yaml.safe_load(fh) or {}


def backend_configs() -> Dict[str, Dict[str, Any]]:
    """Every registered backend's config, by name."""
    return {name: group_config("backend", name) for name in group_options("backend")}


def missing_requirements(cfg: Mapping[str, Any]) -> list:
    """The modules in ``requires`` that are not importable (checked without importing them)."""
    return [m for m in cfg.get("requires", []) or [] if importlib.util.find_spec(m) is None]


def check_installed(cfg: Mapping[str, Any]) -> None:
    missing = missing_requirements(cfg)
    if missing:
        name = cfg.get("name")
        raise ConfigError("backend", name, f"needs {', '.join(missing)}, which is not installed: "
                          f"pip install -e '.[{name}]' (or make setup)")


def backend_class(cfg: Mapping[str, Any]) -> type:
    """Import and return the adapter class named by ``_target_``."""
    check_installed(cfg)
    module, _, cls = str(cfg["_target_"]).rpartition(".")
    return getattr(importlib.import_module(module), cls)


def build_backend(cfg: Mapping[str, Any], spec: ModelSpec, weights: Mapping, optimizer: OptimizerSpec,
                  batch_size: int, device: str = "auto", **overrides: Any) -> Backend:
    """Instantiate the adapter of backend config ``cfg`` with its options (``overrides`` win)."""
    options = {k: v for k, v in cfg.items() if k not in META_KEYS}
    options.update(overrides)
    return backend_class(cfg)(spec, weights, optimizer, batch_size, device=device, **options)
