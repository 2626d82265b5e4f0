"""Backend registry: one Hydra config file per adapter in ``conf/backend/``.

Each file names the adapter class (``_target_``), the Python modules it needs (``requires``), its
options, and every value of ``backend.kernel`` once, under ``kernels:`` (:class:`KernelDecl`; this
module is the only reader of those declarations). Nothing here imports a framework: :func:`build_backend` checks that the modules are
installed (a one-line error if not) and imports the adapter only then.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Any, Dict, Mapping, Tuple

import yaml

from backends.base import Backend, ConfigError, ModelSpec, OptimizerSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(ROOT, "conf")
# what describes a config file rather than an option passed to the adapter (``schema``: the option
# types, checked before the framework is imported, see benchmarks.config.parse_type; ``kernels``:
# the kernel declarations below; ``oracle``: the neutral judge, left out of default timed runs)
META_KEYS = ("name", "_target_", "requires", "kernels", "oracle", "schema", "guarantees")
# what a kernel declaration's ``role`` may be (docs/spec.md section 7)
ROLES = ("exact", "native", "peer", "peer_reset")
DECL_KEYS = ("role", "cells", "needs", "requires", "slow_to_build", "description")
# where the packages of kernels that declare ``requires`` come from (pyproject.toml)
KERNEL_EXTRA = "peers"


@dataclasses.dataclass(frozen=True)
class KernelDecl:
    """One value of ``backend.kernel`` as its backend's file declares it under ``kernels:``.

    ``role``: ``exact`` (reset-aware, conformance-tested), ``native`` (the framework's own no-reset
    layer: the kernel benchmark's reference), ``peer`` (its variable-length path) or
    ``peer_reset`` (another library's reset-aware layer: exact semantics, conformance-tested like
    ``exact``, trains only); ``cells``: the cells it implements; ``needs``: the layout properties
    it requires (a strategy's ``guarantees``); ``requires``: modules it needs beyond its backend's
    (the ``peers`` extra); ``slow_to_build``: minutes of compilation per shape (left out of the
    shared conformance suite and of the kernel benchmark's default)."""

    name: str
    role: str
    cells: Tuple[str, ...]
    needs: Tuple[str, ...] = ()
    requires: Tuple[str, ...] = ()
    slow_to_build: bool = False
    description: str = ""


def _decl(backend: str, name: str, entry: Any) -> KernelDecl:
    """Parse one entry of ``kernels:`` (ValueError, naming the file, for a malformed one)."""
    where = f"conf/backend/{backend}.yaml: kernels.{name}"
    if not isinstance(entry, Mapping) or "role" not in entry:
        raise ValueError(f"{where}: a mapping with at least a role ({', '.join(ROLES)})")
    unknown = sorted(set(entry) - set(DECL_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(DECL_KEYS)})")
    requires = entry.get("requires") or []
    if not isinstance(requires, list) or not all(isinstance(m, str) and m for m in requires):
        raise ValueError(f"{where}: requires must be a list of module names, got {requires!r}")
    return KernelDecl(name=str(name), role=str(entry["role"]), cells=tuple(entry.get("cells") or ()),
                      needs=tuple(entry.get("needs") or ()), requires=tuple(requires),
                      slow_to_build=bool(entry.get("slow_to_build", False)),
                      description=str(entry.get("description") or ""))


def declared(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The file ``conf/backend/<name>.yaml`` of a backend config (a composed config may override
    ``kernel``, never the declarations); ``cfg`` itself for a backend without a file."""
    name = cfg.get("name")
    return group_config("backend", name) if name in group_options("backend") else cfg


def kernel_decls(cfg: Mapping[str, Any]) -> Dict[str, KernelDecl]:
    """Every kernel a backend declares (``kernels:``), by name, in the file's order."""
    kernels = declared(cfg).get("kernels") or {}
    return {name: _decl(str(cfg.get("name")), name, entry) for name, entry in kernels.items()}


def default_kernel(cfg: Mapping[str, Any]) -> str:
    """The backend's default ``kernel`` as its file declares it (what evaluation runs)."""
    return str(declared(cfg).get("kernel"))


def kernel_decl(cfg: Mapping[str, Any], kernel: Any) -> KernelDecl:
    """The declaration of ``kernel``; ConfigError naming the declared ones if it is not one."""
    decls = kernel_decls(cfg)
    if not isinstance(kernel, str) or kernel not in decls:
        raise ConfigError("backend.kernel", kernel, f"allowed for backend={cfg.get('name')}: {', '.join(decls)}")
    return decls[kernel]


def kernel_facts(cfg: Mapping[str, Any], kernel: Any) -> Dict[str, Any]:
    """What the adapter needs to know of ``kernel``'s declaration: ``eval_kernel`` (the kernel
    itself if its role is exact, else the backend's default: baselines train only, so the eval
    loss never depends on the training kernel) and ``needs`` (the layout properties to check on
    each batch, :func:`backends.base.check_layout`)."""
    decl = kernel_decl(cfg, kernel)
    return {"eval_kernel": decl.name if decl.role == "exact" else default_kernel(cfg), "needs": decl.needs}


def is_oracle(cfg: Mapping[str, Any]) -> bool:
    """True for the neutral judge (``oracle: true``): tested against, never timed by default."""
    return bool(cfg.get("oracle", False))


def timed_backends() -> list:
    """The registered backends without ``oracle: true`` (the kernel benchmark's default)."""
    return [name for name, cfg in backend_configs().items() if not is_oracle(cfg)]


def strategy_guarantees() -> Dict[str, Tuple[str, ...]]:
    """Strategy name -> the layout properties its batches always have (``guarantees:``)."""
    return {name: tuple(group_config("strategy", name).get("guarantees") or ())
            for name in group_options("strategy")}


def layout_properties() -> list:
    """Every layout property some strategy guarantees: what a kernel may list in ``needs``."""
    return sorted({p for props in strategy_guarantees().values() for p in props})


def study_experiments() -> list:
    """The experiments of the study plans in ``conf/study/`` (not their ``_debug`` twins), in
    plan-name order: each gets a ranking table and a figure."""
    names = [n for n in group_options("study") if not n.endswith("_debug")]
    return [group_config("study", n)["experiment"] for n in names]


def study_plans() -> list:
    """The study plans of ``conf/study/`` (not their ``_debug`` twins) in the order ``make study``
    runs them: a plan whose final runs take another plan's tuned rates (``lr_from``) after that
    plan, the others by name."""
    plans = {n: group_config("study", n).get("lr_from") for n in group_options("study") if not n.endswith("_debug")}
    order: list = []

    def visit(name: str, path: tuple) -> None:
        if name in order:
            return
        if name in path:
            raise ConfigError("lr_from", name, f"conf/study/: plans take their rates from each other in a cycle "
                              f"({' -> '.join(path + (name,))})")
        if name not in plans:
            raise ConfigError("lr_from", name, f"conf/study/{path[-1]}.yaml names no plan of conf/study/ "
                              f"(allowed: {', '.join(plans)})")
        if plans[name]:
            visit(plans[name], path + (name,))
        order.append(name)
    for name in plans:
        visit(name, ())
    return order


def sweep_experiments() -> list:
    """The experiments ``make sweeps`` runs, one after another: every file of ``conf/experiment/``
    but the ``_debug`` twins (the tests run those) and the study plans' experiments (``make study``
    runs them through :mod:`benchmarks.study`). A new experiment file joins it by existing."""
    study = set(study_experiments())
    return [n for n in group_options("experiment") if not n.endswith("_debug") and n not in study]


def default_cell() -> str:
    """``model.cell`` of ``conf/config.yaml``: the cell a run trains unless told otherwise."""
    with open(os.path.join(CONF_DIR, "config.yaml")) as fh:
        return yaml.safe_load(fh)["model"]["cell"]


def cell_suffixes() -> list:
    """The experiment-name suffix of each cell of ``conf/cell/``, the default cell's first: none
    for the default cell (``compare``, ``peers``), ``_<cell>`` for another (``compare_gru``)."""
    default = default_cell()
    return [""] + [f"_{c}" for c in group_options("cell") if c != default]


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


def kernel_missing(cfg: Mapping[str, Any], kernel: str) -> list:
    """The modules kernel ``kernel`` of backend ``cfg`` declares (``requires``) that are not
    importable; [] for an undeclared kernel (:func:`kernel_decl` reports that)."""
    decl = kernel_decls(cfg).get(kernel)
    return [m for m in (decl.requires if decl else ()) if importlib.util.find_spec(m) is None]


def kernel_missing_reason(cfg: Mapping[str, Any], kernel: str) -> str:
    """Why ``kernel`` cannot run here, in a few words ('' when it can)."""
    missing = kernel_missing(cfg, kernel)
    return f"needs {', '.join(missing)}, not installed: pip install -e '.[{KERNEL_EXTRA}]'" if missing else ""


def check_installed(cfg: Mapping[str, Any]) -> None:
    """ConfigError (one line) if the backend's modules, or those of its configured ``kernel``, are
    not installed."""
    missing = missing_requirements(cfg)
    if missing:
        name = cfg.get("name")
        raise ConfigError("backend", name, f"needs {', '.join(missing)}, which is not installed: "
                          f"pip install -e '.[{name}]' (or make setup)")
    kernel = cfg.get("kernel")
    if isinstance(kernel, str) and kernel_missing(cfg, kernel):
        raise ConfigError("backend.kernel", kernel, kernel_missing_reason(cfg, kernel))


def backend_class(cfg: Mapping[str, Any]) -> type:
    """Import and return the adapter class named by ``_target_``."""
    check_installed(cfg)
    module, _, cls = str(cfg["_target_"]).rpartition(".")
    return getattr(importlib.import_module(module), cls)


def build_backend(cfg: Mapping[str, Any], spec: ModelSpec, weights: Mapping, optimizer: OptimizerSpec,
                  batch_size: int, device: str = "auto", **overrides: Any) -> Backend:
    """Instantiate the adapter of backend config ``cfg`` with its options (``overrides`` win) and
    the facts its kernel's declaration implies (:func:`kernel_facts`). An undeclared kernel is a
    ConfigError before the framework is imported."""
    options = {k: v for k, v in cfg.items() if k not in META_KEYS}
    options.update(overrides)
    options["kernel"] = options.get("kernel", cfg.get("kernel"))
    facts = kernel_facts(cfg, options["kernel"])
    if kernel_missing(cfg, options["kernel"]):
        raise ConfigError("backend.kernel", options["kernel"],
                          kernel_missing_reason(cfg, options["kernel"]))
    return backend_class(cfg)(spec, weights, optimizer, batch_size, device=device, **options, **facts)


if __name__ == "__main__":
    # ``python -m benchmarks.registry sweeps|studies``: the names, one per line (for the Makefile)
    import sys
    lists = {"sweeps": sweep_experiments, "studies": study_plans}
    if len(sys.argv) != 2 or sys.argv[1] not in lists:
        raise SystemExit(f"usage: python -m benchmarks.registry {'|'.join(lists)}")
    try:
        print("\n".join(lists[sys.argv[1]]()))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}")
