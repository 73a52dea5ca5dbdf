"""A per-class accuracy figure any notebook can draw from its metrics (mean over seeds, 95 % CI)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..claims import mean_interval


def per_class_accuracy_figure(per_class: Mapping[str, Sequence[Sequence[float]]],
                              class_names: Sequence[str] | None = None, title: str = "",
                              xlabel: str = "class") -> Figure:
    """Grouped bars: for each method (``per_class[method]`` = one list of per-class accuracies per seed, in
    [0, 1]), the mean test accuracy of every class in %, with the 95 % Student-t CI over seeds as error bars
    (none for a single seed). The x axis lists the classes (``class_names`` or 0..K-1)."""
    methods = list(per_class)
    if not methods:
        raise ValueError("per_class_accuracy_figure needs at least one method")
    k = len(per_class[methods[0]][0])
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 0.55 * k * max(1, len(methods)) ** 0.5 + 2), 3.6))
    ax = fig.add_subplot()
    x = np.arange(k)
    n_seeds = set()
    for i, m in enumerate(methods):
        arr = np.asarray(per_class[m], dtype=float) * 100  # [seeds, K]
        n_seeds.add(arr.shape[0])
        stats = [mean_interval(arr[:, c]) for c in range(k)]
        mean = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1], s[2] - s[0]] if s[3] >= 2 else [0.0, 0.0] for s in stats]).T
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=m,
               error_kw={"linewidth": 0.8})
    ax.set_xticks(x, names, rotation=0 if k <= 12 else 90)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_ylim(0, 105)
    n = ", ".join(str(v) for v in sorted(n_seeds))
    ax.set_title(title or f"Per-class test accuracy, mean over {n} seed(s), 95 % CI")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
