"""Figures from the result tables (``benchmarks.results``): pure functions, no rerunning.

Each ``plot_*(table(s), path, ...)`` draws one figure from DataFrames shaped like
``results/tables/*.csv`` and writes it as a PNG at ``path`` (returned). Aggregates use completed
runs only (the ``complete`` column); a figure whose rows are missing raises :class:`NoData`,
which the command line turns into a note. Experiments are picked by the ``experiment`` column
(``compare``, ``waste``, ``window``; the ``*_debug`` sweeps work the same way).

    python -m benchmarks.plots [--tables results/tables] [--out results/figures] [--suffix _debug]

rebuilds every figure, plus ``summary.csv`` / ``summary.md`` (:func:`summary_table`).

Backends and strategies are those of ``conf/`` (plus any other name a table holds), in sorted
order; each gets its color (strategies) or marker (backends) from a fixed palette by its place in
that order, so a new backend or strategy is drawn without a change here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks import registry  # noqa: E402
from benchmarks.study_report import format_ranking, plot_study_curves, ranking  # noqa: E402

RESET_AWARE = ("exact", "peer_reset")   # the kernel roles drawn against reset density (kernels_figure)
PEER = "peer"   # the pseudo-strategy of runs of a framework's own variable-length baseline (see select)
# by sorted name: packed, padded, peer, reset_all keep their colors (then the rest of tab10), and
# jax, keras, numpy, torch their markers; names past the end of a palette cycle through it
STRATEGY_COLORS = ("#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#1f77b4", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")
BACKEND_MARKERS = ("s", "^", "x", "o", "D", "v", "P", "*", "<", ">")
TABLES = ("runs", "steps", "evals", "lengths", "kernels", "matmul")


class NoData(ValueError):
    """The tables hold no rows for this figure."""


# --------------------------------------------------------------------------- helpers
def load_tables(folder: str) -> Dict[str, pd.DataFrame]:
    """``runs``, ``steps``, ``evals``, ``lengths`` from ``folder`` (an empty frame for a missing file)."""
    out = {}
    for name in TABLES:
        path = os.path.join(folder, f"{name}.csv")
        try:
            out[name] = pd.read_csv(path, low_memory=False)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            out[name] = pd.DataFrame()
    return out


def _truthy(col: pd.Series) -> pd.Series:
    return col.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))


def roles(df: pd.DataFrame) -> pd.Series:
    """Each row's kernel role (``kernel_role``: exact, native, peer, peer_reset, from the backend's declaration).
    Tables written before the column existed: ``peer`` for a ``kernel`` label with ``.peer.``,
    ``native`` for one with ``.native.`` or a ``kernel_option`` of ``native``, else ``exact``."""
    role = df["kernel_role"] if "kernel_role" in df.columns else pd.Series(np.nan, index=df.index, dtype=object)
    missing = role.isna()
    if missing.any():
        label = df["kernel"].astype(str) if "kernel" in df.columns else pd.Series("", index=df.index)
        option = df["kernel_option"].astype(str) if "kernel_option" in df.columns else pd.Series("", index=df.index)
        old = np.where(label.str.contains(".peer.", regex=False) | (option == "peer"), "peer",
                       np.where(label.str.contains(".native.", regex=False) | (option == "native"), "native", "exact"))
        role = role.where(~missing, pd.Series(old, index=df.index))
    return role.astype(str)


def select(df: pd.DataFrame, experiment=None, complete: bool = True) -> pd.DataFrame:
    """Rows of one experiment, or of a tuple of them (all if None), completed runs only unless
    ``complete`` is False. Runs of a framework's own variable-length baseline (``kernel_role`` peer,
    i.e. ``backend.kernel=peer``; see :func:`roles` for older tables) get ``strategy`` = ``peer``."""
    if df is None or not len(df):
        return pd.DataFrame()
    out = df
    if experiment is not None:
        if "experiment" not in out.columns:
            return pd.DataFrame()
        wanted = (experiment,) if isinstance(experiment, str) else tuple(experiment)
        out = out[out["experiment"].isin(wanted)]
    if "strategy" in out.columns and len(out):
        peer = roles(out) == "peer"
        if peer.any():
            out = out.copy()
            out.loc[peer, "strategy"] = "peer"
    if complete:
        if "complete" in out.columns:
            out = out[_truthy(out["complete"])]
        elif "status" in out.columns:
            out = out[out["status"] == "completed"]
    return out


def _need(df: pd.DataFrame, what: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    if df is None or not len(df):
        raise NoData(f"no completed runs for {what}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise NoData(f"{what}: the table has no column {', '.join(missing)}")
    df = df.dropna(subset=list(columns)) if columns else df
    if not len(df):
        raise NoData(f"{what}: no rows with {', '.join(columns)}")
    return df


def strategy_names() -> List[str]:
    """The strategies of conf/strategy/ and the :data:`PEER` pseudo-strategy, sorted."""
    return sorted(set(registry.group_options("strategy")) | {PEER})


def backend_names() -> List[str]:
    """The backends of conf/backend/, sorted."""
    return registry.group_options("backend")


def _palette(known: Sequence[str], palette: Sequence[str]) -> Dict[str, str]:
    """Name -> palette entry by sorted place among ``known``."""
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(known))}


def strategy_color(strategy: str) -> str:
    """A strategy's color (the same in every figure)."""
    return _palette(strategy_names(), STRATEGY_COLORS).get(str(strategy), "grey")


def backend_marker(backend: str) -> str:
    """A backend's marker (the same in every figure)."""
    return _palette(backend_names(), BACKEND_MARKERS).get(str(backend), "o")


def _ordered(values, order: Sequence[str]) -> List[str]:
    present = [str(v) for v in pd.unique(pd.Series(values).dropna())]
    return [v for v in order if v in present] + sorted(v for v in present if v not in order)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _finished_runs(runs: pd.DataFrame, experiment: Optional[str]) -> Optional[set]:
    """run_dirs of the completed runs of ``experiment`` (None: no runs table to filter with)."""
    if runs is None or not len(runs) or "run_dir" not in runs.columns:
        return None
    return set(select(runs, experiment)["run_dir"])


# --------------------------------------------------------------------------- (a) throughput
def plot_throughput(runs: pd.DataFrame, path: str, experiment: Optional[str] = "compare") -> str:
    """Valid tokens/s by backend (groups) x strategy (bars): median over seeds, one point per run."""
    df = _need(select(runs, experiment), f"throughput ({experiment})",
               ["backend", "strategy", "valid_tokens_per_s"])
    backends, strategies = _ordered(df["backend"], backend_names()), _ordered(df["strategy"], strategy_names())
    width = 0.8 / len(strategies)
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(backends), 4))
    labelled = set()
    for j, s in enumerate(strategies):
        for i, b in enumerate(backends):
            vals = df[(df["backend"] == b) & (df["strategy"] == s)]["valid_tokens_per_s"].astype(float)
            if not len(vals):
                continue
            x = i + (j - (len(strategies) - 1) / 2) * width
            ax.bar(x, vals.median(), width * 0.9, color=strategy_color(s), alpha=0.75,
                   label=None if s in labelled else s)
            labelled.add(s)
            jitter = np.linspace(-width * 0.2, width * 0.2, len(vals)) if len(vals) > 1 else [0.0]
            ax.scatter(x + np.asarray(jitter), vals, color="black", s=12, zorder=3)
            if len(vals) > 1:
                ax.vlines(x, vals.min(), vals.max(), color="black", lw=1, zorder=3)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("valid tokens / s (timed steps)")
    n_seeds = df.groupby(["backend", "strategy"]).size().max()
    cells = sorted(set(df["cell"].dropna().astype(str))) if "cell" in df.columns else []
    cell = f"{'/'.join(c.upper() for c in cells)} " if cells else ""
    ax.set_title(f"{cell}Training throughput per valid token (bar: median of {n_seeds} run(s); dots: runs)")
    ax.legend(title="strategy", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- (b) padding
def plot_padding(runs: pd.DataFrame, path: str, experiment: Optional[str] = "compare") -> str:
    """Fraction of the B x T slots that are padding, by strategy (mean over runs, dots: runs)."""
    df = _need(select(runs, experiment), f"padding ({experiment})", ["strategy", "pad_fraction"])
    strategies = _ordered(df["strategy"], strategy_names())
    fig, ax = plt.subplots(figsize=(1.5 + 1.5 * len(strategies), 3.6))
    for i, s in enumerate(strategies):
        vals = df[df["strategy"] == s]["pad_fraction"].astype(float)
        ax.bar(i, vals.mean(), 0.6, color=strategy_color(s), alpha=0.75)
        ax.scatter(np.full(len(vals), i), vals, color="black", s=10, zorder=3)
        ax.annotate(f"{vals.mean():.1%}", (i, vals.mean()), ha="center", va="bottom",
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_ylim(0, max(0.05, float(df["pad_fraction"].max()) * 1.2))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_ylabel("padding fraction of training slots")
    ax.set_title("Padding by strategy")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- (c, d) loss curves
def _plot_eval_curves(evals: pd.DataFrame, runs: Optional[pd.DataFrame], path: str, x: str,
                      xlabel: str, title: str, experiment: Optional[str]) -> str:
    df = select(evals, experiment, complete=False)
    keep = _finished_runs(runs, experiment)
    if keep is not None and len(df):
        df = df[df["run_dir"].isin(keep)]
    elif len(df) and "status" in df.columns:
        df = df[df["status"] == "completed"]
    df = _need(df, f"eval curves ({experiment})", ["run_dir", "backend", "strategy", x, "eval_loss"])
    backends = _ordered(df["backend"], backend_names())
    fig, axes = plt.subplots(1, len(backends), figsize=(4.2 * len(backends), 3.8), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, b in zip(axes[0], backends):
        sub = df[df["backend"] == b]
        for s in _ordered(sub["strategy"], strategy_names()):
            for k, (_, run) in enumerate(sub[sub["strategy"] == s].groupby("run_dir")):
                run = run.sort_values(x)
                ax.plot(run[x].astype(float), run["eval_loss"].astype(float), color=strategy_color(s),
                        marker=".", ms=4, lw=1.2, alpha=0.8, label=s if k == 0 else None)
        ax.set_title(b)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, title="strategy")
    axes[0][0].set_ylabel("eval loss (nats / token)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_loss_vs_time(evals: pd.DataFrame, path: str, runs: Optional[pd.DataFrame] = None,
                      experiment: Optional[str] = "compare") -> str:
    """Eval loss against training wall-clock time (evaluation excluded), one line per run."""
    return _plot_eval_curves(evals, runs, path, "elapsed_s", "training wall-clock time (s)",
                             "Eval loss vs training time", experiment)


def plot_loss_vs_tokens(evals: pd.DataFrame, path: str, runs: Optional[pd.DataFrame] = None,
                        experiment: Optional[str] = "compare") -> str:
    """Eval loss against valid training tokens seen, one line per run."""
    return _plot_eval_curves(evals, runs, path, "valid_tokens_seen", "valid training tokens seen",
                             "Eval loss vs valid tokens", experiment)


# --------------------------------------------------------------------------- (e) gain vs padding
MATCH_KEYS = ("sweep", "backend", "seed", "data_hash", "data", "data.length.sigma", "window", "batch_size")


def gains(runs: pd.DataFrame, experiment: Optional[str] = "waste", against: str = "padded") -> pd.DataFrame:
    """For every run of ``against`` and the packed run on the same data (same sweep, backend, seed,
    data hash, B, T): ``pad_fraction`` (of ``against``), ``packed_pad_fraction``, ``gain`` =
    packed valid tokens/s / ``against`` valid tokens/s, ``ideal`` = (1 - packed pad) / (1 - pad)."""
    df = select(runs, experiment)
    cols = ["strategy", "valid_tokens_per_s", "pad_fraction"]
    if not len(df) or any(c not in df.columns for c in cols):
        return pd.DataFrame(columns=["pad_fraction", "gain", "ideal"])
    keys = [k for k in MATCH_KEYS if k in df.columns and not (k == "window" and against == "padded")]
    base = df[df["strategy"] == against][keys + ["valid_tokens_per_s", "pad_fraction"]]
    packed = df[df["strategy"] == "packed"][keys + ["valid_tokens_per_s", "pad_fraction"]]
    merged = base.merge(packed, on=keys, suffixes=("", "_packed"), how="inner").dropna(
        subset=["valid_tokens_per_s", "valid_tokens_per_s_packed"])
    merged = merged.rename(columns={"pad_fraction_packed": "packed_pad_fraction"})
    merged["gain"] = merged["valid_tokens_per_s_packed"].astype(float) / merged["valid_tokens_per_s"].astype(float)
    merged["ideal"] = (1 - merged["packed_pad_fraction"].astype(float)) / (1 - merged["pad_fraction"].astype(float))
    merged["against"] = against
    return merged.reset_index(drop=True)


def plot_gain_vs_padding(runs: pd.DataFrame, path: str, experiment: Optional[str] = "waste") -> str:
    """Throughput gain of packed over padded (and over reset_all) against the baseline's padding
    fraction, with the ideal 1 / (1 - pad): packing saves exactly the padded slots."""
    parts = [g for g in (gains(runs, experiment, "padded"), gains(runs, experiment, "reset_all")) if len(g)]
    if not parts:
        raise NoData(f"no matched packed / padded runs for the gain plot ({experiment})")
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    top = 0.0
    for g in parts:
        against = g["against"].iloc[0]
        ax.scatter(g["pad_fraction"], g["gain"], color=strategy_color(against), s=28, zorder=3,
                   label=f"packed / {against}")
        top = max(top, float(g["pad_fraction"].max()))
    p = np.linspace(0, min(0.97, max(top * 1.08, 0.1)), 200)
    ax.plot(p, 1 / (1 - p), color="black", lw=1, ls="--", label="ideal 1 / (1 - pad)")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("padding fraction of the baseline (padded / reset_all)")
    ax.set_ylabel("gain: packed valid tokens/s / baseline's")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title("What packing buys, by how much padding it removes")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _save(fig, path)


# --------------------------------------------------------------------------- (f) lengths
def _median_from_bins(h: pd.DataFrame) -> float:
    cum = h["count"].cumsum().to_numpy() / max(h["count"].sum(), 1)
    return float(h["bin_hi"].to_numpy()[min(np.searchsorted(cum, 0.5), len(h) - 1)])


def plot_lengths(lengths: pd.DataFrame, path: str) -> str:
    """Sequence lengths (target positions) from the ``lengths`` table (bin counts), one panel per
    data source (``data``), one line per dataset: a histogram, or for heavy-tailed sources
    (longest > 6x the median) the cumulative fraction on a log axis, which shows the tail."""
    df = _need(lengths, "length histogram", ["dataset", "bin_lo", "bin_hi", "count"])
    sources = list(pd.unique(df["data"])) if "data" in df.columns else [None]
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 3.6), squeeze=False,
                             layout="constrained")
    for ax, src in zip(axes[0], sources):
        sub = df if src is None else df[df["data"] == src]
        hists = [(name, h.sort_values("bin_lo")) for name, h in sub.groupby("dataset", sort=False)]
        longest = {name: float(h.loc[h["count"] > 0, "bin_hi"].max()) if (h["count"] > 0).any() else 0.0
                   for name, h in hists}
        heavy = max(longest[n] / max(_median_from_bins(h), 1.0) for n, h in hists) > 6
        for name, h in hists:
            total = int(h["count"].sum())
            label = f"{name} (n={total:,}, longest < {longest[name]:.0f})"
            if heavy:
                cum = np.concatenate([[0.0], h["count"].cumsum().to_numpy(float) / max(total, 1)])
                ax.step(np.append(h["bin_lo"].to_numpy(float)[:1], h["bin_hi"].to_numpy(float)), cum,
                        where="post", label=label)
            else:
                edges = np.append(h["bin_lo"].to_numpy(float), float(h["bin_hi"].iloc[-1]))
                ax.stairs(h["count"].to_numpy(float) / max(total, 1), edges, label=label,
                          fill=len(hists) == 1, alpha=0.8)
        if heavy:
            ax.set_xscale("log")
            ax.set_ylabel("fraction of sequences shorter than x")
        else:
            ax.set_xlim(0, max(longest.values()) or 1)
            ax.set_ylabel("fraction of sequences")
        ax.set_xlabel("sequence length (target positions, bytes + 1)")
        ax.set_title(str(src) if src is not None else "lengths")
        ax.legend(frameon=False, fontsize=8, loc="upper left" if heavy else "best")
        ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- (g) window
def plot_loss_vs_window(runs: pd.DataFrame, path: str, experiment: Optional[str] = "window") -> str:
    """Final eval loss (and valid tokens/s) against the truncation window T, at equal valid tokens."""
    df = _need(select(runs, experiment), f"window ({experiment})", ["window", "eval_loss"])
    df = df.assign(window=df["window"].astype(float))
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8), layout="constrained")
    for key, ax, label in (("eval_loss", axes[0], "eval loss (nats / token)"),
                           ("valid_tokens_per_s", axes[1], "valid tokens / s")):
        if key not in df.columns:
            ax.set_visible(False)
            continue
        groups = df.groupby(["backend", "strategy"]) if {"backend", "strategy"} <= set(df.columns) else [(("", ""), df)]
        for (b, s), g in groups:
            med = g.groupby("window")[key].median()
            ax.plot(med.index, med.values, color=strategy_color(s), marker=backend_marker(b),
                    label=f"{b} {s}".strip())
            ax.scatter(g["window"], g[key].astype(float), color="black", s=10, zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(df["window"].unique()), [str(int(w)) for w in sorted(df["window"].unique())])
        ax.set_xlabel("training window T (steps of truncated BPTT)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    tokens = df["valid_tokens"].median() if "valid_tokens" in df.columns else None
    fig.suptitle("Truncation window" + (f" at {tokens:,.0f} valid tokens" if tokens == tokens and tokens else ""))
    return _save(fig, path)


# --------------------------------------------------------------------------- summary table
def _loss_at(evals: pd.DataFrame, run_dir: str, tokens: float) -> float:
    e = evals[evals["run_dir"] == run_dir].sort_values("valid_tokens_seen")
    if not len(e) or tokens > e["valid_tokens_seen"].max():
        return float("nan")
    return float(np.interp(tokens, e["valid_tokens_seen"].astype(float), e["eval_loss"].astype(float)))


def summary_table(runs: pd.DataFrame, evals: Optional[pd.DataFrame] = None,
                  experiment: Optional[str] = "compare") -> pd.DataFrame:
    """Per backend, the strategies ranked by median valid tokens/s (completed runs), with
    ``speedup_vs_padded`` (median packed, resp. each strategy's, valid tokens/s over padded's) and
    ``eval_loss_diff_vs_padded`` (median eval loss minus padded's at equal valid tokens: with
    ``evals``, each run's eval curve interpolated at the fewest valid tokens any run of that
    backend reached; without, the final eval loss, equal tokens by the fixed token budget)."""
    cols = ["backend", "rank", "strategy", "runs", "valid_tokens_per_s_median", "valid_tokens_per_s_min",
            "valid_tokens_per_s_max", "speedup_vs_padded", "pad_fraction", "eval_loss_median",
            "eval_loss_diff_vs_padded", "at_valid_tokens"]
    df = select(runs, experiment)
    if not len(df) or not {"backend", "strategy", "valid_tokens_per_s"} <= set(df.columns):
        return pd.DataFrame(columns=cols)
    rows = []
    for b in _ordered(df["backend"], backend_names()):
        sub = df[df["backend"] == b].copy()
        at = None
        if evals is not None and len(evals) and {"run_dir", "valid_tokens_seen", "eval_loss"} <= set(evals.columns):
            ev = evals[evals["run_dir"].isin(sub["run_dir"])]
            if len(ev) and ev["run_dir"].nunique() == len(sub):
                at = float(ev.groupby("run_dir")["valid_tokens_seen"].max().min())
                sub["loss_eq"] = [_loss_at(ev, r, at) for r in sub["run_dir"]]
        if at is None:
            sub["loss_eq"] = sub["eval_loss"].astype(float) if "eval_loss" in sub.columns else np.nan
            at = float(sub["valid_tokens"].median()) if "valid_tokens" in sub.columns else np.nan
        agg = {}
        for s, g in sub.groupby("strategy"):
            rate = g["valid_tokens_per_s"].astype(float)
            agg[s] = {"runs": len(g), "valid_tokens_per_s_median": rate.median(),
                      "valid_tokens_per_s_min": rate.min(), "valid_tokens_per_s_max": rate.max(),
                      "pad_fraction": g["pad_fraction"].astype(float).mean() if "pad_fraction" in g else np.nan,
                      "eval_loss_median": g["loss_eq"].median()}
        base = agg.get("padded")
        ranked = sorted(agg, key=lambda s: -agg[s]["valid_tokens_per_s_median"])
        for rank, s in enumerate(ranked, 1):
            a = agg[s]
            rows.append({"backend": b, "rank": rank, "strategy": s, **a,
                         "speedup_vs_padded": a["valid_tokens_per_s_median"] / base["valid_tokens_per_s_median"]
                         if base else np.nan,
                         "eval_loss_diff_vs_padded": a["eval_loss_median"] - base["eval_loss_median"]
                         if base else np.nan,
                         "at_valid_tokens": at})
    return pd.DataFrame(rows, columns=cols)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub table (no tabulate needed)."""
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            if v != v:
                return "-"
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# reset-aware kernels of other libraries (role peer_reset): square hollow markers, thinner lines and
# a "peer_reset:" label, so they read apart from this project's exact kernels
PEER_RESET_STYLE = {"marker": "s", "markerfacecolor": "none", "lw": 1.0}


def _density_lines(ax, rows: pd.DataFrame, column: str, shapes, colors: Dict) -> None:
    """One line per (backend, kernel) and shape: ``column`` against reset density (in %); rows
    with role ``peer_reset`` drawn as :data:`PEER_RESET_STYLE`."""
    styles = ["-", "--", ":", "-."]
    rows = rows.assign(cell=rows["cell"].fillna("lstm") if "cell" in rows.columns else "lstm")
    if "role" not in rows.columns:
        rows = rows.assign(role="exact")
    for (backend, kernel, cell, role), g in rows.groupby(["backend", "kernel", "cell", "role"]):
        color = colors.setdefault((backend, kernel, cell), f"C{len(colors) % 10}")
        style, tag = (PEER_RESET_STYLE, "peer_reset: ") if role == "peer_reset" else ({"marker": "o"}, "")
        for shape, ls in zip(shapes, styles):
            sub = g[(g["B"] == shape[0]) & (g["T"] == shape[1]) & (g["H"] == shape[2])].sort_values("density")
            if len(sub):
                ax.plot(sub["density"] * 100, sub[column].astype(float), ls, color=color, **style,
                        label=f"{tag}{kernel} {cell.upper()} B{shape[0]} T{shape[1]} H{shape[2]}")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, rows["density"].max() * 100 * 1.1 + 0.1)
    ax.set_xlabel("reset density (% of positions)")


def _shared_legend(fig, axes) -> None:
    """One legend for the density panels (they draw the same kernels in the same colours), under
    the figure in four columns: 20-30 lines would hide the data inside an axes."""
    handles: Dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=4, fontsize=7, frameon=False)


def _peak_panel(ax, ker: pd.DataFrame, mm: pd.DataFrame) -> None:
    """Bars: useful model FLOP/s as a share of the best matmul peak, the reset-aware kernels at 3%
    resets (exact C1, other libraries' ``peer_reset`` C2) and the baselines (no resets, C0)."""
    baseline = ker["role"].isin(["native", "peer"])
    at3 = ker[(ker["density"].round(4) == 0.03) | baseline]
    labels, vals, bar_colors = [], [], []
    for r in at3.sort_values(["backend", "B", "kernel"]).itertuples():
        tag = "no resets" if r.role in ("native", "peer") else "3% resets"
        cell = str(getattr(r, "cell", "lstm") or "lstm")
        labels.append(("peer_reset: " if r.role == "peer_reset" else "")
                      + f"{r.kernel} {cell.upper()} ({tag}) B{r.B} T{r.T} H{r.H}")
        vals.append(r.peak_fraction * 100)
        bar_colors.append("C0" if tag == "no resets" else ("C2" if r.role == "peer_reset" else "C1"))
    ax.barh(range(len(vals)), vals, color=bar_colors)
    ax.set_yticks(range(len(vals)), labels, fontsize=6)
    ax.axvline(60, color="red", ls="--", lw=0.8, label="target 60%")
    if len(mm):
        sq = mm[mm["gemm"].str.startswith("square")]
        peak = sq["gflops"].max()
        ax.set_title("Model FLOP/s, % of best matmul peak (" + ", ".join(
            f"{r.backend} {r.gflops:.0f}" for r in sq.itertuples()) + f" GFLOP/s; best {peak:.0f})", fontsize=8)
    ax.set_xlabel("% of peak")
    ax.invert_yaxis()
    ax.legend(fontsize=7)


def _ratio_panel(ax, rows: pd.DataFrame, shapes, colors: Dict, scope: str, ylabel: str) -> None:
    """Reset-cost ratios against density, with the 1.0 line and the 0.9x target."""
    _density_lines(ax, rows, "reset_cost_ratio", shapes, colors)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.9, color="red", lw=0.8, ls="--", label="target 0.9x")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Cost of per-sample resets ({scope})")


def kernels_figure(kernels, matmul, path: str) -> str:
    """``kernels.png`` from ``python -m benchmarks.kernels``: each reset-aware kernel's (role
    ``exact``, and other libraries' ``peer_reset``, drawn apart: :data:`PEER_RESET_STYLE`)
    tokens/s over its framework's ``native`` kernel (same shape) against reset density, with the
    0.9x target, for the full train step and (rows with ``scope`` layer) the layers alone; the absolute tokens/s of backends that declare no ``native`` kernel; and useful
    model FLOP/s as a share of the best measured matmul peak. Roles come from ``kernel_role``
    (:func:`roles` for older tables)."""
    ker = _need(pd.DataFrame(kernels) if kernels is not None else None, "kernel benchmark rows (kernels.csv; "
                "python -m benchmarks.kernels)", ["tokens_per_s"])
    ker = ker.assign(role=roles(ker))
    if "reset_cost_ratio" not in ker.columns:
        ker = ker.assign(reset_cost_ratio=np.nan)
    scope = ker["scope"].fillna("step") if "scope" in ker.columns else pd.Series("step", index=ker.index)
    layer, ker = ker[scope == "layer"], ker[scope == "step"]      # tables before layer rows: all steps
    mm = pd.DataFrame(matmul) if matmul is not None else pd.DataFrame()
    exact = ker[ker["role"].isin(RESET_AWARE)]
    ratio = exact[exact["reset_cost_ratio"].notna()]
    layer_ratio = layer[layer["role"].isin(RESET_AWARE) & layer["reset_cost_ratio"].notna()]
    absolute = exact[~exact["backend"].isin(ratio["backend"])]
    panels = [p for p, rows in (("ratio", ratio), ("layer", layer_ratio), ("absolute", absolute)) if len(rows)]
    panels.append("peak")
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6.5), squeeze=False,
                             gridspec_kw={"wspace": 0.75})
    shapes, colors = sorted({(int(r.B), int(r.T), int(r.H)) for r in ker.itertuples()}), {}
    for ax, panel in zip(axes[0], panels):
        if panel == "ratio":
            _ratio_panel(ax, ratio, shapes, colors, "full train step",
                         "tokens/s / the native no-reset layer's (same cell)")
        elif panel == "layer":
            _ratio_panel(ax, layer_ratio, shapes, colors, "recurrent layers alone",
                         "layer forward+backward speed / the native layer's (same cell)")
        elif panel == "absolute":
            _density_lines(ax, absolute, "tokens_per_s", shapes, colors)
            ax.set_ylabel("tokens/s (full train step)")
            ax.set_title("Backends without a native kernel: tokens/s")
        else:
            _peak_panel(ax, ker, mm)
    _shared_legend(fig, [ax for ax, panel in zip(axes[0], panels) if panel != "peak"])
    return _save(fig, path)


# --------------------------------------------------------------------------- command line
def figure_specs(suffix: str = "") -> List[Tuple[str, Callable[[Mapping[str, pd.DataFrame], str], str]]]:
    """(file name, draw(tables, path)) for every figure; ``suffix`` picks e.g. the _debug experiments."""
    c, w, win = f"compare{suffix}", f"waste{suffix}", f"window{suffix}"
    return [
        *[(f"throughput{cell}.png",             # one per cell of conf/cell/ (registry.cell_suffixes)
           lambda t, p, cell=cell: plot_throughput(t["runs"], p, (f"compare{cell}{suffix}", f"peers{cell}{suffix}")))
          for cell in registry.cell_suffixes()],
        ("padding.png", lambda t, p: plot_padding(t["runs"], p, c)),
        ("loss_vs_time.png", lambda t, p: plot_loss_vs_time(t["evals"], p, t["runs"], c)),
        ("loss_vs_tokens.png", lambda t, p: plot_loss_vs_tokens(t["evals"], p, t["runs"], c)),
        ("gain_vs_padding.png", lambda t, p: plot_gain_vs_padding(t["runs"], p, w)),
        ("lengths.png", lambda t, p: plot_lengths(t["lengths"], p)),
        ("loss_vs_window.png", lambda t, p: plot_loss_vs_window(t["runs"], p, win)),
        ("kernels.png", lambda t, p: kernels_figure(t.get("kernels"), t.get("matmul"), p)),
        *[(f"{e}.png", lambda t, p, e=e: plot_study_curves(t["evals"], t["runs"], p, f"{e}{suffix}"))
          for e in STUDIES],
        ("loss_vs_window_chapters.png", lambda t, p: plot_loss_vs_window(t["runs"], p, f"window_chapters{suffix}")),
    ]


# the summary tables, one per cell of conf/cell/: name, and the suffix of the compare / peers
# experiments they summarize (summary: the default cell's, summary_gru: the GRU's)
SUMMARIES = tuple((f"summary{sfx}", sfx) for sfx in registry.cell_suffixes())

# the fair study's experiments (the plans in conf/study/, run by benchmarks/study.py): a ranking
# table and eval-loss curves each
STUDIES = tuple(registry.study_experiments())


def write_rankings(runs: pd.DataFrame, out: str, suffix: str = "", echo: Callable[[str], None] = print) -> List[str]:
    """``ranking_<study>.csv`` (numbers) and ``.md`` (medians with intervals) for every study with runs."""
    written = []
    for study in STUDIES:
        table = ranking(runs, f"{study}{suffix}")
        if not len(table):
            echo(f"  skipped ranking_{study}: no completed final runs of {study}{suffix}")
            continue
        table.to_csv(os.path.join(out, f"ranking_{study}.csv"), index=False, float_format="%.6g")
        with open(os.path.join(out, f"ranking_{study}.md"), "w") as fh:
            fh.write(to_markdown(format_ranking(table)))
        written += [os.path.join(out, f"ranking_{study}.{ext}") for ext in ("csv", "md")]
        echo(f"  wrote {written[-1]}")
    return written


def build_all(tables: Mapping[str, pd.DataFrame], out: str, suffix: str = "",
              echo: Callable[[str], None] = print) -> List[str]:
    """Every figure and the summary table into ``out``; a figure without data is skipped with a note."""
    os.makedirs(out, exist_ok=True)
    written = []
    for name, draw in figure_specs(suffix):
        path = os.path.join(out, name)
        try:
            written.append(draw(tables, path))
            echo(f"  wrote {path}")
        except NoData as exc:
            echo(f"  skipped {name}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one bad figure must not stop the others
            plt.close("all")
            echo(f"  skipped {name}: {type(exc).__name__}: {exc}")
    for name, cell in SUMMARIES:
        experiments = (f"compare{cell}{suffix}", f"peers{cell}{suffix}")
        table = summary_table(tables["runs"], tables.get("evals"), experiments)
        if not len(table):
            echo(f"  skipped {name} table: no completed {experiments[0]} runs")
            continue
        table.to_csv(os.path.join(out, f"{name}.csv"), index=False, float_format="%.6g")
        with open(os.path.join(out, f"{name}.md"), "w") as fh:
            fh.write(to_markdown(table))
        written += [os.path.join(out, f"{name}.csv"), os.path.join(out, f"{name}.md")]
        echo(f"  wrote {written[-1]}")
    return written + write_rankings(tables["runs"], out, suffix, echo)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plots",
                                 description="Rebuild every figure from the committed tables.")
    ap.add_argument("--tables", default=os.path.join("results", "tables"), help="folder of runs.csv etc.")
    ap.add_argument("--out", default=os.path.join("results", "figures"), help="folder for the PNGs")
    ap.add_argument("--suffix", default="", help="experiment name suffix, e.g. _debug for the debug sweeps")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.tables):
        print(f"note: no tables in {args.tables}: run python -m benchmarks.results first; nothing drawn")
        return 0
    tables = load_tables(args.tables)
    print(f"tables {args.tables}: " + ", ".join(f"{k} {len(v)} rows" for k, v in tables.items()))
    build_all(tables, args.out, args.suffix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
