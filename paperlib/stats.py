"""Summary statistics over seeds: mean and a Student-t confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half_width)`` of the two-sided Student-t interval; half-width NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, half


def summarize(df: pd.DataFrame, by: Sequence[str] | str, value_cols: Sequence[str],
              confidence: float = 0.95) -> pd.DataFrame:
    """One row per group: ``<col>_mean``, ``<col>_ci`` (half-width) and ``n`` (number of seeds)."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        for col in value_cols:
            row[f"{col}_mean"], row[f"{col}_ci"] = mean_ci(g[col].to_list(), confidence)
        row["n"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_ci(mean: float, half: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"97.3 ± 0.4"`` (values scaled, e.g. accuracy to %); just the mean when the CI is undefined."""
    if half is None or math.isnan(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"
