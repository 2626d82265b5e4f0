"""Config validation: every user-settable value is checked here, before data or frameworks load.

:func:`validate` takes the composed config as a plain dict and raises
:class:`backends.base.ConfigError` (``key=value: what is allowed``) for the first bad value.

The options of each backend and data source are declared once, in a ``schema`` mapping of their
``conf/<group>/<name>.yaml`` (read from the file, so an override cannot change it), in a small type
language (:func:`parse_type`). The strategy and the data source are then built from their files
(``benchmarks.registry``; NumPy only, nothing read), so each class checks its own options too.
:func:`estimate_memory` sizes a run before anything is allocated.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from backends.base import VOCAB, ConfigError, ModelSpec, OptimizerSpec, canonical_shapes
from backends.cells import cell_names
from benchmarks import registry
from benchmarks.data import DataSize, check_file
from resetbench.layouts import Packed

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "sgd")
INT64_MAX = 2 ** 63 - 1


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


# --------------------------------------------------------------------------- the option type language
_BOUND = re.compile(r"\s*(>=|<=|>|<)\s*(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)")
_COMPARE: Dict[str, Callable[[Any, Any], bool]] = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


def _show(v: Any) -> str:
    return "null" if v is None else ("true" if v is True else "false" if v is False else str(v))


def _numeric(base: str, rest: str, spec: Any) -> Tuple[Callable[[Any], bool], str]:
    bounds = []
    pos = 0
    while pos < len(rest):
        m = _BOUND.match(rest, pos)
        if not m:
            raise ValueError(f"schema type {spec!r}: cannot parse {rest[pos:]!r}")
        bounds.append((m.group(1), float(m.group(2))))
        pos = m.end()
    if base == "int":
        kind = lambda v: _is_int(v) and -INT64_MAX <= v <= INT64_MAX  # noqa: E731
    else:
        kind = lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
                          and math.isfinite(v))
    noun = "integer" if base == "int" else "number"
    if bounds == [(">=", 1)] and base == "int" or bounds == [(">", 0)]:
        desc = f"a positive {noun}"
    elif bounds in ([(">=", 0)],):
        desc = f"a non-negative {noun}"
    else:
        desc = f"{'an' if base == 'int' else 'a'} {noun}" + "".join(
            f"{' and' if i else ''} {op} {_show(int(b) if b == int(b) else b)}" for i, (op, b) in enumerate(bounds))
    return (lambda v: kind(v) and all(_COMPARE[op](v, b) for op, b in bounds)), desc


def parse_type(spec: Any) -> List[Tuple[str, Callable[[Any], bool], str]]:
    """A schema entry -> its alternatives, each ``(base, accepts(value) -> bool, description)``.

    The language: a YAML list is the allowed values themselves, compared with their type
    (``[auto, true, false]``: the string ``"true"`` or the number 1 is not ``true``). A string is
    alternatives joined by `` or ``, each one of ``null``; ``bool`` (YAML true/false only, never a
    string such as ``no``); ``str``; ``file`` (a path to a readable regular file); ``int`` or
    ``number`` (finite), followed by bounds ``>=N``, ``>N``, ``<=N``, ``<N`` (``number>0 <1``).
    Raises ValueError for an entry it cannot parse (a bug in a yaml file: tests parse every one).
    """
    if isinstance(spec, list):
        allowed = list(spec)
        return [("values", lambda v: any(type(v) is type(a) and v == a for a in allowed),
                 f"allowed: {', '.join(_show(a) for a in allowed)}")]
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"schema type {spec!r}: a string or a list of values")
    out = []
    for alt in spec.split(" or "):
        alt = alt.strip()
        m = re.match(r"(int|number)(.*)$", alt)
        if alt == "null":
            out.append(("null", lambda v: v is None, "null"))
        elif alt == "bool":
            out.append(("bool", lambda v: isinstance(v, bool), "true or false"))
        elif alt == "str":
            out.append(("str", lambda v: isinstance(v, str), "a string"))
        elif alt == "file":
            out.append(("file", lambda v: isinstance(v, str) and v != "", "a path to a file"))
        elif m:
            out.append((m.group(1), *_numeric(m.group(1), m.group(2), spec)))
        else:
            raise ValueError(f"schema type {spec!r}: unknown type {alt!r} (null, bool, str, file, int, "
                             f"number, or a list of values)")
    return out


def check_type(key: str, value: Any, spec: Any) -> None:
    """Raise ConfigError unless ``value`` is of schema type ``spec`` (see :func:`parse_type`)."""
    alternatives = parse_type(spec)
    for base, accepts, _ in alternatives:
        if accepts(value):
            if base == "file":
                check_file(key, value)
            return
    if len(alternatives) == 1 and alternatives[0][0] == "values":
        raise ConfigError(key, value, alternatives[0][2])
    descs = [d for _, _, d in alternatives]
    big = _is_int(value) and abs(value) > INT64_MAX
    raise ConfigError(key, value, "must be " + " or ".join(descs) + (" (at most 2^63-1)" if big else ""))


def check_schema(prefix: str, options: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Check every option of ``options`` that ``schema`` declares (nested mappings recurse)."""
    for key, spec in schema.items():
        if key not in options:
            continue
        full = f"{prefix}.{key}"
        if isinstance(spec, Mapping):
            if not isinstance(options[key], Mapping):
                raise ConfigError(full, options[key], f"must be a mapping of {', '.join(spec)}")
            check_schema(full, options[key], spec)
        else:
            check_type(full, options[key], spec)


# --------------------------------------------------------------------------- keys
KNOWN_KEYS = {
    "": {"backend", "strategy", "data", "model", "train", "eval", "device", "experiment", "tune_malloc", "overwrite"},
    "model": {"embed", "hidden", "layers", "cell", "init"},
    "train": {"batch_size", "window", "steps", "epochs", "time_budget_s", "max_valid_tokens", "warmup_steps", "optimizer",
              "lr", "clip_norm", "seed", "log_every", "progress"},
    "eval": {"batch_size", "window", "every_steps", "targets"},
}
BOOL_KEYS = ("tune_malloc", "overwrite", "train.progress")


def _check_nested_keys(prefix: str, node: Mapping[str, Any], known: Mapping[str, Any], what: str) -> None:
    for key, value in node.items():
        full = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(full, value, f"not an option of {what}; options: "
                              f"{', '.join(sorted(k for k in known if k not in registry.META_KEYS)) or '(none)'}")
        if isinstance(known[key], Mapping) and isinstance(value, Mapping):
            _check_nested_keys(full, value, known[key], what)


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Reject keys that no part of resetbench reads (a typo or a stray ``+key=``), and overrides of
    a group's metadata (``_target_``, ``requires``, ``schema``, ...: they describe the file)."""
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
        declared = registry.group_config(group, name)
        _check_nested_keys(group, cfg[group], declared, f"{group}={name}")
        for meta in registry.META_KEYS:
            if meta != "name" and meta in cfg[group] and cfg[group][meta] != declared.get(meta):
                key, value = _first_difference(f"{group}.{meta}", cfg[group][meta], declared.get(meta))
                raise ConfigError(key, value, f"metadata of conf/{group}/{name}.yaml, not an option")


def _first_difference(key: str, got: Any, want: Any) -> Tuple[str, Any]:
    """The dotted key and value of the first leaf where ``got`` differs from ``want`` (so an
    override of one field of a nested mapping such as ``kernels`` is named by itself)."""
    if isinstance(got, Mapping) and isinstance(want, Mapping):
        for k in got:
            if k not in want or got[k] != want[k]:
                return _first_difference(f"{key}.{k}", got[k], want.get(k))
    return key, got


def check_options(cfg: Mapping[str, Any]) -> None:
    """Every backend and data option against the ``schema`` of its yaml file, before any import."""
    for group in ("backend", "data"):
        name = cfg[group]["name"]
        schema = registry.group_config(group, name).get("schema") or {}
        check_schema(group, cfg[group], schema)


def kernel_problem(decl: registry.KernelDecl, cell: str, strategy: str,
                   guarantees: Mapping[str, Sequence[str]]) -> Optional[str]:
    """Why kernel ``decl`` cannot train ``model.cell=cell`` on ``strategy`` (None if it can): the
    cell must be one it implements, and its ``needs`` must be among the strategy's ``guarantees``
    (``guarantees``: every strategy's, to name those that would do)."""
    if cell not in decl.cells:
        return f"implements cells {', '.join(decl.cells) or '(none)'}, not model.cell={cell}"
    missing = [p for p in decl.needs if p not in guarantees.get(strategy, ())]
    if not missing:
        return None
    able = [s for s, props in guarantees.items() if set(decl.needs) <= set(props)]
    return (f"needs {', '.join(missing)}, which strategy={strategy} does not guarantee; "
            + (f"strategies that do: {', '.join(able)}" if able else "no strategy does"))


def check_kernel(cfg: Mapping[str, Any]) -> None:
    """``backend.kernel`` must be declared by the backend's file, implement ``model.cell``, and
    need only layout properties the chosen strategy guarantees (docs/spec.md sections 4 and 7)."""
    backend = cfg.get("backend", {})
    if "kernel" not in backend:
        return
    decl = registry.kernel_decl(backend, backend["kernel"])
    problem = kernel_problem(decl, str(_get(cfg, "model.cell")), _get(cfg, "strategy.name"),
                             registry.strategy_guarantees())
    if problem:
        raise ConfigError("backend.kernel", decl.name, problem)


def check_backend_combinations(cfg: Mapping[str, Any]) -> None:
    """Option combinations a backend refuses when it is built (mirrored here, so they fail before
    the framework loads): keras ``loop`` is the reset-aware layer's (ResetLSTM, ResetGRU: Reset + the
    cell's name), and XLA cannot compile ``loop=scan``."""
    b = cfg["backend"]
    if b["name"] == "keras":
        loop, kernel = b.get("loop", "auto"), b.get("kernel", "reset")
        if kernel != "reset" and loop != "auto":
            layer = str(_get(cfg, "model.cell")).upper()
            raise ConfigError("backend.loop", loop, f"Reset{layer}'s loop; kernel={kernel} runs keras.layers.{layer}'s "
                              f"own loop: leave loop=auto")
        if loop == "scan" and b.get("jit_compile") is True:
            raise ConfigError("backend.jit_compile", True, "XLA cannot compile loop=scan (Keras's scan sets no "
                              "maximum_iterations); use loop=tf_while or jit_compile=false")


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first invalid value of the composed config."""
    one_of(cfg, "backend.name", registry.group_options("backend"))
    one_of(cfg, "strategy.name", registry.group_options("strategy"))
    one_of(cfg, "data.name", registry.group_options("data"))
    check_keys(cfg)
    one_of(cfg, "device", DEVICES)
    one_of(cfg, "model.cell", cell_names())
    for key in BOOL_KEYS:
        check_type(key, _get(cfg, key), "bool")
    check_kernel(cfg)
    check_options(cfg)
    check_backend_combinations(cfg)
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
    targets = cfg["eval"].get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) and t > 0
                                                for t in targets):
        raise ConfigError("eval.targets", targets, "must be a list of positive eval losses (nats per token), "
                          "e.g. [2.0,1.8]")
    one_of(cfg, "train.optimizer", OPTIMIZERS)
    positive_float(cfg, "train.lr")
    positive_float(cfg, "train.clip_norm", allow_none=True)
    seed = _get(cfg, "train.seed")
    if not _is_int(seed) or seed < 0:
        raise ConfigError("train.seed", seed, "must be a non-negative integer")
    init = _get(cfg, "model.init")
    if init is not None:
        check_file("model.init", init, "a canonical weights .npz, or null")
    # each plug-in checks its own options when it is built (cheap: nothing is read or laid out)
    registry.build_layout(cfg["strategy"], _get(cfg, "train.batch_size"), _get(cfg, "train.window"), seed)
    registry.build_dataset(cfg["data"])


def model_spec(cfg: Mapping[str, Any]) -> ModelSpec:
    m = cfg["model"]
    return ModelSpec(embed=int(m["embed"]), hidden=int(m["hidden"]), layers=int(m["layers"]),
                     cell=str(m.get("cell", "lstm")))


def optimizer_spec(cfg: Mapping[str, Any]) -> OptimizerSpec:
    t = cfg["train"]
    clip = t.get("clip_norm")
    return OptimizerSpec(name=t["optimizer"], lr=float(t["lr"]),
                         clip_norm=None if clip is None else float(clip))


# --------------------------------------------------------------------------- memory
# What a run holds at its peak, in bytes (a deliberately simple model; every count is float32 = 4
# bytes unless said otherwise; P = the number of canonical weights, H/E/L/V the model sizes):
#   weights      8 P: the canonical NumPy copy and the framework's copy
#   gradients    4 P
#   optimizer    8 P for adam (two moments), 0 for sgd
#   activations  one step: train slots x 4 (12 H L + 2 E + 3 V) (gates, cell and hidden states
#                and their gradients per layer, embeddings, logits, softmax and its gradient), or an
#                eval step's eval slots x 4 (6 H L + E + 2 V), whichever is larger. Train slots:
#                the layout's largest batch (Layout.footprint: B x T, or B x the longest sequence
#                rounded up to pad_multiple for padded).
#   layout       13 bytes per slot (x, y int32, mask float32, reset bool) of what the layout
#                holds at once, plus 72 bytes per slot it gathers at once (the int64 index
#                arithmetic; tracemalloc measures up to ~67), plus its index of the epoch per
#                sequence (Layout.footprint: every layout builds one batch at a time straight from
#                the corpus bytes, B x T for packed and reset_all, B x the longest sequence for
#                padded, so nothing grows with the tokens; packed's index peaks at ~90 bytes per
#                sequence, the others' at ~30); the eval layout (packed, eval sizes) is held
#                throughout
#   data         building the corpus (DataSize.load_bytes, from benchmarks.data)
# Frameworks add their own workspace and caches: the estimate is a floor meant to refuse what
# cannot fit, not to promise that everything else fits.
SLOT_BYTES = 13
GATHER_BYTES = 72
# the size keys (with the strategy's integer options, see _defaults) a memory error may name
MEMORY_KEYS = ("model.hidden", "model.embed", "model.layers", "train.batch_size", "train.window",
               "eval.batch_size", "eval.window")


def count_params(embed: int, hidden: int, layers: int, vocab: int = VOCAB, cell: str = "lstm") -> int:
    """Numbers in the model's canonical weights."""
    shapes = canonical_shapes(ModelSpec(int(embed), int(hidden), int(layers), vocab, cell))
    return sum(math.prod(s) for s in shapes.values())


def estimate_memory(cfg: Mapping[str, Any], size: DataSize) -> Dict[str, int]:
    """Bytes the run described by ``cfg`` needs at its peak, by part (see the model above)."""
    m, t, e = cfg["model"], cfg["train"], cfg["eval"]
    E, H, L, V = int(m["embed"]), int(m["hidden"]), int(m["layers"]), VOCAB
    B, T, eB, eT = int(t["batch_size"]), int(t["window"]), int(e["batch_size"]), int(e["window"])
    P = count_params(E, H, L, cell=str(m.get("cell", "lstm")))
    train = registry.build_layout(cfg["strategy"], B, T).footprint(size.train_tokens, size.train_longest)
    ev = Packed(eB, eT).footprint(size.eval_tokens, size.eval_longest)
    layout = (SLOT_BYTES * (train.held_slots + ev.held_slots) + GATHER_BYTES * train.gathered_tokens
              + train.sequence_bytes * size.train_sequences + ev.sequence_bytes * size.eval_sequences)
    train_act = train.step_slots * 4 * (12 * H * L + 2 * E + 3 * V)
    eval_act = eB * eT * 4 * (6 * H * L + E + 2 * V)
    return {"weights": 8 * P, "gradients": 4 * P, "optimizer": 8 * P if t["optimizer"] == "adam" else 0,
            "activations": max(train_act, eval_act), "layout": layout, "data": int(size.load_bytes)}


def format_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (three significant digits, binary units)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    k = 0
    while k < len(units) - 1 and n >= 1024 ** (k + 1):
        k += 1
    try:
        return f"{n / 1024 ** k:.3g} {units[k]}"
    except OverflowError:
        return f"more than 1e300 {units[k]}"


def _defaults(cfg: Mapping[str, Any]) -> Dict[str, int]:
    """Reference values of the size keys: conf/config.yaml's, and the integer options of the
    run's strategy (``strategy.pad_multiple``, ...) as its own file sets them."""
    import yaml
    with open(os.path.join(registry.CONF_DIR, "config.yaml")) as fh:
        base = yaml.safe_load(fh)
    out = {k: _get(base, k) for k in MEMORY_KEYS}
    name = cfg["strategy"].get("name")
    if name in registry.group_options("strategy"):
        own = registry.plugin_options(registry.group_config("strategy", name))
        out.update({f"strategy.{k}": v for k, v in own.items() if _is_int(v)})
    return out


def _blame(cfg: Mapping[str, Any], size: DataSize, parts: Mapping[str, int]) -> str:
    """The key to name in a memory error: the size key whose reset to its default saves the most;
    where none saves half, the data source's own (``size_key``: a text file's path, synthetic's
    count or lengths)."""
    total = sum(parts.values())
    best, saved = None, 0
    for key, default in _defaults(cfg).items():
        try:
            value = _get(cfg, key)
        except ConfigError:
            continue
        if not _is_int(value) or value <= default:
            continue
        section, leaf = key.split(".")
        trial = {**cfg, section: {**cfg[section], leaf: default}}
        s = total - sum(estimate_memory(trial, size).values())
        if s > saved:
            best, saved = key, s
    if best is not None and 2 * saved >= total:
        return best
    return registry.build_dataset(cfg["data"]).size_key(size) or best or "model.hidden"


def check_memory(cfg: Mapping[str, Any], size: DataSize, available: Optional[int] = None) -> Dict[str, int]:
    """Raise ConfigError when the run needs more than ``available`` bytes (default: what the
    machine has available now, ``psutil.virtual_memory().available``). Returns the estimate."""
    parts = estimate_memory(cfg, size)
    if available is None:
        import psutil
        available = int(psutil.virtual_memory().available)
    total = sum(parts.values())
    if total <= available:
        return parts
    key = _blame(cfg, size, parts)
    shown = ", ".join(f"{name} {format_bytes(b)}" for name, b in sorted(parts.items(), key=lambda kv: -kv[1])
                      if b * 100 >= total)
    value = _get(cfg, key)
    raise ConfigError(key, value, f"this config needs about {format_bytes(total)} of memory ({shown}); "
                      f"{format_bytes(available)} are available")
