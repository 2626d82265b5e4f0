"""The plug-in API, over every file of conf/strategy/ and conf/data/ (as tests/test_conformance.py is
over backends): each builds from its yaml defaults through ``benchmarks.registry``, refuses an
unknown option and a bad value with a one-line ConfigError naming the option; every strategy's
epochs are valid contract batches that feed every target exactly once, are identical for the same
seed, and have every property the strategy's yaml ``guarantees``; every data source loads, with a
deterministic content hash and a non-empty eval split, and sizes itself consistently."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from backends.base import BOUNDARY, ConfigError
from benchmarks import registry
from resetbench.corpus import Corpus
from resetbench.layouts import Layout, epoch_stats

STRATEGIES = registry.group_options("strategy")
DATA = registry.group_options("data")

lengths_st = st.lists(st.integers(0, 40), min_size=1, max_size=30)
B_st = st.integers(1, 6)
T_st = st.integers(1, 12)


def corpus_of(lengths: List[int], seed: int = 0) -> Corpus:
    rng = np.random.default_rng(seed)
    return Corpus.from_sequences([bytes(rng.integers(0, 256, size=n, dtype=np.uint8)) for n in lengths])


def layout(name: str, B: int, T: int, seed: int = 0) -> Layout:
    """Strategy ``name`` as its yaml file configures it."""
    return registry.build_layout(registry.group_config("strategy", name), B, T, seed)


def segments(batches) -> List[bytes]:
    """Follow each row through the batches, cutting at every reset; return the masked targets of
    each segment. With a correct layout, each segment is one sequence's bytes + the boundary."""
    rows: Dict[int, List[int]] = {}
    done: List[List[int]] = []
    for b in batches:
        B, T = b.x.shape
        for r in range(B):
            for t in range(T):
                if b.reset[r, t] and rows.get(r):
                    done.append(rows.pop(r))
                if b.reset[r, t]:
                    rows[r] = []
                if b.mask[r, t]:
                    assert r in rows, "a counted target before any reset of its row"
                    rows[r].append(int(b.y[r, t]))
    done.extend(v for v in rows.values() if v)
    return sorted(bytes(s[:-1]) + b"|" if s[-1] == BOUNDARY else bytes(s) for s in done)


def expected(corpus: Corpus) -> List[bytes]:
    return sorted(corpus.sequence(k) + b"|" for k in range(len(corpus)))


# --------------------------------------------------------------------------- layout properties
def _prefix_mask(b) -> bool:
    m = b.mask
    return bool(np.isin(m, (0.0, 1.0)).all() and (np.diff(m, axis=1) <= 0).all())


# docs/spec.md section 4: what a strategy may declare under `guarantees:`, checked on every batch
PROPERTIES = {
    "fresh_rows": lambda b: bool(b.reset[:, 0].all()),
    "no_mid_reset": lambda b: not b.reset[:, 1:].any(),
    "prefix_mask": _prefix_mask,
}


def test_properties_are_checkable():
    """The property checks can fail: a batch with a mid-row reset, a stale row and a gap in its
    mask breaks each of them."""
    from resetbench.contract import Batch
    z = np.zeros((2, 3), np.int32)
    bad = Batch(z, z, np.array([[1, 0, 1], [1, 1, 1]], np.float32), np.array([[True, True, False], [False] * 3]))
    assert not any(check(bad) for check in PROPERTIES.values())
    good = Batch(z, z, np.array([[1, 1, 0], [1, 1, 1]], np.float32), np.array([[True, False, False]] * 2))
    assert all(check(good) for check in PROPERTIES.values())


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_yaml_names_its_class_and_known_guarantees(name):
    cfg = registry.group_config("strategy", name)
    assert cfg.get("name") == name and cfg.get("_target_"), f"conf/strategy/{name}.yaml: name and _target_"
    unknown = set(cfg.get("guarantees") or []) - set(PROPERTIES)
    assert not unknown, f"conf/strategy/{name}.yaml guarantees properties no test checks: {unknown}"
    built = layout(name, 4, 8, 1)
    assert isinstance(built, Layout) and built.name == name and (built.B, built.T, built.seed) == (4, 8, 1)


@settings(max_examples=40, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_target_of_every_sequence_once_per_epoch(name, lengths, B, T, seed):
    corpus = corpus_of(lengths, seed)
    guarantees = registry.group_config("strategy", name).get("guarantees") or []
    for epoch in (0, 1):
        batches = list(layout(name, B, T, seed).epoch(corpus, epoch))
        for b in batches:
            b.check()
            for prop in guarantees:
                assert PROPERTIES[prop](b), f"strategy={name} breaks {prop}"
        assert segments(batches) == expected(corpus)
        # inputs are targets shifted by one within each sequence: x = [256, s...]
        for b in batches:
            counted = b.mask > 0
            starts = counted & (b.x == BOUNDARY)
            assert np.all(b.y[counted & ~starts] >= 0)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
@pytest.mark.parametrize("name", STRATEGIES)
def test_valid_tokens_equal_and_pad_fraction_direct(name, lengths, B, T, seed):
    corpus = corpus_of(lengths, seed)
    total_positions = int(corpus.positions.sum())
    ep = layout(name, B, T, seed).epoch(corpus)
    batches = list(ep)
    stats = epoch_stats(ep)
    assert stats["valid_tokens"] == total_positions
    mask = np.concatenate([b.mask.ravel() for b in batches])
    assert stats["total_slots"] == mask.size
    assert stats["pad_fraction"] == pytest.approx(float((mask == 0).mean()))
    assert len(batches) == len(ep) == len(ep.shapes)
    assert [b.x.shape for b in batches] == list(ep.shapes)


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_batches(name, lengths, B, T, seed):
    corpus = corpus_of(lengths, seed)
    a = list(layout(name, B, T, seed).epoch(corpus, 1))
    b = list(layout(name, B, T, seed).epoch(corpus, 1))
    assert len(a) == len(b)
    for u, v in zip(a, b):
        for f in ("x", "y", "mask", "reset"):
            np.testing.assert_array_equal(getattr(u, f), getattr(v, f))


@pytest.mark.parametrize("name", STRATEGIES)
def test_epochs_and_seeds_change_the_order(name):
    corpus = corpus_of(list(range(5, 45)))
    a = np.concatenate([b.x.ravel() for b in layout(name, 4, 8, 0).epoch(corpus, 0)])
    b = np.concatenate([b.x.ravel() for b in layout(name, 4, 8, 0).epoch(corpus, 1)])
    c = np.concatenate([b.x.ravel() for b in layout(name, 4, 8, 1).epoch(corpus, 0)])
    assert not np.array_equal(a, b) and not np.array_equal(a, c), name


@settings(max_examples=30, deadline=None)
@given(lengths=lengths_st, B=B_st, T=T_st, seed=st.integers(0, 3))
@pytest.mark.parametrize("name", STRATEGIES)
def test_footprint_bounds_the_epoch(name, lengths, B, T, seed):
    """What the memory estimate reads (``Layout.footprint``) is at least what the epoch builds."""
    corpus = corpus_of(lengths, seed)
    built = layout(name, B, T, seed)
    fp = built.footprint(int(corpus.positions.sum()), int(corpus.positions.max()))
    largest = max(b.total_slots for b in built.epoch(corpus))
    assert fp.step_slots >= largest and fp.held_slots >= largest and fp.gathered_tokens >= 0


# --------------------------------------------------------------------------- option checks
def _alternatives(spec: Any) -> List[str]:
    return [] if isinstance(spec, list) else [a.strip() for a in str(spec).split(" or ")]


def bad_values(default: Any, spec: Any = None) -> List[Any]:
    """Values an option must refuse: by its schema type where it has one, else by its default."""
    if isinstance(spec, list):
        return ["no-such-value", 1.5]
    kinds = _alternatives(spec) if spec is not None else []
    if any(k.startswith("file") for k in kinds):
        return ["does/not/exist.txt"]
    if any(k.startswith("int") for k in kinds) or (not kinds and isinstance(default, int)
                                                   and not isinstance(default, bool)):
        return [-1, 1.5, "abc", True]
    if any(k.startswith("number") for k in kinds) or isinstance(default, float):
        return [-1, "abc"]
    if "bool" in kinds or isinstance(default, bool):
        return ["no", 1]
    return [object()]


def leaves(options: Dict[str, Any], schema: Dict[str, Any], prefix: Tuple[str, ...] = ()) -> Iterator:
    """``(path, default, schema type)`` of every option, nested ones included."""
    for key, value in options.items():
        spec = (schema or {}).get(key)
        if isinstance(value, dict):
            yield from leaves(value, spec if isinstance(spec, dict) else {}, prefix + (key,))
        else:
            yield prefix + (key,), value, spec


def with_value(cfg: Dict[str, Any], path: Tuple[str, ...], value: Any) -> Dict[str, Any]:
    out = dict(cfg)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = with_value(dict(out[path[0]]), path[1:], value)
    return out


@pytest.fixture
def text_file(tmp_path) -> str:
    path = tmp_path / "train.txt"
    path.write_text("".join(f"line {i} of the temporary corpus\n" for i in range(60)))
    return str(path)


def plugin_config(group: str, name: str, text_file: str) -> Dict[str, Any]:
    """The yaml's config, with each required file option (a ``file`` that may not be null, such
    as textfile's ``path``) set to a temporary text file."""
    cfg = registry.group_config(group, name)
    for path, value, spec in leaves(registry.plugin_options(cfg), cfg.get("schema") or {}):
        if value is None and "null" not in _alternatives(spec):
            assert "file" in _alternatives(spec), f"conf/{group}/{name}.yaml: {'.'.join(path)} has no default"
            cfg = with_value(cfg, path, text_file)
    return cfg


def build(group: str, cfg: Dict[str, Any]) -> Any:
    return registry.build_layout(cfg, 4, 8, 0) if group == "strategy" else registry.build_dataset(cfg)


PLUGINS = [("strategy", n) for n in STRATEGIES] + [("data", n) for n in DATA]


@pytest.mark.parametrize("group,name", PLUGINS, ids=[f"{g}={n}" for g, n in PLUGINS])
def test_plugin_builds_from_its_defaults_and_refuses_unknown_options(group, name, text_file):
    cfg = plugin_config(group, name, text_file)
    assert build(group, cfg).name == name
    with pytest.raises(ConfigError) as err:
        build(group, {**cfg, "no_such_option": 3})
    assert str(err.value) == f"{group}.no_such_option=3: not an option of {group}={name}"


@pytest.mark.parametrize("group,name", PLUGINS, ids=[f"{g}={n}" for g, n in PLUGINS])
def test_plugin_refuses_bad_values_in_one_line(group, name, text_file):
    cfg = plugin_config(group, name, text_file)
    checked = 0
    for path, default, spec in leaves(registry.plugin_options(cfg), cfg.get("schema") or {}):
        for bad in bad_values(default, spec):
            with pytest.raises(ConfigError) as err:
                build(group, with_value(cfg, path, bad))
            msg = str(err.value)
            assert msg.startswith(f"{group}.{'.'.join(path)}=") and "\n" not in msg, (path, bad, msg)
            checked += 1
    if group == "strategy":   # the sizes every layout takes
        for args, key in (((0, 8, 0), "train.batch_size"), ((4, -1, 0), "train.window"),
                          ((4, 8, "abc"), "train.seed"), ((4, 1.5, 0), "train.window")):
            with pytest.raises(ConfigError, match=rf"^{key}="):
                registry.build_layout(cfg, *args)
            checked += 1
    assert checked


def test_registry_refuses_unknown_names_and_classes():
    with pytest.raises(ConfigError, match=r"^strategy='sorted': allowed: "):
        registry.build_layout({"name": "sorted"}, 2, 2)
    with pytest.raises(ConfigError, match=r"^data='imagenet': allowed: "):
        registry.build_dataset({"name": "imagenet"})
    with pytest.raises(ConfigError, match=r"^strategy._target_=.resetbench.layouts.Sorted.: .*names no importable"):
        registry.build_layout({"name": "x", "_target_": "resetbench.layouts.Sorted"}, 2, 2)


# --------------------------------------------------------------------------- data sources
@pytest.mark.parametrize("name", DATA)
def test_dataset_loads_deterministically_with_limits(name, text_file):
    cfg = {**plugin_config("data", name, text_file), "max_train_sequences": 40, "max_eval_sequences": 3}
    a, b = (registry.build_dataset(cfg).load(0) for _ in range(2))
    assert a.name == name and 0 < len(a.train) <= 40 and 0 < len(a.eval) <= 3
    assert a.summary()["data_hash"] == b.summary()["data_hash"]
    for split in ("train", "eval"):
        x, y = getattr(a, split), getattr(b, split)
        np.testing.assert_array_equal(x.data, y.data)
        np.testing.assert_array_equal(x.offsets, y.offsets)
    size = registry.build_dataset(cfg).size()
    assert (size.train_sequences, size.eval_sequences) == (len(a.train), len(a.eval))
    assert size.train_longest >= int(a.train.positions.max()) and size.eval_longest >= int(a.eval.positions.max())
    assert size.train_tokens > 0 and size.load_bytes > 0


def test_limits_are_shared():
    """``max_*_sequences`` keep the first N of a split for every source (the base class's)."""
    from benchmarks.data import DataSource, Dataset

    class Fixed(DataSource):
        name = "fixed"

        def build(self) -> Dataset:
            return Dataset(self.name, Corpus.from_sequences([b"a", b"bb", b"ccc"]),
                           Corpus.from_sequences([b"x", b"yy"]), "test")

    ds = Fixed(max_train_sequences=2, max_eval_sequences=1).load()
    assert [ds.train.sequence(k) for k in range(len(ds.train))] == [b"a", b"bb"] and ds.eval.sequence(0) == b"x"
    assert len(Fixed().load().train) == 3
    with pytest.raises(ConfigError, match=r"^data.max_eval_sequences=0: must be a positive integer or null$"):
        Fixed(max_eval_sequences=0)
