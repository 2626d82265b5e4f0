"""The study's ranking table and curves, from the result tables (``benchmarks.study`` runs them).

- :func:`ranking`: per backend, every strategy of the final runs (evaluated on the eval split)
  with its learning rate, seeds, valid tokens per optimizer step, throughput, final eval loss and
  the time to the ranking target, ranked by the median training time to that target. Medians over
  seeds with a 95% t interval of the mean (:mod:`benchmarks.stats`). The ranking target is the
  lowest eval-loss target that every final run reached (or, if none was, the highest).
- :func:`plot_study_curves`: eval loss against training time, valid tokens and optimizer steps,
  per backend; the median over seeds as a line, their range as a band.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from benchmarks.stats import summarize
from benchmarks.targets import format_target

X_AXES = (("elapsed_s", "training time (s)"), ("valid_tokens_seen", "valid training tokens"),
          ("step", "optimizer steps"))


def final_runs(runs: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """Completed runs of ``experiment`` evaluated on the eval split (not the tuning runs)."""
    if runs is None or not len(runs) or "experiment" not in runs.columns:
        return pd.DataFrame()
    out = runs[(runs["experiment"] == experiment) & (runs["status"] == "completed")]
    if "data.heldout" in out.columns:
        out = out[out["data.heldout"].fillna("eval") == "eval"]
    return out


def targets_of(runs: pd.DataFrame) -> List[float]:
    """The eval-loss targets the runs recorded (their ``ttt_train_s@T`` columns), highest first."""
    ts = {float(c.split("@", 1)[1]) for c in runs.columns if c.startswith("ttt_train_s@")}
    return sorted(ts, reverse=True)


def ranking_target(runs: pd.DataFrame) -> Optional[float]:
    """The lowest target every run reached; else the highest target (None without targets)."""
    ts = targets_of(runs)
    reached = [t for t in ts if runs[f"ttt_train_s@{format_target(t)}"].notna().all()]
    return min(reached) if reached else (ts[0] if ts else None)


def ranking(runs: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """One row per (backend, strategy) of the final runs, ranked within each backend."""
    df = final_runs(runs, experiment)
    if not len(df):
        return pd.DataFrame()
    target = ranking_target(df)
    rows = []
    for (backend, strategy), g in df.groupby(["backend", "strategy"]):
        row = {"backend": backend, "strategy": strategy, "lr": float(g["lr"].median()), "seeds": len(g),
               "valid_tokens_per_step": float((g["valid_tokens"] / g["steps"]).median()),
               "valid_tokens_per_s": float(g["valid_tokens_per_s"].median()),
               "pad_fraction": float(g["pad_fraction"].median())}
        loss = summarize(list(g["eval_loss"]))
        row.update(eval_loss=loss["median"], eval_loss_ci_lo=loss["ci_lo"], eval_loss_ci_hi=loss["ci_hi"])
        if target is not None:
            key = format_target(target)
            t = summarize(list(g[f"ttt_train_s@{key}"]))
            row.update(target=target, reached=f"{t['n']}/{len(g)}", time_to_target_s=t["median"],
                       time_ci_lo=t["ci_lo"], time_ci_hi=t["ci_hi"],
                       tokens_to_target=float(g[f"ttt_tokens@{key}"].median()),
                       steps_to_target=float(g[f"ttt_steps@{key}"].median()))
        rows.append(row)
    table = pd.DataFrame(rows)
    sort = "time_to_target_s" if "time_to_target_s" in table.columns else "eval_loss"
    table["rank"] = table.groupby("backend")[sort].rank(method="min", na_option="bottom").astype(int)
    return table.sort_values(["backend", "rank", "strategy"]).reset_index(drop=True)


def _band(curves: Sequence[pd.DataFrame], x: str, points: int = 60):
    """Median and range over seeds of eval loss on a common grid of ``x`` (up to the shortest run)."""
    top = min(float(c[x].max()) for c in curves)
    grid = np.linspace(0.0, top, points)
    ys = np.array([np.interp(grid, c[x].to_numpy(float), c["eval_loss"].to_numpy(float)) for c in curves])
    return grid, np.median(ys, 0), ys.min(0), ys.max(0)


def plot_study_curves(evals: pd.DataFrame, runs: pd.DataFrame, path: str, experiment: str) -> str:
    """Eval loss against training time, tokens and steps; rows: backends; lines: strategies."""
    from benchmarks import plots
    NoData, plt = plots.NoData, plots.plt
    df = final_runs(runs, experiment)
    if not len(df) or evals is None or not len(evals):
        raise NoData(f"no completed final runs of {experiment}")
    ev = evals[evals["run_dir"].isin(df["run_dir"])]
    backends = sorted(df["backend"].unique())
    fig, axes = plt.subplots(len(backends), len(X_AXES), figsize=(4.2 * len(X_AXES), 3.0 * len(backends)),
                             squeeze=False, sharey=True)
    target = ranking_target(df)
    for i, backend in enumerate(backends):
        for j, (x, label) in enumerate(X_AXES):
            ax = axes[i][j]
            for strategy, g in df[df["backend"] == backend].groupby("strategy"):
                curves = [c.sort_values(x) for _, c in ev[ev["run_dir"].isin(g["run_dir"])].groupby("run_dir")]
                if not curves:
                    continue
                grid, mid, lo, hi = _band(curves, x)
                color = plots.strategy_color(strategy)
                ax.plot(grid, mid, color=color, label=f"{strategy} (lr {g['lr'].median():g})")
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)
            if target is not None:
                ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{backend}\neval loss (nats/token)")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{experiment}: eval loss (median over seeds, band: their range; dotted: the ranking target)")
    fig.tight_layout()
    return plots._save(fig, path)


def format_ranking(table: pd.DataFrame) -> pd.DataFrame:
    """The ranking for people: intervals as ``median [lo, hi]`` strings."""
    def ci(m, lo, hi, fmt, floor=None):
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return "-"
        lo = lo if floor is None or math.isnan(lo) else max(lo, floor)     # a time is never negative
        inner = "" if (isinstance(lo, float) and math.isnan(lo)) else f" [{lo:{fmt}}, {hi:{fmt}}]"
        return f"{m:{fmt}}{inner}"
    out = table[["backend", "rank", "strategy", "lr", "seeds"]].copy()
    if "time_to_target_s" in table.columns:
        out["time to target (s)"] = [ci(r.time_to_target_s, r.time_ci_lo, r.time_ci_hi, ".0f", 0.0)
                                     for r in table.itertuples()]
        out["reached"] = table["reached"]
        out["tokens to target"] = table["tokens_to_target"].map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}")
        out["steps to target"] = table["steps_to_target"].map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}")
    out["final eval loss"] = [ci(r.eval_loss, r.eval_loss_ci_lo, r.eval_loss_ci_hi, ".3f") for r in table.itertuples()]
    out["valid tokens/s"] = table["valid_tokens_per_s"].map(lambda v: f"{v:,.0f}")
    out["valid tokens/step"] = table["valid_tokens_per_step"].map(lambda v: f"{v:,.0f}")
    out["pad"] = table["pad_fraction"].map(lambda v: f"{v:.1%}")
    return out
