"""Statistics over seeds: the median, and a 95% confidence interval of the mean (Student's t).

With the few seeds a study can afford (3 to 5), a bootstrap interval is little more than the
range of the values and covers too rarely; the t interval widens honestly with few seeds
(t = 4.30 for 3 seeds). Missing values (a target never reached) are counted, not dropped
silently: ``n`` is the number of seeds with a value, ``missing`` the others.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

LEVEL = 0.95


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (SciPy)."""
    from scipy.stats import t
    return float(t.ppf(p, df))


def summarize(values: Iterable[Optional[float]], level: float = LEVEL) -> Dict[str, float]:
    """``n``, ``missing``, ``median``, ``mean``, ``ci_lo``, ``ci_hi`` of the finite values
    (the interval is NaN with fewer than two)."""
    values = list(values)
    x = np.asarray([float(v) for v in values if v is not None and math.isfinite(float(v))], float)
    out = {"n": int(len(x)), "missing": len(values) - int(len(x)),
           "median": float(np.median(x)) if len(x) else math.nan,
           "mean": float(x.mean()) if len(x) else math.nan, "ci_lo": math.nan, "ci_hi": math.nan}
    if len(x) >= 2:
        half = t_quantile(0.5 + level / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
        out["ci_lo"], out["ci_hi"] = out["mean"] - half, out["mean"] + half
    return out


def summarize_by(df: pd.DataFrame, by: Sequence[str], value: str, level: float = LEVEL) -> pd.DataFrame:
    """One row per group of ``by``: :func:`summarize` of column ``value`` over the group's rows."""
    rows = []
    for key, g in df.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), **summarize(list(g[value]), level)})
    return pd.DataFrame(rows, columns=list(by) + ["n", "missing", "median", "mean", "ci_lo", "ci_hi"])
