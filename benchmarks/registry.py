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


# Strategies and data sources are plug-ins the same way: conf/strategy/<name>.yaml and
# conf/data/<name>.yaml name their class (_target_, NumPy only) and hold its options; build_layout
# and build_dataset construct them. A group's names are its files (group_options): nothing else
# lists them.
def plugin_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A group config's options: everything but what describes the file (:data:`META_KEYS`)."""
    return {k: v for k, v in cfg.items() if k not in META_KEYS}


def plugin_class(group: str, cfg: Mapping[str, Any]) -> type:
    """Import the class named by ``_target_`` of ``cfg``, or of ``conf/<group>/<name>.yaml`` where
    ``cfg`` (a group's config, possibly just ``{"name": ...}``) has none."""
    name, target = cfg.get("name"), cfg.get("_target_")
    if not target:
        if name not in group_options(group):
            raise ConfigError(group, name, f"allowed: {', '.join(group_options(group))}")
        target = group_config(group, name).get("_target_")
    module, _, cls = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{group}._target_", target, f"conf/{group}/{name}.yaml names no importable "
                          f"class ({type(exc).__name__}: {exc})") from None


def _instantiate(group: str, cfg: Mapping[str, Any], *args: Any) -> Any:
    """``_target_(*args, **options)``, named after its config (``cfg["name"]``)."""
    obj = plugin_class(group, cfg)(*args, **plugin_options(cfg))
    if cfg.get("name") is not None:
        obj.name = str(cfg["name"])
    return obj


def build_layout(cfg: Mapping[str, Any], batch_size: int, window: int, seed: int = 0) -> Any:
    """The layout of strategy config ``cfg`` (``cfg["strategy"]`` of a run): its class built with
    ``(batch_size, window, seed, **options)``; the class checks its options (one-line ConfigError)."""
    return _instantiate("strategy", cfg, batch_size, window, seed)


def build_dataset(cfg: Mapping[str, Any]) -> Any:
    """The data source of data config ``cfg`` (``cfg["data"]`` of a run): its class built with the
    options, which it checks (nothing is read yet: ``.load(seed)``, ``.size()``)."""
    return _instantiate("data", cfg)


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
