"""Lifelong metrics from the accuracy matrix (spec §2; the paper's exact definition is unknown).

``a[t, k]`` = top-1 on ``test_k`` after finishing task ``t`` (last epoch), defined for ``k <= t``.
``A_T = (1/T) Σ_k a[T-1, k]``; ``f_k = max_{k <= l < T-1} a[l, k] - a[T-1, k]``; ``F_T = mean_{k < T-1} f_k``;
``BWT = mean_{k < T-1} (a[T-1, k] - a[k, k])``. With one task, ``F_T`` and ``BWT`` are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy_matrix(acc: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Validate ``a[t, k]`` as a float ``[T, T]`` array with finite entries for ``k <= t``; NaN above."""
    a = np.array(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square [T, T] with T >= 1, got shape {a.shape}")
    lower = np.tril(np.ones_like(a, dtype=bool))
    if not np.isfinite(a[lower]).all():
        raise ValueError("the accuracy matrix needs a finite a[t, k] for every k <= t (task k seen at t)")
    a[~lower] = np.nan
    return a


def lifelong_metrics(acc: Sequence[Sequence[float]] | np.ndarray) -> dict[str, object]:
    """``{"A_T", "F_T", "BWT", "forgetting": [f_k for k < T-1]}`` from ``a[t, k]`` (spec §2), JSON-native."""
    a = accuracy_matrix(acc)
    last = a.shape[0] - 1
    avg = float(np.mean(a[last]))
    if last == 0:
        return {"A_T": avg, "F_T": math.nan, "BWT": math.nan, "forgetting": []}
    forgetting = [float(np.max(a[k:last, k]) - a[last, k]) for k in range(last)]
    bwt = float(np.mean([a[last, k] - a[k, k] for k in range(last)]))
    return {"A_T": avg, "F_T": float(np.mean(forgetting)), "BWT": bwt, "forgetting": forgetting}
