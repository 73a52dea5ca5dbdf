"""Figures of the quickstart notebook."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from . import register_figure


@register_figure("00_quickstart", "quickstart_accuracy")
def quickstart_accuracy(metrics: dict[str, Any]) -> Figure:
    """Test top-1 per method: one dot per seed; the mean with the table's 95 % Student-t CI."""
    import seaborn as sns

    df = pd.DataFrame(metrics["per_seed"])
    summary = pd.DataFrame(metrics["summary"])
    order = list(summary["method"])
    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    sns.stripplot(data=df.assign(top1_pct=df["top1"] * 100), x="method", y="top1_pct", order=order, hue="method",
                  palette="deep", legend=False, size=6, jitter=0.08, ax=ax)
    ci = summary["top1_ci"].astype(float).fillna(0.0) * 100
    ax.errorbar(range(len(order)), summary["top1_mean"] * 100, yerr=ci, fmt="_", color="black", markersize=18,
                capsize=6, linewidth=1.2)
    ax.set_xlabel("")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"ResNet-20 on {metrics.get('dataset', 'digits')}: FP32 vs uniform QAT "
                 f"({len(metrics['seeds'])} seed{'s' if len(metrics['seeds']) != 1 else ''})")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


@register_figure("00_quickstart", "quickstart_per_class")
def quickstart_per_class(metrics: dict[str, Any]) -> Figure:
    """Per-class test accuracy of every method (mean over seeds, 95 % CI): where quantization loses."""
    from .per_class import per_class_accuracy_figure

    per: dict[str, list[list[float]]] = {}
    for r in metrics["per_seed"]:
        if "per_class_accuracy" in r:
            per.setdefault(r["method"], []).append(r["per_class_accuracy"])
    if not per:  # a run recorded before per-class numbers were stored
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no per-class numbers in this run", ha="center", va="center")
        return fig
    return per_class_accuracy_figure(per, metrics.get("class_names"), xlabel=f"{metrics.get('dataset', '')} class")
