"""Time to target: when a run's eval loss first reached a given value, in training wall time, valid
tokens and optimizer steps.

Evaluations are periodic (``eval.every_steps``), so the crossing is interpolated linearly between
the last evaluation above the target and the first at or below it; a target never reached is
``None`` (missing, not a made-up number). The first evaluation counts from where training stood
then (an evaluation at step 0 is the starting point when there is one). Pure Python.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

AXES = ("train_s", "tokens", "steps")     # training clock seconds, valid tokens seen, optimizer steps


def reach(evals: Sequence[Mapping[str, float]], target: float) -> Optional[Dict[str, float]]:
    """``evals``: rows with ``eval_loss`` and the axes (``train_s``, ``tokens``, ``steps``) in
    training order. Returns the interpolated axes where ``eval_loss`` first went down to
    ``target``, or None if it never did."""
    prev = None
    for row in evals:
        loss = row.get("eval_loss")
        if loss is None or loss != loss:         # NaN: a diverged evaluation never reaches anything
            prev = None
            continue
        if loss <= target:
            if prev is None or prev["eval_loss"] == loss:
                return {a: float(row[a]) for a in AXES}
            f = (prev["eval_loss"] - target) / (prev["eval_loss"] - loss)
            return {a: float(prev[a] + f * (row[a] - prev[a])) for a in AXES}
        prev = row
    return None


def time_to_targets(evals: Sequence[Mapping[str, float]], targets: Iterable[float]) -> Dict[str, Optional[Dict[str, float]]]:
    """``{"<target>": reach(...)}`` for every target, keyed by the target written as in the config."""
    return {format_target(t): reach(evals, float(t)) for t in targets}


def format_target(target: float) -> str:
    """``1.8`` -> ``"1.8"``, ``2.0`` -> ``"2"``: the key of a target in summaries and columns."""
    return f"{float(target):g}"


def columns(targets: Iterable[float]) -> List[str]:
    """The runs-table columns of these targets: ``ttt_<axis>@<target>``."""
    return [f"ttt_{a}@{format_target(t)}" for t in targets for a in AXES]
