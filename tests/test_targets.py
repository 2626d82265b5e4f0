"""Time to target: the first crossing of an eval-loss target, interpolated between evaluations."""

from __future__ import annotations

import pytest

from benchmarks.targets import columns, reach, time_to_targets

EVALS = [{"train_s": 0.0, "tokens": 0, "steps": 0, "eval_loss": 5.0},
         {"train_s": 10.0, "tokens": 1000, "steps": 10, "eval_loss": 3.0},
         {"train_s": 20.0, "tokens": 2000, "steps": 20, "eval_loss": 2.0},
         {"train_s": 30.0, "tokens": 3000, "steps": 30, "eval_loss": 2.5}]


def test_crossing_is_interpolated_linearly_on_every_axis():
    hit = reach(EVALS, 2.5)                 # halfway between the evaluations at 10 and 20
    assert hit == pytest.approx({"train_s": 15.0, "tokens": 1500, "steps": 15})
    assert reach(EVALS, 3.0) == {"train_s": 10.0, "tokens": 1000.0, "steps": 10.0}   # exactly reached


def test_first_crossing_counts_and_unreached_targets_are_missing():
    assert reach(EVALS, 2.0)["steps"] == 20      # the later rise back to 2.5 does not matter
    assert reach(EVALS, 1.9) is None
    assert reach(EVALS, 6.0) == {"train_s": 0.0, "tokens": 0.0, "steps": 0.0}   # already at the start


def test_nan_evaluations_never_reach_and_names_are_stable():
    nan = [dict(EVALS[0]), {**EVALS[1], "eval_loss": float("nan")}, EVALS[2]]
    assert reach(nan, 2.5) == {"train_s": 20.0, "tokens": 2000.0, "steps": 20.0}   # no bridge over NaN
    assert list(time_to_targets(EVALS, [2.0, 1.5])) == ["2", "1.5"]
    assert columns([2.0]) == ["ttt_train_s@2", "ttt_tokens@2", "ttt_steps@2"]


def test_summary_over_seeds_is_median_and_a_t_interval():
    import math

    from benchmarks.stats import summarize
    s = summarize([1.0, 2.0, 3.0, None])
    assert (s["n"], s["missing"], s["median"], s["mean"]) == (3, 1, 2.0, 2.0)
    half = 4.302652729911275 * 1.0 / math.sqrt(3)         # t(0.975, 2) x sd / sqrt(n)
    assert s["ci_lo"] == pytest.approx(2.0 - half) and s["ci_hi"] == pytest.approx(2.0 + half)
    one = summarize([5.0])
    assert one["median"] == 5.0 and math.isnan(one["ci_lo"])
