"""Collect run directories into tidy tables: one row per run, one row per step, one per evaluation.

``collect(root)`` walks every directory under ``root`` that holds a run (``summary.json``,
``steps.csv`` or ``.hydra/config.yaml``) and returns ``(runs, steps, evals, problems)``:

- ``runs``: one row per run: every scalar of ``summary.json``; the run's config flattened with dots
  (``model.hidden``, ``data.length.sigma``; a config scalar whose name is also a summary key, such
  as the requested ``device``, becomes ``config.device``); ``run_dir`` (relative to ``root``),
  ``sweep`` (the multirun directory), ``experiment`` (the config's ``experiment`` key, else the
  sweep directory's name without its timestamp), ``status`` and ``complete``. Runs that were
  interrupted or terminated, are still running (``stale``: ``running``, but its process is gone), diverged
  or failed are kept and marked, never dropped.
- ``steps``, ``evals``: ``steps.csv`` / ``evals.csv`` rows with the run's keys (:data:`KEYS`)
  in front; ``steps`` also gets ``valid_tokens_seen`` (cumulative valid tokens).
- ``problems``: one line per run directory whose files are missing or broken (no or unparseable
  ``summary.json``, unreadable CSV). Such a run still gets a row, with status ``malformed``,
  filled from whatever is usable (config, steps.csv).

Command line (small tables meant to be committed)::

    python -m benchmarks.results [ROOT ...] [--out results/tables] [--steps-every 10] [--latest]

writes ``runs.csv``, ``steps.csv``, ``evals.csv``, ``environment.json`` and ``lengths.csv`` (the
sequence-length histograms of the datasets the experiments use, see :func:`length_tables`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from benchmarks.rundir import process_alive
from benchmarks.summary import STATUSES as SUMMARY_STATUSES, RunSummary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_MARKERS = ("summary.json", "steps.csv", os.path.join(".hydra", "config.yaml"))
STATUSES = SUMMARY_STATUSES + ("stale", "malformed")
# the run keys repeated in front of every steps/evals row
KEYS = ("run_dir", "experiment", "sweep", "backend", "strategy", "data", "seed", "window",
        "batch_size", "status")
ENV_KEYS = ("host_cpu", "host_cores", "host_memory_bytes", "platform", "device")
_STAMP = re.compile(r"[_-]?\d{4}-\d{2}-\d{2}[_T]\d{2}[-:]\d{2}[-:]\d{2}$")


# --------------------------------------------------------------------------- walking
def find_run_dirs(root: str) -> List[str]:
    """Every directory under ``root`` (itself included) holding a run marker; hidden directories
    (``.hydra``, ``.submitit``) are not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(os.path.isfile(os.path.join(dirpath, m)) for m in RUN_MARKERS):
            found.append(dirpath)
    return found


def experiment_from_sweep(sweep: str) -> str:
    """``compare_2026-01-02_03-04-05`` -> ``compare`` (a Hydra sweep directory's name)."""
    return _STAMP.sub("", sweep) or sweep


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": scalar}``; lists become JSON strings."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(list(v), default=str)
        else:
            out[key] = v
    return out


def _read_json(path: str) -> Tuple[Optional[dict], Optional[str]]:
    if not os.path.isfile(path):
        return None, "no summary.json"
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        return None, f"summary.json unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
    if not isinstance(data, dict):
        return None, "summary.json is not a JSON object"
    return data, None


def _read_hydra_config(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, ".hydra", "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        import yaml
        with open(path) as fh:
            data = yaml.safe_load(fh)
        return data if isinstance(data, dict) else None
    except Exception:  # noqa: BLE001 - a broken config is reported through the summary check
        return None


def _read_overrides(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    try:
        import yaml
        with open(path) as fh:
            data = yaml.safe_load(fh)
        return " ".join(map(str, data)) if isinstance(data, list) else None
    except Exception:  # noqa: BLE001
        return None


def _read_csv(path: str) -> Tuple[Optional[pd.DataFrame], Optional[str]]:
    """A run CSV, tolerating a torn last line; (None, problem) if it cannot be read at all."""
    if not os.path.isfile(path):
        return None, None
    name = os.path.basename(path)
    try:
        df = pd.read_csv(path, on_bad_lines="skip")
    except pd.errors.EmptyDataError:
        return None, f"{name} is empty"
    except Exception as exc:  # noqa: BLE001
        return None, f"{name} unreadable ({type(exc).__name__})"
    if "step" not in df.columns:
        return None, f"{name} has no header"
    with open(path, "rb") as fh:          # rows end in a newline: a last line without one was torn
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(size - 1, 0))
        torn = size > 0 and fh.read(1) != b"\n"
    if torn and len(df):
        df = df.iloc[:-1]
    for col in df.columns:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.dropna(subset=["step"])
    df["step"] = df["step"].astype("int64")
    return df, None


# --------------------------------------------------------------------------- one run
def read_run(run_dir: str, root: str) -> Tuple[Dict[str, Any], Optional[pd.DataFrame],
                                              Optional[pd.DataFrame], List[str]]:
    """One run directory -> (row, steps, evals, problems)."""
    rel = os.path.relpath(run_dir, root).replace(os.sep, "/")
    problems: List[str] = []
    summary, problem = _read_json(os.path.join(run_dir, "summary.json"))
    if problem:
        problems.append(problem)
    config = (summary or {}).get("config")
    if not isinstance(config, Mapping):
        config = _read_hydra_config(run_dir) or {}
    steps, p = _read_csv(os.path.join(run_dir, "steps.csv"))
    if p:
        problems.append(p)
    evals, p = _read_csv(os.path.join(run_dir, "evals.csv"))
    if p:
        problems.append(p)

    # the typed summary; without one, the identity fields from the run's config
    record = RunSummary.from_dict(summary) if summary is not None else RunSummary.from_config(config)
    fields = record.to_dict()
    metrics = {k: v for k, v in fields.items() if k != "config" and not isinstance(v, Mapping)}
    metrics = {k: json.dumps(v, default=str) if isinstance(v, (list, tuple)) else v for k, v in metrics.items()}
    row: Dict[str, Any] = {}
    for key, value in flatten(config).items():
        row[f"config.{key}" if key in metrics else key] = value
    row.update(metrics)
    if summary is None and steps is not None and len(steps):
        # usable leftovers of a run without a summary: totals from steps.csv
        valid, slots = steps.get("valid_tokens"), steps.get("total_slots")
        row["steps"] = int(steps["step"].max())
        if valid is not None and slots is not None:
            row["valid_tokens"] = int(valid.sum())
            row["total_slots"] = int(slots.sum())
            row["pad_fraction"] = 1.0 - valid.sum() / slots.sum() if slots.sum() else None
        if "loss" in steps:
            row["train_loss_last"] = float(steps["loss"].iloc[-1])
    parent = os.path.dirname(os.path.abspath(run_dir))
    inside = os.path.relpath(parent, os.path.abspath(root)).replace(os.sep, "/")
    sweep = inside if inside != "." and not inside.startswith("..") else os.path.basename(parent)
    experiment = config.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        is_sweep = os.path.isfile(os.path.join(parent, "multirun.yaml"))
        experiment = experiment_from_sweep(os.path.basename(parent)) if is_sweep else "single"
    status = record.status if summary is not None else "malformed"
    if status not in SUMMARY_STATUSES and status != "malformed":
        problems.append(f"summary.json has status {status!r}")
        status = "malformed"
    if status == "running" and process_alive(record.process_id, record.host, record.process_start_ticks) is False:
        status = "stale"                  # its process is gone without a final status
    row.update({"run_dir": rel if rel != "." else os.path.basename(os.path.abspath(run_dir)),
                "sweep": sweep, "experiment": experiment, "status": status,
                "complete": status == "completed", "problem": "; ".join(problems) or None,
                "overrides": _read_overrides(run_dir)})
    if steps is not None and "valid_tokens" in steps:
        steps = steps.copy()
        steps["valid_tokens_seen"] = steps["valid_tokens"].cumsum()
    return row, steps, evals, problems


def _with_keys(df: Optional[pd.DataFrame], row: Mapping[str, Any]) -> Optional[pd.DataFrame]:
    if df is None or not len(df):
        return None
    keys = pd.DataFrame({k: [row.get(k)] * len(df) for k in KEYS}, index=df.index)
    return pd.concat([keys, df], axis=1)


def _order_columns(runs: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in ("run_dir", "experiment", "sweep", "status", "complete", "backend", "strategy",
                         "data", "seed", "window", "batch_size", "valid_tokens_per_s", "pad_fraction",
                         "eval_loss", "valid_tokens", "steps", "problem") if c in runs.columns]
    return runs[first + sorted(c for c in runs.columns if c not in first)]


def collect(root: str, warn: bool = True) -> Tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, List[str]]:
    """Every run under ``root`` -> ``(runs, steps, evals, problems)`` (see the module docstring).
    ``problems`` lines read ``run_dir: what is wrong``; they are also printed to stderr
    unless ``warn`` is False."""
    rows, steps_parts, eval_parts, problems = [], [], [], []
    for run_dir in find_run_dirs(root):
        row, steps, evals, probs = read_run(run_dir, root)
        rows.append(row)
        problems += [f"{row['run_dir']}: {p}" for p in probs]
        for part, target in ((steps, steps_parts), (evals, eval_parts)):
            part = _with_keys(part, row)
            if part is not None:
                target.append(part)
    runs = _order_columns(pd.DataFrame(rows)) if rows else pd.DataFrame(columns=list(KEYS) + ["complete"])
    if len(runs):
        runs = runs.sort_values(["experiment", "run_dir"], kind="stable").reset_index(drop=True)
    steps_df = pd.concat(steps_parts, ignore_index=True) if steps_parts else pd.DataFrame(columns=list(KEYS))
    evals_df = pd.concat(eval_parts, ignore_index=True) if eval_parts else pd.DataFrame(columns=list(KEYS))
    if warn:
        for p in problems:
            print(f"warning: {os.path.join(root, p)}", file=sys.stderr)
    return runs, steps_df, evals_df, problems


def collect_many(roots: Sequence[str], warn: bool = True) -> Tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, List[str]]:
    """:func:`collect` over several roots, concatenated (``run_dir`` stays relative to its root)."""
    parts = [collect(r, warn=warn) for r in roots]
    cat = [pd.concat([p[i] for p in parts if len(p[i])], ignore_index=True)
           if any(len(p[i]) for p in parts) else parts[0][i] for i in range(3)]
    return cat[0], cat[1], cat[2], [x for p in parts for x in p[3]]


# --------------------------------------------------------------------------- shaping for commit
def latest_sweeps(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the newest campaign of each experiment: the newest sweep directory, or for a study
    (``benchmarks.study``: one folder of sweeps) the newest folder (names end in a timestamp)."""
    if not len(runs):
        return runs
    campaign = runs["sweep"].astype(str).str.split("/").str[0]
    newest = campaign.groupby(runs["experiment"]).max()
    return runs[campaign == runs["experiment"].map(newest)].reset_index(drop=True)


def downsample_steps(steps: pd.DataFrame, every: int) -> pd.DataFrame:
    """Every ``every``-th step of each run, plus its first and last step."""
    if every <= 1 or not len(steps):
        return steps
    last = steps.groupby("run_dir")["step"].transform("max")
    first = steps.groupby("run_dir")["step"].transform("min")
    keep = (steps["step"] % every == 0) | (steps["step"] == last) | (steps["step"] == first)
    return steps[keep].reset_index(drop=True)


def environment_table(runs: pd.DataFrame) -> Dict[str, Any]:
    """Where and with what the runs ran: machines, devices, kernels and every ``*_version``."""
    def uniq(col: str) -> list:
        if col not in runs.columns:
            return []
        vals = runs[col].dropna().unique().tolist()
        return sorted((v.item() if hasattr(v, "item") else v for v in vals), key=str)

    machines = []
    cols = [c for c in ("host_cpu", "host_cores", "host_memory_bytes", "platform") if c in runs.columns]
    if cols:
        for rec in runs[cols].dropna(how="all").drop_duplicates().to_dict("records"):
            machines.append({k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()
                             if not (isinstance(v, float) and math.isnan(v))})
    kernels: Dict[str, list] = {}
    if {"backend", "kernel"} <= set(runs.columns):
        for b, g in runs.dropna(subset=["kernel"]).groupby("backend"):
            kernels[str(b)] = sorted(map(str, g["kernel"].unique()))
    versions = {c[: -len("_version")]: uniq(c) for c in sorted(runs.columns)
                if c.endswith("_version") and c != "framework_version" and uniq(c)}
    counts = runs.groupby(["experiment", "status"]).size() if len(runs) else pd.Series(dtype=int)
    return {"collected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": int(len(runs)),
            "runs_by_experiment_status": {f"{e}/{s}": int(n) for (e, s), n in counts.items()},
            "machines": machines, "devices": uniq("device"), "kernels": kernels, "versions": versions}


# --------------------------------------------------------------------------- length histograms
def length_histogram(lengths: np.ndarray, dataset: str, bin_width: int = 8, **extra: Any) -> pd.DataFrame:
    """Bin counts of sequence lengths (target positions, n + 1): ``dataset, bin_lo, bin_hi, count``
    plus the ``extra`` columns; bins of ``bin_width`` from 0 to the longest."""
    lengths = np.asarray(lengths, np.int64)
    top = int(lengths.max()) if len(lengths) else 0
    edges = np.arange(0, top + bin_width + 1, bin_width)
    counts, _ = np.histogram(lengths, bins=edges)
    df = pd.DataFrame({"dataset": dataset, "bin_lo": edges[:-1], "bin_hi": edges[1:], "count": counts})
    for k, v in extra.items():
        df[k] = v
    return df


def _sweep_values(text: Any) -> List[str]:
    return [v.strip() for v in str(text).split(",") if v.strip()]


def length_tables(conf_dir: Optional[str] = None, bin_width: int = 8) -> pd.DataFrame:
    """Length histograms of the training sets the experiments use: KJV verses and chapters
    (``benchmarks.data.KJV``; chapters in bins 16 times wider) and the synthetic sets of
    ``conf/experiment/waste.yaml`` (one per swept ``data.length.sigma``)."""
    import yaml

    from benchmarks.data import KJV, Synthetic
    conf_dir = conf_dir or os.path.join(ROOT, "conf")
    parts = [length_histogram(KJV().load().train.positions, "kjv", bin_width, data="kjv", sigma=np.nan),
             length_histogram(KJV(unit="chapter").load().train.positions, "kjv chapters", 16 * bin_width,
                              data="kjv", sigma=np.nan)]
    with open(os.path.join(conf_dir, "experiment", "waste.yaml")) as fh:
        waste = yaml.safe_load(fh)
    with open(os.path.join(conf_dir, "data", "synthetic.yaml")) as fh:
        data = yaml.safe_load(fh)
    data.update({k: v for k, v in (waste.get("data") or {}).items() if k != "length"})
    length = {**data.get("length", {}), **(waste.get("data") or {}).get("length", {})}
    params = waste["hydra"]["sweeper"]["params"]
    for sigma in _sweep_values(params.get("data.length.sigma", length.get("sigma"))):
        spec = {**length, "sigma": float(sigma)}
        ds = Synthetic(int(data["train_sequences"]), int(data["eval_sequences"]), int(data["seed"]), spec).load()
        parts.append(length_histogram(ds.train.positions, f"synthetic sigma={sigma}", bin_width,
                                      data="synthetic", sigma=float(sigma)))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- command line
def write_tables(runs: pd.DataFrame, steps: pd.DataFrame, evals: pd.DataFrame, out: str,
                 steps_every: int = 10, lengths: Optional[pd.DataFrame] = None) -> List[str]:
    """Write the committed tables into ``out``; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, df in (("runs.csv", runs), ("steps.csv", downsample_steps(steps, steps_every)), ("evals.csv", evals)):
        path = os.path.join(out, name)
        df.to_csv(path, index=False, float_format="%.6g")
        paths.append(path)
    path = os.path.join(out, "environment.json")
    with open(path, "w") as fh:
        json.dump(environment_table(runs), fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    paths.append(path)
    if lengths is not None:
        path = os.path.join(out, "lengths.csv")
        lengths.to_csv(path, index=False)
        paths.append(path)
    return paths


def published_experiments() -> List[str]:
    """The experiments whose tables are committed: every ``conf/experiment/`` file but the ``_debug`` twins."""
    from benchmarks.registry import group_options
    return [e for e in group_options("experiment") if not e.endswith("_debug")]


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.results",
                                 description="Collect run directories into small CSV tables.")
    ap.add_argument("roots", nargs="*", default=[os.path.join("results", "runs")],
                    help="directories to walk (default results/runs)")
    ap.add_argument("--out", default=os.path.join("results", "tables"), help="output folder")
    ap.add_argument("--steps-every", type=int, default=10, metavar="K",
                    help="keep every K-th step of each run (plus its first and last) in steps.csv; 1 keeps all")
    ap.add_argument("--latest", action="store_true", help="keep only the newest sweep of each experiment")
    ap.add_argument("--experiments", default=None, metavar="A,B",
                    help="keep only these experiments (e.g. compare,waste,window); 'all': every experiment "
                    "in conf/experiment/ but the _debug twins")
    ap.add_argument("--no-lengths", action="store_true", help="do not write lengths.csv")
    args = ap.parse_args(list(argv) if argv is not None else None)
    missing = [r for r in args.roots if not os.path.isdir(r)]
    if missing:
        print(f"error: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs, steps, evals, problems = collect_many(args.roots)
    if args.experiments:
        keep = set(published_experiments() if args.experiments == "all" else _sweep_values(args.experiments))
        runs = runs[runs["experiment"].isin(keep)].reset_index(drop=True)
    if args.latest:
        runs = latest_sweeps(runs)
    if len(steps):
        steps = steps[steps["run_dir"].isin(runs["run_dir"])]
    if len(evals):
        evals = evals[evals["run_dir"].isin(runs["run_dir"])]
    lengths = None if args.no_lengths else length_tables()
    paths = write_tables(runs, steps, evals, args.out, args.steps_every, lengths)
    counts = runs.groupby(["experiment", "status"]).size().to_dict() if len(runs) else {}
    print(f"{len(runs)} runs ({', '.join(f'{e} {s}: {n}' for (e, s), n in sorted(counts.items())) or 'none'}); "
          f"{len(problems)} problem(s)")
    for p in paths:
        print(f"  wrote {p} ({os.path.getsize(p):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
