"""Config validation: every user-settable value is checked here, before data or frameworks load.

:func:`validate` takes the composed config as a plain dict and raises
:class:`backends.base.ConfigError` (``key=value: what is allowed``) for the first bad value.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Mapping

from backends.base import ConfigError, ModelSpec, OptimizerSpec
from benchmarks import registry
from benchmarks.strategies import STRATEGIES

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "sgd")
DATA = ("kjv", "synthetic", "textfile")


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(dotted, None, "missing from the config")
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive_int(cfg: Mapping[str, Any], key: str, allow_none: bool = False, minimum: int = 1) -> Any:
    v = _get(cfg, key)
    if v is None and allow_none:
        return None
    if not _is_int(v) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(key, v, f"must be {what}" + (" or null" if allow_none else ""))
    return int(v)


def positive_float(cfg: Mapping[str, Any], key: str, allow_none: bool = False) -> Any:
    v = _get(cfg, key)
    if v is None and allow_none:
        return None
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not v > 0 or v != v or v == float("inf"):
        raise ConfigError(key, v, "must be a positive number" + (" or null" if allow_none else ""))
    return float(v)


def one_of(cfg: Mapping[str, Any], key: str, allowed) -> Any:
    v = _get(cfg, key)
    if v not in allowed:
        raise ConfigError(key, v, f"allowed: {', '.join(map(str, allowed))}")
    return v


def _existing_file(key: str, path: Any) -> None:
    if not isinstance(path, str) or not path:
        raise ConfigError(key, path, "required: a path to a text file")
    if not os.path.isfile(path):
        raise ConfigError(key, path, "file not found")


KNOWN_KEYS = {
    "": {"backend", "strategy", "data", "model", "train", "eval", "device", "experiment", "tune_malloc", "overwrite"},
    "model": {"embed", "hidden", "layers", "init"},
    "train": {"batch_size", "window", "steps", "epochs", "time_budget_s", "max_valid_tokens", "warmup_steps", "optimizer",
              "lr", "clip_norm", "seed", "log_every", "progress"},
    "eval": {"batch_size", "window", "every_steps"},
}


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Reject keys that no part of resetbench reads (a typo or a stray ``+key=``)."""
    for section, known in KNOWN_KEYS.items():
        node = cfg if not section else cfg.get(section, {})
        for key in node:
            if key not in known:
                full = f"{section}.{key}" if section else key
                raise ConfigError(full, node[key], f"unknown key; known {section or 'top-level'} keys: "
                                  f"{', '.join(sorted(known))}")
    for group in ("backend", "strategy", "data"):
        name = cfg.get(group, {}).get("name")
        if name not in registry.group_options(group):
            continue
        known = set(registry.group_config(group, name))
        for key in cfg[group]:
            if key not in known:
                raise ConfigError(f"{group}.{key}", cfg[group][key], f"not an option of {group}={name}; "
                                  f"options: {', '.join(sorted(k for k in known if k not in registry.META_KEYS)) or '(none)'}")


def check_kernel(cfg: Mapping[str, Any]) -> None:
    """``backend.kernel`` must be one the backend config declares; the baseline kernels run only
    the layouts they can: ``native`` has no mid-window reset (not packed), ``peer`` is padded."""
    backend = cfg.get("backend", {})
    if "kernel" not in backend:
        return
    kernels = registry.kernel_options(registry.group_config("backend", backend["name"]))
    allowed = kernels["exact"] + kernels["baseline"]
    kernel = backend["kernel"]
    if kernel not in allowed:
        raise ConfigError("backend.kernel", kernel, f"allowed for backend={backend['name']}: {', '.join(allowed)}")
    strategy = _get(cfg, "strategy.name")
    if kernel == "native" and strategy == "packed":
        raise ConfigError("backend.kernel", kernel, "the native LSTM cannot reset mid-window, so it cannot run "
                          "strategy=packed; use strategy=padded or reset_all, or a reset-aware kernel: "
                          f"{', '.join(kernels['exact'])}")
    if kernel == "peer" and strategy != "padded":
        raise ConfigError("backend.kernel", kernel, f"the peer baseline consumes the padded layout only; "
                          f"use strategy=padded (got strategy={strategy})")


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first invalid value of the composed config."""
    one_of(cfg, "backend.name", registry.group_options("backend"))
    one_of(cfg, "strategy.name", STRATEGIES)
    one_of(cfg, "data.name", DATA)
    check_keys(cfg)
    if _get(cfg, "strategy.name") == "padded":
        positive_int(cfg, "strategy.pad_multiple")
    one_of(cfg, "data.name", DATA)
    one_of(cfg, "device", DEVICES)
    for key in ("tune_malloc", "overwrite"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(key, cfg.get(key), "allowed: true, false")
    check_kernel(cfg)
    for key in ("model.embed", "model.hidden", "model.layers", "train.batch_size", "train.window",
                "train.log_every", "eval.batch_size", "eval.window"):
        positive_int(cfg, key)
    steps = positive_int(cfg, "train.steps", allow_none=True, minimum=0)
    epochs = positive_int(cfg, "train.epochs", allow_none=True)
    budget = positive_float(cfg, "train.time_budget_s", allow_none=True)
    tokens = positive_int(cfg, "train.max_valid_tokens", allow_none=True)
    if steps is None and epochs is None and budget is None and tokens is None:
        raise ConfigError("train.steps", None, "set train.steps, train.epochs, train.time_budget_s or "
                          "train.max_valid_tokens (all are null, so training would never stop)")
    positive_int(cfg, "train.warmup_steps", minimum=0)
    positive_int(cfg, "eval.every_steps", allow_none=True)
    one_of(cfg, "train.optimizer", OPTIMIZERS)
    positive_float(cfg, "train.lr")
    positive_float(cfg, "train.clip_norm", allow_none=True)
    seed = _get(cfg, "train.seed")
    if not _is_int(seed) or seed < 0:
        raise ConfigError("train.seed", seed, "must be a non-negative integer")
    init = _get(cfg, "model.init")
    if init is not None and (not isinstance(init, str) or not os.path.isfile(init)):
        raise ConfigError("model.init", init, "file not found; give a canonical weights .npz or null")
    data = _get(cfg, "data")
    if data["name"] == "textfile":
        _existing_file("data.path", data.get("path"))
        if data.get("eval_path") is not None:
            _existing_file("data.eval_path", data.get("eval_path"))
        one_of(cfg, "data.unit", ("line", "paragraph"))
    if data["name"] == "synthetic":
        positive_int(cfg, "data.train_sequences")
        positive_int(cfg, "data.eval_sequences")
        one_of(cfg, "data.length.dist", ("fixed", "uniform", "lognormal"))
    for key in ("max_train_sequences", "max_eval_sequences"):
        if data.get(key) is not None:
            positive_int(cfg, f"data.{key}")


def model_spec(cfg: Mapping[str, Any]) -> ModelSpec:
    m = cfg["model"]
    return ModelSpec(embed=int(m["embed"]), hidden=int(m["hidden"]), layers=int(m["layers"]))


def optimizer_spec(cfg: Mapping[str, Any]) -> OptimizerSpec:
    t = cfg["train"]
    clip = t.get("clip_norm")
    return OptimizerSpec(name=t["optimizer"], lr=float(t["lr"]),
                         clip_norm=None if clip is None else float(clip))


def strategy_options(cfg: Mapping[str, Any]) -> dict:
    """The strategy group's options (everything but its name)."""
    return {k: v for k, v in cfg["strategy"].items() if k != "name"}
