"""Lifelong metrics from the accuracy matrix (docs/lifequant.md, "Metrics"; the paper's own definition of its
"forgetting rate" was not found, so these are the standard ones).

``a[t, k]`` = top-1 on ``test_k`` after finishing task ``t`` (last epoch, as the original code's "best" checkpoint
is its last epoch), defined for ``k <= t``.

- ``A_T = (1/T) Σ_k a[T-1, k]`` (the quantity the original ``main.py`` averages over tasks);
- ``f_k = max_{k <= l < T-1} a[l, k] - a[T-1, k]`` and ``F_T = mean_{k < T-1} f_k`` (forgetting: the drop from
  the best accuracy task ``k`` ever had to its final one);
- ``BWT = mean_{k < T-1} (a[T-1, k] - a[k, k])`` (backward transfer: final minus just-learned accuracy).

``F_T + BWT = mean_{k < T-1} (max_{k <= l < T-1} a[l, k] - a[k, k]) >= 0`` (:func:`forgetting_minus_bwt`): the two
coincide (``F_T = -BWT``) exactly when every old task is at its best right after it was learned, and differ when
a task's accuracy *rose* after it was learned (e.g. replay re-taught it). With one task, ``F_T`` and ``BWT`` are
NaN.

A method that never learns a task cannot forget it: ``f_k`` of a task whose ``a[k, k]`` is near 0 is near 0
whatever the method does. :func:`learned_tasks` and :func:`forgetting_on` judge forgetting on the tasks a method
did learn (``a[k, k] >= LEARNED_THRESHOLD``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

#: a task counts as learned when its top-1 right after training on it, ``a[k, k]``, is at least this
LEARNED_THRESHOLD = 0.5


def accuracy_matrix(acc: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Validate ``a[t, k]`` as a float ``[T, T]`` array with finite entries for ``k <= t``; NaN above."""
    a = np.array(acc, dtype=np.float64)  # None (a run that stopped) becomes NaN
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square [T, T] with T >= 1, got shape {a.shape}")
    lower = np.tril(np.ones_like(a, dtype=bool))
    if not np.isfinite(a[lower]).all():
        raise ValueError("the accuracy matrix needs a finite a[t, k] for every k <= t (task k seen at t)")
    a[~lower] = np.nan
    return a


def forgetting_per_task(acc: Sequence[Sequence[float]] | np.ndarray) -> list[float]:
    """``[f_k for k < T-1]``, ``f_k = max_{k <= l < T-1} a[l, k] - a[T-1, k]``."""
    a = accuracy_matrix(acc)
    last = a.shape[0] - 1
    return [float(np.max(a[k:last, k]) - a[last, k]) for k in range(last)]


def lifelong_metrics(acc: Sequence[Sequence[float]] | np.ndarray) -> dict[str, object]:
    """``{"A_T", "F_T", "BWT", "forgetting": [f_k for k < T-1]}`` from ``a[t, k]``, JSON-native."""
    a = accuracy_matrix(acc)
    last = a.shape[0] - 1
    avg = float(np.mean(a[last]))
    if last == 0:
        return {"A_T": avg, "F_T": math.nan, "BWT": math.nan, "forgetting": []}
    forgetting = forgetting_per_task(a)
    bwt = float(np.mean([a[last, k] - a[k, k] for k in range(last)]))
    return {"A_T": avg, "F_T": float(np.mean(forgetting)), "BWT": bwt, "forgetting": forgetting}


def forgetting_minus_bwt(acc: Sequence[Sequence[float]] | np.ndarray) -> float:
    """``F_T + BWT = mean_{k < T-1} (max_{k <= l < T-1} a[l, k] - a[k, k])``: 0 exactly when every old task was at
    its best right after it was learned; positive when some task's accuracy rose later. NaN for one task."""
    a = accuracy_matrix(acc)
    last = a.shape[0] - 1
    if last == 0:
        return math.nan
    return float(np.mean([np.max(a[k:last, k]) - a[k, k] for k in range(last)]))


def learned_tasks(acc: Sequence[Sequence[float]] | np.ndarray, threshold: float = LEARNED_THRESHOLD) -> list[bool]:
    """Per task ``k``: whether ``a[k, k] >= threshold`` (the task was learned when it was trained)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in [0, 1] (a top-1 fraction)")
    a = accuracy_matrix(acc)
    return [bool(a[k, k] >= threshold) for k in range(a.shape[0])]


def forgetting_on(acc: Sequence[Sequence[float]] | np.ndarray, tasks: Iterable[int]) -> float:
    """``mean f_k`` over the old tasks ``tasks`` (each ``< T-1``); NaN when ``tasks`` is empty."""
    f = forgetting_per_task(acc)
    ks = sorted(set(int(k) for k in tasks))
    bad = [k for k in ks if not 0 <= k < len(f)]
    if bad:
        raise ValueError(f"tasks {bad} are not old tasks: forgetting is defined for tasks 0..{len(f) - 1}")
    return float(np.mean([f[k] for k in ks])) if ks else math.nan
