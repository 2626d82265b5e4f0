"""The fair study: learning rates tuned per strategy with the same budget, then every strategy at
its best rate over seeds, at matched work. Tuning and final runs share the plan's Hydra
experiment (its name in the tables); they differ by ``data.heldout`` (validation or eval).

``python -m benchmarks.study conf/study/verses.yaml [--phase tune|final|all] [--dry-run]`` runs a
plan (a yaml file in ``conf/study/``):

1. **tune**: for each strategy, a sweep over the plan's ``lr_grid`` on the tuning backend and
   seeds, evaluated on the *validation* split (``data.heldout=validation``: neither train nor the
   reported eval set). Every strategy gets the same grid, seeds and token budget.
2. **select** (code, from the tables): per strategy, the rate with the lowest median validation
   loss at the end of the budget (ties: the smaller rate); written to ``study_lr.csv``.
3. **final**: for each strategy, a sweep over the plan's backends and seeds at that rate,
   evaluated on the eval split, with periodic evaluations and eval-loss targets (time to target).

A plan with ``lr_from: <other plan>`` has no tuning of its own: its final phase takes the rates the
other plan's tuning chose (``study_lr_<other>.csv``), so ``--phase all`` runs the final phase only
(``conf/study/chapters.yaml`` reuses the verses rates; tuning again would double the study's
time). ``--lr-from`` on the command line does the same for any plan.

Each strategy carries its own overrides (``strategies:`` in the plan) so that every strategy
trains on about the same number of valid tokens per optimizer step. Every job runs in a process of
its own through ``run.py -m`` (one after another). The study's runs are collected like any sweep
(``python -m benchmarks.results``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

import pandas as pd
import yaml

from benchmarks.registry import ROOT

PHASES = ("tune", "final", "all")


def load_plan(path: str) -> Dict[str, Any]:
    """A study plan; missing keys are an error naming the file."""
    with open(path) as fh:
        plan = yaml.safe_load(fh) or {}
    need = ("name", "experiment", "backends", "seeds", "lr_grid", "tune", "strategies")
    missing = [k for k in need if k not in plan]
    if missing:
        raise SystemExit(f"error: {path}: missing {', '.join(missing)} (see conf/study/verses.yaml)")
    source = plan.get("lr_from")
    if source is not None and not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), f"{source}.yaml")):
        raise SystemExit(f"error: {path}: lr_from={source!r}: no plan {source}.yaml beside it")
    return plan


def sweep_command(plan: Mapping[str, Any], strategy: str, phase: str, sweep_dir: str,
                  lr: Optional[float] = None) -> List[str]:
    """``run.py -m`` for one strategy of one phase."""
    overrides = [f"+experiment={plan['experiment']}", f"strategy={strategy}", *plan["strategies"][strategy],
                 *plan.get("overrides", [])]
    if phase == "tune":
        tune = plan["tune"]
        overrides += [f"backend={tune['backend']}", "train.seed=" + ",".join(map(str, tune["seeds"])),
                      "train.lr=" + ",".join(map(str, plan["lr_grid"])), *tune.get("overrides", [])]
    else:
        overrides += ["backend=" + ",".join(plan["backends"]), "train.seed=" + ",".join(map(str, plan["seeds"])),
                      f"train.lr={lr}"]
    return [sys.executable, os.path.join(ROOT, "run.py"), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]


def run_sweeps(plan: Mapping[str, Any], phase: str, root: str, lrs: Mapping[str, float], dry: bool) -> List[str]:
    """One sweep per strategy; returns the sweep directories. A failed job does not stop the
    study (its status is in its summary); a sweep that stops on a signal does."""
    dirs = []
    for strategy in plan["strategies"]:
        sweep_dir = os.path.join(root, f"{plan['name']}_{phase}_{strategy}")
        cmd = sweep_command(plan, strategy, phase, sweep_dir, lrs.get(strategy))
        print(f"[{phase}] {strategy}: {' '.join(cmd[1:])}", flush=True)
        dirs.append(sweep_dir)
        if dry:
            continue
        t0 = time.perf_counter()
        code = subprocess.call(cmd, cwd=ROOT)
        print(f"[{phase}] {strategy}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
        if code not in (0, 1):                    # 1: some job did not complete; anything else: stop
            raise SystemExit(code)
    return dirs


def select_lr(runs: pd.DataFrame) -> pd.DataFrame:
    """The selection rule: per strategy, the learning rate whose completed tuning runs reach the
    lowest median final (validation) eval loss; ties go to the smaller rate. One row per
    (strategy, lr) with ``median_eval_loss``, ``runs`` and ``chosen``."""
    done = runs[runs["status"] == "completed"]
    table = (done.groupby(["strategy", "lr"])["eval_loss"].agg(["median", "count"]).reset_index()
             .rename(columns={"median": "median_eval_loss", "count": "runs"}))
    table["chosen"] = False
    for strategy, g in table.groupby("strategy"):
        best = g.sort_values(["median_eval_loss", "lr"], kind="stable").index[0]
        table.loc[best, "chosen"] = True
    return table.sort_values(["strategy", "lr"]).reset_index(drop=True)


def chosen_rates(table: pd.DataFrame) -> Dict[str, float]:
    return {r.strategy: float(r.lr) for r in table[table["chosen"]].itertuples()}


def main(argv=None) -> int:
    from benchmarks.results import collect_many
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n")[0])
    ap.add_argument("plan", nargs="?", default=os.path.join(ROOT, "conf", "study", "verses.yaml"))
    ap.add_argument("--phase", default="all", choices=PHASES)
    ap.add_argument("--root", default=os.path.join(ROOT, "results", "runs"), help="where the sweeps go")
    ap.add_argument("--tables", default=os.path.join(ROOT, "results", "tables"), help="where study_lr.csv goes")
    ap.add_argument("--lr-from", default=None, metavar="PLAN", help="final phase: the rates chosen by another "
                    "plan's tuning (its study_lr_PLAN.csv), instead of this plan's (default: the plan's lr_from)")
    ap.add_argument("--dry-run", action="store_true", help="print the sweeps, run nothing")
    args = ap.parse_args(argv)
    plan = load_plan(args.plan)
    lr_from = args.lr_from or plan.get("lr_from")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    root = os.path.join(args.root, f"study_{plan['name']}_{stamp}")
    lr_path = os.path.join(args.tables, f"study_lr_{plan['name']}.csv")
    t0 = time.perf_counter()
    if args.phase == "tune" or (args.phase == "all" and not lr_from):
        dirs = run_sweeps(plan, "tune", root, {}, args.dry_run)
        if not args.dry_run:
            runs, _, _, _ = collect_many(dirs)
            table = select_lr(runs)
            os.makedirs(args.tables, exist_ok=True)
            table.to_csv(lr_path, index=False, float_format="%.6g")
            print(table.to_string(index=False))
    if args.phase in ("final", "all"):
        source = os.path.join(args.tables, f"study_lr_{lr_from}.csv") if lr_from else lr_path
        if args.dry_run and not os.path.isfile(source):
            rates = {s: plan["lr_grid"][0] for s in plan["strategies"]}
        elif not os.path.isfile(source):
            raise SystemExit(f"error: {source}: no tuning table (run --phase tune first)")
        else:
            rates = chosen_rates(pd.read_csv(source))
            missing = [s for s in plan["strategies"] if s not in rates]
            if missing:
                raise SystemExit(f"error: {source}: no rate for {', '.join(missing)}")
        run_sweeps(plan, "final", root, rates, args.dry_run)
    print(f"study {plan['name']}: {time.perf_counter() - t0:.0f} s; runs in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
